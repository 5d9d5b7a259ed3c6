"""A tiny synthetic dataset made through the CLI (synthesize, prepare, episodes) for methods trained without
stage 1: fold 0 only, one image order, one test seed; their frozen backbone is a local weights file (as an
ImageNet file is officially), random here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fssmeta.cli import main
from fssmeta.models.backbone import build_backbone


def tiny_cli_data(root: Path, method: str, shots: tuple[int, ...], **overrides: Any) -> list[str]:
    """Write the data under `root`; return the CLI arguments (`--params none --quiet --set ...`) that point
    every stage there with `model.method` = `method`. `overrides` (dotted keys) replace the small defaults."""
    listed = f"[{', '.join(str(s) for s in shots)}]"
    weights = root / "imagenet_small.pth"  # the official frozen-backbone file (`model.weights`), random weights
    torch.manual_seed(0)
    torch.save({"state_dict": build_backbone("small", "torchvision").state_dict()}, weights)
    sets: dict[str, Any] = {
        "synthesize.out": root / "syn", "synthesize.image_size": 96, "synthesize.train_images": 60,
        "synthesize.test_images": 100, "synthesize.val_images": 60, "synthesize.target_images_per_class": 1,
        "data.root": root / "syn", "data.prepared": root / "prepared", "data.cache_dir": root / "cache",
        "data.targets": "{}", "data.min_object_pixels": 200, "episodes.out": root / "episodes",
        "episodes.folds": "[0]", "episodes.shots": listed, "episodes.orders": "[image]",
        "episodes.test_episodes": 6, "episodes.test_seeds": "[0]", "episodes.val_episodes": 4,
        "transform.crop_size": 65, "eval.test_size": 65, "eval.episodes": 6, "eval.folds": "[0]",
        "eval.shots": listed, "eval.out": root / "results", "train.out": root / "runs",
        "train_base.out": root / "runs", "train.epochs": 1, "train.episodes_per_epoch": 8,
        "train.batch_size": 4, "train.val_episodes": 4, "model.method": method, "model.weights": weights,
        **overrides}
    args = ["--params", "none", "--quiet", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    for stage in ("synthesize", "prepare", "episodes"):
        assert main([stage, *args]) == 0, stage
    return args
