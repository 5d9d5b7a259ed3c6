"""`prepare`: validate a dataset and index it into per-fold image lists with the protocol's filters applied.

Every image and mask is read once: sizes must match, labels must be known class ids or 255. All bad files
are collected into one report. Outputs (`index.json`, `fold<k>.json`) are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fssmeta.config import DataConfig, config_to_dict
from fssmeta.data import folds
from fssmeta.data.io import (
    DataError,
    Problems,
    SampleRef,
    read_image,
    read_json,
    read_mask,
    write_json_atomic,
)
from fssmeta.data.pascal import voc_pools

INDEX_VERSION = 1


def dataset_root(cfg: DataConfig) -> Path:
    """The folder the reader opens: the synthetic dataset holds both a VOC2012/ and a COCO/ layout."""
    root = Path(cfg.root)
    if cfg.dataset == "synthetic":
        return root / ("VOC2012" if cfg.format == "voc" else "COCO")
    return root


def reader_format(cfg: DataConfig) -> str:
    return {"pascal": "voc", "coco": "coco"}.get(cfg.dataset, cfg.format)


def load_pools(cfg: DataConfig, progress: bool = True) -> dict[str, list[SampleRef]]:
    """Sample references of the train / test / val pools, from the configured reader."""
    root = dataset_root(cfg)
    if reader_format(cfg) == "voc":
        return voc_pools(cfg, root)
    # pycocotools only when COCO is asked for
    from fssmeta.data.coco import COCO_CATEGORY_IDS, CocoProblems, render_coco_masks

    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found (expected a COCO folder with train2014/, val2014/, annotations/)")
    if cfg.dataset == "coco":
        category_ids: tuple[int, ...] = COCO_CATEGORY_IDS
        cache = Path(cfg.cache_dir) / "coco"
    else:  # the synthetic COCO layout has its own 20 non-contiguous category ids
        from fssmeta.data.synthetic import coco_category_id

        category_ids = tuple(coco_category_id(c) for c in range(1, folds.num_classes(cfg.dataset) + 1))
        cache = Path(cfg.cache_dir) / "synthetic-coco"
    # one report for both annotation files: a second run must not be the first to see the test split's problems
    problems = CocoProblems(f"COCO dataset {root}")
    pools = {split: render_coco_masks(root, split, cache, cfg.crowd, progress, category_ids=category_ids,
                                      empty_segmentation=cfg.coco_empty_segmentation, problems=problems)
             for split in ("train", "test")}
    problems.raise_if_any()
    return {**pools, "val": []}  # COCO has no third pool: validation episodes come from the test pool's own seeds


def count_pixels(ref: SampleRef, num_classes: int) -> dict[str, Any]:
    """Read one image/mask pair and return its per-class pixel counts; raises DataError naming the file."""
    image = read_image(ref.image)
    mask = read_mask(ref.mask)
    if image.shape[:2] != mask.shape:
        raise DataError(f"{ref.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{ref.image} ({image.shape[1]}x{image.shape[0]})")
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [int(v) for v in np.nonzero(counts[num_classes + 1 : 255])[0] + num_classes + 1]
    if bad:
        raise DataError(f"{ref.mask}: class ids {bad} out of range (expected 0..{num_classes} or 255)")
    pixels = {str(c): int(counts[c]) for c in range(1, num_classes + 1) if counts[c]}
    return {"key": ref.key, "image": str(ref.image), "mask": str(ref.mask),
            "size": [int(mask.shape[0]), int(mask.shape[1])], "pixels": pixels}


def index_pool(refs: list[SampleRef], num_classes: int, problems: Problems, desc: str,
               progress: bool = True, workers: int = 4) -> list[dict[str, Any]]:
    def one(ref: SampleRef) -> dict[str, Any] | None:
        try:
            return count_pixels(ref, num_classes)
        except DataError as exc:
            problems.add_error(exc)
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decoding releases the GIL
        rows = list(tqdm(pool.map(one, refs), total=len(refs), desc=desc, disable=not progress, unit="img"))
    return [row for row in rows if row is not None]


def qualifying(row: dict[str, Any], classes: list[int], min_pixels: int) -> list[int]:
    """Classes of `classes` present in the image with at least `min_pixels` pixels (the small-object rule)."""
    return [c for c in classes if row["pixels"].get(str(c), 0) >= max(min_pixels, 1)]


def present_classes(index: dict[str, Any], cfg: DataConfig, lists: dict[str, Any],
                    pool: str) -> dict[str, list[int]] | None:
    """What an `image`-order episode draws its query's class among (`data.query_class`, docs/protocol.md
    section 3): None = the list's qualifying classes; for `present`, per image of the index pool, the fold's
    classes (base for `train`, novel for `test` / `val`) it contains at any pixel count, as PFENet's and
    BAM's `__getitem__` take them from the query mask. An HSNet training list (`train_pool: hsnet`) names
    the class of each (image, class) line, so it keeps that class."""
    if cfg.query_class == "qualifying" or (pool == "train" and cfg.train_pool == "hsnet"):
        return None
    active = sorted(int(c) for c in (lists["base"] if pool == "train" else folds.held_out_classes(lists)))
    return {row["key"]: [c for c in active if str(c) in row["pixels"]] for row in index["pools"][pool]}


def fold_lists(index: dict[str, Any], cfg: DataConfig, fold: folds.Split) -> dict[str, Any]:
    """Per-fold lists `[key, [qualifying classes]]` for train (base classes) and test / val (novel classes;
    for the ALL split, every class: its validation holds out images, not classes)."""
    split = folds.fold_classes(cfg.dataset, fold, cfg.coco_split)
    novel, base = split["novel"], split["base"]
    held_out = folds.held_out_classes(split)
    novel_set = {str(c) for c in novel}
    train = []
    for row in index["pools"]["train"]:
        # BAM/HDMNet lists drop any training image with a novel pixel; PFENet/HSNet keep it and relabel
        # novel pixels as background (done by the episode labelling, which maps every other class to 0).
        if cfg.exclude_novel_images and novel_set & row["pixels"].keys():
            continue
        classes = qualifying(row, base, cfg.min_object_pixels)
        if cfg.train_pool == "hsnet":  # HSNet lists hold one `name__classid` line per (image, class)
            train.extend([row["key"], [c]] for c in classes)
        elif classes:
            train.append([row["key"], classes])
    out: dict[str, Any] = {"fold": fold, "novel": novel, "base": base, "train": train}
    for pool in ("test", "val"):
        out[pool] = [[row["key"], cs] for row in index["pools"][pool]
                     if (cs := qualifying(row, held_out, cfg.min_object_pixels))]
    for pool in ("train", "test"):
        if not out[pool]:
            raise DataError(f"fold {fold}: no {pool} images left after the filters "
                            f"(data.min_object_pixels={cfg.min_object_pixels}, "
                            f"data.exclude_novel_images={cfg.exclude_novel_images}, data.root={cfg.root})")
    return out


def index_fingerprint(cfg: DataConfig) -> str:
    # query_class is read by the episodes stage only: the prepared index does not depend on it.
    relevant = {k: v for k, v in config_to_dict(cfg).items() if k not in ("prepared", "targets", "query_class")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Validate and index the configured dataset; write `index.json`, `fold<k>.json` and `all.json` (the
    all-classes source split) under `out`."""
    out = Path(out or cfg.prepared)
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)  # a declared output, empty unless COCO masks render
    n_classes = folds.num_classes(cfg.dataset)
    pools = load_pools(cfg, progress)
    problems = Problems(f"prepare {dataset_root(cfg)}")
    indexed = {name: index_pool(refs, n_classes, problems, f"index {name}", progress) for name, refs in pools.items()}
    problems.raise_if_any()
    index = {"version": INDEX_VERSION, "dataset": cfg.dataset, "format": reader_format(cfg),
             "num_classes": n_classes, "fingerprint": index_fingerprint(cfg),
             "protocol": protocol_record(cfg), "pools": indexed}
    lists = [fold_lists(index, cfg, k) for k in (*range(folds.NUM_FOLDS), folds.ALL)]
    for fold in lists:
        write_json_atomic(out / f"{folds.split_name(fold['fold'])}.json", fold, indent=None)
    write_json_atomic(out / "index.json", index, indent=None)  # last: its presence means the lists are complete
    return summarize(index, lists)


