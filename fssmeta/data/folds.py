"""Fold class lists, exactly as docs/protocol.md section 1 gives them: PASCAL-5i and COCO-20i in both conventions."""

from __future__ import annotations

from typing import Literal

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# COCO category names in ascending category-id order: index + 1 is the contiguous id used everywhere.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# PASCAL names that COCO spells differently; every other PASCAL class has the same name in COCO.
COCO_NAME_OF_PASCAL = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
                       "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}

NUM_FOLDS = 4
Dataset = Literal["pascal", "coco", "synthetic"]

# A source split: a fold 0..3 (its base classes trained, its novel classes tested), or ALL, every class of the
# source dataset trained (PATNet's cross-domain source model; nothing held out, so no in-domain test).
ALL = "all"
Split = int | Literal["all"]


def split_name(split: Split) -> str:
    """The folder / file stem of a split: `fold<k>`, or `all`."""
    return ALL if split == ALL else f"fold{int(split)}"


def parse_split(text: str | int) -> Split:
    """`0`..`3` or `all` (a CLI `--fold`); anything else is a ValueError naming both forms."""
    if text == ALL:
        return ALL
    try:
        fold = int(text)
    except (TypeError, ValueError):
        fold = -1
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"a source split is a fold 0..{NUM_FOLDS - 1} or `{ALL}` (every source class), got {text!r}")
    return fold


def num_classes(dataset: str) -> int:
    """Foreground classes of a source dataset (the synthetic one mirrors PASCAL-5i: 20 classes, 4 x 5)."""
    if dataset in ("pascal", "synthetic"):
        return 20
    if dataset == "coco":
        return 80
    raise ValueError(f"unknown dataset {dataset!r}; expected pascal, coco or synthetic")


def novel_classes(dataset: str, fold: Split, coco_split: str = "interleaved") -> list[int]:
    """Class ids held out in `fold` (1-based contiguous ids); none for the ALL split."""
    if fold == ALL:
        num_classes(dataset)  # an unknown dataset still fails here
        return []
    if not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be 0..{NUM_FOLDS - 1}, got {fold}")
    if dataset in ("pascal", "synthetic"):
        return list(range(5 * fold + 1, 5 * fold + 6))
    if dataset == "coco":
        if coco_split == "interleaved":  # HSNet, ASNet, BAM, HDMNet, SCCAN
            return list(range(fold + 1, 81, 4))
        if coco_split == "consecutive":  # PANet
            return list(range(20 * fold + 1, 20 * fold + 21))
        raise ValueError(f"unknown coco_split {coco_split!r}; expected interleaved or consecutive")
    raise ValueError(f"unknown dataset {dataset!r}; expected pascal, coco or synthetic")


def base_classes(dataset: str, fold: Split, coco_split: str = "interleaved") -> list[int]:
    """Class ids trained on in `fold`: every class that is not novel."""
    novel = set(novel_classes(dataset, fold, coco_split))
    return [c for c in range(1, num_classes(dataset) + 1) if c not in novel]


def fold_classes(dataset: str, fold: Split, coco_split: str = "interleaved") -> dict[str, list[int]]:
    return {"novel": novel_classes(dataset, fold, coco_split), "base": base_classes(dataset, fold, coco_split)}


def held_out_classes(split: dict[str, object]) -> list[int]:
    """The classes a split's test and validation lists hold (`split` = a `fold_classes` / prepared fold
    dict): its novel classes, or for the ALL split, which holds none out, every class (its validation is
    on held-out source IMAGES)."""
    return list(split["novel"] or split["base"])  # type: ignore[call-overload]


def class_names(dataset: str) -> tuple[str, ...]:
    if dataset == "pascal":
        return PASCAL_CLASSES
    if dataset == "coco":
        return COCO_CLASSES
    return tuple(f"class{c:02d}" for c in range(1, num_classes(dataset) + 1))


def canonical_name(name: str) -> str:
    """A class name as COCO spells it (PASCAL's six differing names mapped), for matching across datasets."""
    return COCO_NAME_OF_PASCAL.get(name, name)


def seen_class_names(dataset: str, split: Split, coco_split: str = "interleaved") -> set[str]:
    """The canonical names of the classes a model of `split` trained on (its base classes)."""
    names = class_names(dataset)
    return {canonical_name(names[c - 1]) for c in base_classes(dataset, split, coco_split)}
