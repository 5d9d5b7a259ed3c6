"""Shared test helpers: tiny datasets written in the real on-disk layouts, the tiers' markers.

Tiers: tests/unit (plain `pytest`: no Ray, MLflow or DVC imported) and tests/integration (real Ray, MLflow,
DVC; `make test` runs both). tests/integration/conftest.py holds the Ray fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fssmeta.data.io import voc_palette

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# One intra-op thread: small convolutions on a 2-core machine otherwise spin-wait against other work
# (seen: 2 s tests taking 25-45 s); the numbers do not change, only the scheduling.
torch.set_num_threads(1)


def box_mask(size: tuple[int, int], boxes: list[tuple[int, int, int, int, int]], band: bool = False) -> np.ndarray:
    """A class-id mask with rectangles (class, top, left, height, width); `band` adds a 255 outline."""
    mask = np.zeros(size, np.uint8)
    for c, top, left, h, w in boxes:
        mask[top : top + h, left : left + w] = c
        if band:
            mask[top, left : left + w] = 255
            mask[top + h - 1, left : left + w] = 255
    return mask


def write_voc(root: Path, masks: dict[str, np.ndarray], train: list[str], test: list[str],
              val: list[str] | None = None, palette_ids: tuple[str, ...] = ()) -> Path:
    """Write a VOC2012-layout folder: JPEGImages, SegmentationClassAug (L) and, for `palette_ids`,
    SegmentationClass palette PNGs; list files split `train` like VOC train + SBD train_noval."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClassAug", "SegmentationClass", "ImageSets/Segmentation",
                "ImageSets/SegmentationAug"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for key, mask in masks.items():
        image = rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{key}.jpg", quality=90)
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{key}.png")
        if key in palette_ids:
            img = Image.fromarray(mask)
            img.putpalette(voc_palette())
            img.save(root / "SegmentationClass" / f"{key}.png")
    half = len(train) // 2
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(train[:half]) + "\n")
    # SBD-style list in the PFENet pair format, to exercise both line formats.
    (root / "ImageSets/SegmentationAug/train_noval.txt").write_text(
        "".join(f"JPEGImages/{k}.jpg SegmentationClassAug/{k}.png\n" for k in train[half:]))
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(test) + "\n")
    if val is not None:
        (root / "ImageSets/Segmentation/selection.txt").write_text("\n".join(val) + "\n")
    return root


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """A 64x64 VOC2012 layout covering all 20 PASCAL classes, so every fold has train and test images.

    tr<i> (20): class i+1 in a 50x50 box with a 255 band; every 4th also holds a 36-pixel object of class
    (i+5)%20+1. te<i> (20): class i+1 in a 60x40 box, except te19: a 10x10 class-20 object only.
    va<i> (4): classes 1, 2, 1, 2 (the checkpoint-selection pool).
    """
    masks, train, test, val = {}, [], [], []
    for i in range(20):
        boxes = [(i + 1, 4, 4, 50, 50)]
        if i % 4 == 0:
            boxes.append(((i + 5) % 20 + 1, 56, 56, 6, 6))
        masks[f"tr{i:02d}"] = box_mask((64, 64), boxes, band=True)
        train.append(f"tr{i:02d}")
    for i in range(20):
        boxes = [(i + 1, 2, 2, 60, 40)] if i != 19 else [(20, 0, 0, 10, 10)]
        masks[f"te{i:02d}"] = box_mask((64, 64), boxes, band=True)
        test.append(f"te{i:02d}")
    for i in range(4):
        masks[f"va{i:02d}"] = box_mask((64, 64), [(1 + i % 2, 2, 2, 60, 40)])
        val.append(f"va{i:02d}")
    return write_voc(tmp_path / "VOC2012", masks, train, test, val, palette_ids=("te00", "te01"))


INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ carries the `integration` marker; `gpu` tests skip on machines
    without CUDA (every CI machine) and run where a GPU is lent."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
