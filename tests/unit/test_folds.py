"""Fold lists asserted literally against docs/protocol.md section 1."""

from __future__ import annotations

import json

import pytest

from fssmeta.cli import main
from fssmeta.data import folds

PASCAL_FOLDS = {
    0: ["aeroplane", "bicycle", "bird", "boat", "bottle"],
    1: ["bus", "car", "cat", "chair", "cow"],
    2: ["diningtable", "dog", "horse", "motorbike", "person"],
    3: ["pottedplant", "sheep", "sofa", "train", "tvmonitor"],
}
COCO_FOLD0_INTERLEAVED = [
    "person", "airplane", "boat", "parking meter", "dog", "elephant", "backpack", "suitcase", "sports ball",
    "skateboard", "wine glass", "spoon", "sandwich", "hot dog", "chair", "dining table", "mouse", "microwave",
    "refrigerator", "scissors",
]  # fmt: skip


@pytest.mark.parametrize("fold", range(4))
def test_pascal_folds(fold):
    novel = folds.novel_classes("pascal", fold)
    assert novel == list(range(5 * fold + 1, 5 * fold + 6))
    assert [folds.PASCAL_CLASSES[c - 1] for c in novel] == PASCAL_FOLDS[fold]
    assert sorted(novel + folds.base_classes("pascal", fold)) == list(range(1, 21))
    assert len(folds.base_classes("pascal", fold)) == 15


def test_coco_interleaved_fold0_names_and_all_folds_partition():
    novel = folds.novel_classes("coco", 0)
    assert novel == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77]
    assert [folds.COCO_CLASSES[c - 1] for c in novel] == COCO_FOLD0_INTERLEAVED
    assert folds.novel_classes("coco", 3) == list(range(4, 81, 4))
    for split in ("interleaved", "consecutive"):
        union = sorted(c for k in range(4) for c in folds.novel_classes("coco", k, split))
        assert union == list(range(1, 81))
        assert all(len(folds.base_classes("coco", k, split)) == 60 for k in range(4))


def test_coco_consecutive():
    assert folds.novel_classes("coco", 0, "consecutive") == list(range(1, 21))
    assert folds.novel_classes("coco", 2, "consecutive") == list(range(41, 61))
    assert folds.COCO_CLASSES[40] == "wine glass" and len(folds.COCO_CLASSES) == 80


def test_bad_fold_and_dataset():
    with pytest.raises(ValueError, match="fold must be 0..3"):
        folds.novel_classes("pascal", 4)
    with pytest.raises(ValueError, match="unknown coco_split"):
        folds.novel_classes("coco", 0, "random")
    with pytest.raises(ValueError, match="unknown dataset"):
        folds.num_classes("ade20k")


def test_cli_folds_json(capsys):
    assert main(["folds", "--dataset", "coco", "--coco-split", "consecutive", "--fold", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["novel"] == list(range(21, 41)) and len(out["base"]) == 60
    assert main(["folds", "--dataset", "pascal", "--fold", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["novel"] == [1, 2, 3, 4, 5]