def protocol_record(cfg: DataConfig) -> dict[str, Any]:
    """The switches that change the numbers (docs/protocol.md): recorded beside every list and metric."""
    return {"dataset": cfg.dataset, "format": reader_format(cfg), "coco_split": cfg.coco_split,
            "train_pool": cfg.train_pool, "exclude_novel_images": cfg.exclude_novel_images,
            "min_object_pixels": cfg.min_object_pixels, "crowd": cfg.crowd}


def summarize(index: dict[str, Any], lists: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pools": {k: len(v) for k, v in index["pools"].items()},
            "folds": {f["fold"]: {p: len(f[p]) for p in ("train", "test", "val")} for f in lists}}


def load_index(prepared: str | Path) -> dict[str, Any]:
    path = Path(prepared) / "index.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; run `fssmeta prepare` first")
    index = read_json(path, "dataset index")
    if index.get("version") != INDEX_VERSION:
        raise DataError(f"{path}: index version {index.get('version')} is not {INDEX_VERSION}; re-run `fssmeta prepare`")
    return index


def load_fold(prepared: str | Path, fold: folds.Split) -> dict[str, Any]:
    path = Path(prepared) / f"{folds.split_name(fold)}.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; run `fssmeta prepare` first")
    return read_json(path, "fold list")
