"""Stage 1 as BAM trains it (`train_base`): every training image with novel pixels relabelled background, the
encoder at its own rate, its own transform section, the checkpoint selected on validation images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fssmeta.checkpoint import read_checkpoint
from fssmeta.cli import main
from fssmeta.config import BaseTrainConfig
from fssmeta.data.io import DataError
from fssmeta.data.prepare import load_fold, load_index
from fssmeta.episode import SegOutput
from fssmeta.params import load_config
from fssmeta.runs import stage1_checkpoint
from fssmeta.stages import base_miou, base_training_keys, train_base


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("stage1")
    sets = {"synthesize.out": root / "syn", "synthesize.image_size": 96, "synthesize.train_images": 60,
            "synthesize.test_images": 40, "synthesize.val_images": 12, "synthesize.target_images_per_class": 1,
            "data.root": root / "syn", "data.prepared": root / "prepared", "data.cache_dir": root / "cache",
            "data.targets": "{}", "data.min_object_pixels": 50, "train_base.out": root / "runs", "train.out": root / "runs",
            "model.pspnet.ppm_dim": 32, "train_base.epochs": 2, "train_base.episodes_per_epoch": 8,
            "train_base.batch_size": 4, "train_base.val_episodes": 6, "train_base.encoder_lr_scale": 0.1,
            "train_base.transform.crop_size": 65, "train_base.amp": "false"}
    args = ["--params", "none", "--quiet", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    for stage in ("synthesize", "prepare"):
        assert main([stage, *args]) == 0, stage
    return root, [f"{k}={v}" for k, v in sets.items()]


def test_all_images_include_those_with_novel_classes(data):
    _, sets = data
    cfg = load_config(None, sets)
    meta = set(base_training_keys(cfg.model_copy(update={"train_base": cfg.train_base.model_copy(
        update={"images": "meta"})}), 0))
    every = base_training_keys(cfg, 0)
    novel = {str(c) for c in load_fold(cfg.data.prepared, 0)["novel"]}
    with_novel = {row["key"] for row in load_index(cfg.data.prepared)["pools"]["train"] if novel & row["pixels"].keys()}
    assert meta < set(every) and with_novel and with_novel <= set(every) and not with_novel & meta


def test_train_base_selects_on_validation_with_encoder_rate(data):
    root, sets = data
    cfg = load_config(None, sets)
    result = train_base(cfg, 0, progress=False, resume_run=False)
    run = root / "runs" / "fold0" / "base"
    history = json.loads((run / "history.json").read_text())
    assert [set(h) >= {"val_miou"} for h in history["history"]] == [True, True]
    assert history["best_epoch"] == result.best_epoch >= 1 and (run / "best.pt").is_file()
    assert stage1_checkpoint(cfg, 0) == run / "best.pt"
    best = read_checkpoint(run / "best.pt")
    encoder, head = read_checkpoint(run / "last.pt")["optimizer"]["param_groups"]
    assert encoder["lr"] == pytest.approx(0.1 * head["lr"])  # the encoder at lr x encoder_lr_scale
    assert not any(k.startswith("aux.") for k in best["model"])  # BAM's PSPNet: no layer3 head
    last_cfg = cfg.model_copy(update={"train_base": cfg.train_base.model_copy(update={"select": "last"})})
    assert stage1_checkpoint(last_cfg, 0) == run / "last.pt"


def test_stage1_lives_in_train_base_out(data):
    # dvc.yaml's train_base outputs (and the later stages' dependencies) are <train_base.out>/fold<k>/base;
    # stage 1 wrote to train.out before, so a train_base.out of its own broke the pipeline.
    root, sets = data
    cfg = load_config(None, [*sets, f"train_base.out={root / 'stage1'}", f"train.out={root / 'meta'}",
                             "train_base.epochs=1", "train_base.select=last", "train_base.val_episodes=0"])
    train_base(cfg, 0, progress=False, resume_run=False)
    assert stage1_checkpoint(cfg, 0) == root / "stage1" / "fold0" / "base" / "last.pt"
    assert stage1_checkpoint(cfg, 0).is_file() and not (root / "meta").exists()


def test_best_needs_validation(data):
    with pytest.raises(ValidationError, match="select: `best` needs validation images"):
        BaseTrainConfig(val_episodes=0)
    _, sets = data
    prepared = Path(load_config(None, sets).data.prepared)
    moved = prepared.parent / "prepared_noval"  # the same lists with no validation pool, as COCO
    moved.mkdir(exist_ok=True)
    for f in prepared.iterdir():
        (moved / f.name).write_text(f.read_text())
    payload = json.loads((prepared / "index.json").read_text())
    (moved / "index.json").write_text(json.dumps({**payload, "pools": {**payload["pools"], "val": []}}))
    cfg = load_config(None, [*sets, f"data.prepared={moved}"])
    with pytest.raises(DataError, match="train_base.select: best needs a validation pool"):
        train_base(cfg, 0, progress=False, resume_run=False)


def test_base_miou_by_hand():
    class Fixed(torch.nn.Module):
        def __init__(self, pred: torch.Tensor) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.pred = pred

        def forward(self, image: torch.Tensor) -> SegOutput:
            return SegOutput(torch.nn.functional.one_hot(self.pred, 3).permute(0, 3, 1, 2).float(), [], {})

    label = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 2, 0, 0]]])
    # class 0: inter 1, union 2; class 1: 2 / 3; class 2: 2 / 2; 255 ignored
    miou = base_miou(Fixed(pred), [(torch.zeros(1, 3, 2, 4), label)], 3)
    assert miou == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
