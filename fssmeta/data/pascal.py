"""PASCAL VOC2012 + SBD reader: list files, `SegmentationClassAug` masks, the PFENet and HSNet training pools."""

from __future__ import annotations

from pathlib import Path

from fssmeta.config import DataConfig
from fssmeta.data.io import DataError, SampleRef


def read_list(path: str | Path) -> list[str]:
    """Image ids of a list file, in file order, duplicates dropped.

    Two line formats occur in the field: a bare id (VOC `ImageSets`, SBD `train_noval.txt`) and the
    PFENet/BAM pair `JPEGImages/<id>.jpg SegmentationClassAug/<id>.png`; both give the image stem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    ids: dict[str, None] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        first = text.split()[0]
        stem = Path(first).stem
        if not stem:
            raise DataError(f"{path}:{number}: cannot read an image id from {text!r}")
        ids[stem] = None
    return list(ids)


def voc_samples(root: Path, ids: list[str], mask_dir: str) -> list[SampleRef]:
    return [SampleRef(key=i, image=root / "JPEGImages" / f"{i}.jpg", mask=root / mask_dir / f"{i}.png") for i in ids]


def voc_pools(cfg: DataConfig, root: Path) -> dict[str, list[SampleRef]]:
    """The train, test and validation (checkpoint selection) pools of a VOC-layout root.

    `train_pool: pfenet` is the union of `cfg.train_lists` (VOC train + SBD train_noval = 5953 images);
    `hsnet` is every mask in `mask_dir` except the test pool (trainaug minus VOC val, ~10.1k images).
    """
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found (expected a VOC2012 folder with JPEGImages/ and {cfg.mask_dir}/)")
    if not (root / cfg.mask_dir).is_dir():
        raise DataError(f"{root / cfg.mask_dir}: mask folder not found (data.mask_dir)")
    test_ids = read_list(root / cfg.test_list)
    if cfg.train_pool == "pfenet":
        merged: dict[str, None] = {}
        for name in cfg.train_lists:
            merged.update(dict.fromkeys(read_list(root / name)))
        train_ids = list(merged)
    else:
        held_out = set(test_ids)
        train_ids = sorted(p.stem for p in (root / cfg.mask_dir).glob("*.png") if p.stem not in held_out)
    overlap = set(train_ids) & set(test_ids)
    if overlap:
        example = sorted(overlap)[:3]
        raise DataError(f"{root}: {len(overlap)} image(s) are in both the training lists and {cfg.test_list}, e.g. {example}")
    val_ids = read_list(root / cfg.val_list) if cfg.val_list and (root / cfg.val_list).is_file() else []
    return {
        "train": voc_samples(root, train_ids, cfg.mask_dir),
        "test": voc_samples(root, test_ids, cfg.mask_dir),
        "val": voc_samples(root, val_ids, cfg.mask_dir),
    }
