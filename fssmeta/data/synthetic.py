"""The synthetic few-shot segmentation dataset, the pipeline's embedded default: 20 shape x texture classes
written in the PASCAL VOC and COCO 2014 layouts, plus three cross-domain target sets in PATNet layouts.

Drawing lives in `synthetic_draw`; this module holds the class table, the per-image samples and the writers.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
from tqdm import tqdm

from fssmeta.config import ConfigError, SynthesizeConfig
from fssmeta.data import synthetic_draw as draw
from fssmeta.data.io import (
    DataError,
    atomic_path,
    read_json,
    voc_palette,
    write_json_atomic,
    write_png_atomic,
    write_text_atomic,
)

# Bumped whenever the drawing changes, so an old dataset with the same config is regenerated.
GENERATOR_VERSION = 1
SPLITS = ("train", "test", "val")  # the split index is part of every image's RNG seed
COCO_SPLITS = {"train": "train2014", "test": "val2014"}
NUM_CLASSES = 20
# The SUIM 3-bit colour code: water (background), then the 7 foreground classes.
SUIM_COLOURS = ((0, 0, 0), (0, 0, 255), (0, 255, 0), (0, 255, 255), (255, 0, 0), (255, 0, 255),
                (255, 255, 0), (255, 255, 255))


@dataclass(frozen=True)
class SynthClass:
    """One class: a shape drawn with a texture. Ids count from 1 within their set (0 is background)."""

    id: int
    name: str
    shape: str
    texture: str


def _source_class(c: int) -> SynthClass:
    # Every fold (ids 5i+1..5i+5) holds all 5 shapes and all 5 textures, and each shape and each texture
    # occurs in 4 classes: only the combination identifies a class.
    shape = draw.SOURCE_SHAPES[c % 5]
    texture = draw.SOURCE_TEXTURES[(c // 5 + 2 * (c % 5)) % 5]
    return SynthClass(c + 1, f"{shape}_{texture}", shape, texture)


CLASSES: tuple[SynthClass, ...] = tuple(_source_class(c) for c in range(NUM_CLASSES))
# The five shape-texture pairs that are not classes, drawn as background decoys (hard negatives).
DECOYS = tuple((s, t) for s in draw.SOURCE_SHAPES for t in draw.SOURCE_TEXTURES
               if (s, t) not in {(k.shape, k.texture) for k in CLASSES})


def coco_category_id(class_id: int) -> int:
    """Non-contiguous like real COCO, so readers must map sorted category ids to 1..20."""
    return 3 * class_id - 1


@dataclass(frozen=True)
class TargetSet:
    """A cross-domain target: new classes, a strong appearance shift, written in a PATNet layout."""

    name: str
    layout: str  # a `TargetConfig.layout`
    classes: tuple[SynthClass, ...]


def _target_classes(*pairs: tuple[str, str]) -> tuple[SynthClass, ...]:
    return tuple(SynthClass(i + 1, t if s == "region" else f"{s}_{t}", s, t) for i, (s, t) in enumerate(pairs))


TARGET_SETS: tuple[TargetSet, ...] = (
    TargetSet("gray", "deepglobe", _target_classes(
        ("hexagon", "hatch"), ("crescent", "bricks"), ("heart", "spiral"), ("arrow", "diamonds"))),
    TargetSet("hazy", "fss1000", _target_classes(
        ("ring", "zigzag"), ("hexagon", "speckle"), ("crescent", "sunburst"), ("heart", "hatch"),
        ("arrow", "bricks"))),
    TargetSet("tiles", "suim", _target_classes(*(("region", t) for t in draw.TARGET_TEXTURES))),
)


@dataclass(frozen=True)
class Sample:
    """One generated source image and its labels."""

    image: np.ndarray  # (H, W, 3) uint8
    instances: np.ndarray  # (H, W) uint8: k where instance k (1-based) is visible, 0 elsewhere
    class_ids: tuple[int, ...]  # class id of instance k at position k - 1
    crowd: tuple[bool, ...]
    mask: np.ndarray  # (H, W) uint8 VOC mask: class ids, 255 on the boundary band


def usable_pixels(image_size: int) -> int:
    """Every image has one class with at least this many mask pixels: the PFENet filter's 2048 or 8%."""
    return max(2048, math.ceil(0.08 * image_size * image_size))


def class_mask(instances: np.ndarray, class_ids: tuple[int, ...], boundary_width: int) -> np.ndarray:
    """Class ids per pixel with a VOC-style 255 band within `boundary_width` of any instance boundary."""
    lut = np.zeros(256, np.uint8)
    lut[1:len(class_ids) + 1] = class_ids
    mask = lut[instances]
    if boundary_width > 0:
        # Max and min of the instance map over a disc differ exactly where two labels meet within reach:
        # the same band as dilation XOR erosion of every instance, in two calls.
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * boundary_width + 1,) * 2)
        mask[cv2.dilate(instances, disc) != cv2.erode(instances, disc)] = 255
    return mask


def draw_sample(cfg: SynthesizeConfig, split_index: int, index: int) -> Sample:
    """Image `index` of split `split_index`; depends only on (seed, split, index), never on order."""
    rng = np.random.default_rng([cfg.seed, split_index, index])
    size, need = cfg.image_size, usable_pixels(cfg.image_size)
    area = size * size
    for attempt in range(20):
        n = int(rng.integers(1, cfg.max_objects + 1))
        picks = [CLASSES[c] for c in rng.choice(NUM_CLASSES, n, replace=False)]
        # The first pick is the anchor that makes the image usable; the others are distractors, some of
        # them small (below the 2048-pixel filter).
        anchor = min(0.6 * area, rng.uniform(1.3 * need, max(1.3 * need, 0.3 * area)) * 1.2 ** attempt)
        small = rng.random(n) < 0.3
        areas = [anchor] + [area * math.exp(rng.uniform(*((-5.5, -3.2) if s else (-3.0, -1.6))))
                            for s in small[1:]]
        order = rng.permutation(n)
        objects = [(picks[k].shape, picks[k].texture, areas[k], k == 0) for k in order]
        image, instances = draw.render_scene(rng, size, objects, draw.SOURCE_TEXTURES, DECOYS)
        class_ids = tuple(picks[k].id for k in order)
        mask = class_mask(instances, class_ids, cfg.boundary_width)
        if np.bincount(mask.ravel(), minlength=256)[1:NUM_CLASSES + 1].max() >= need:
            crowd = tuple(bool(c) for c in rng.random(n) < 0.1)
            return Sample(draw.finish(rng, image), instances, class_ids, crowd, mask)
    raise RuntimeError(f"synthetic image {split_index}/{index}: no usable object after 20 layouts")


def _save_image(path: Path, array: np.ndarray, fmt: str, **options: Any) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt, **options)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, dst)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    # COCO's crowd format: run lengths over the column-major pixels, starting with a run of zeros.
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] + counts) if flat[0] else counts, "size": list(mask.shape)}


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """External contours as flat [x1, y1, ...] lists; [] when the visible part has a hole (RLE then)."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None or (hierarchy[0][:, 3] >= 0).any():
        return []
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def coco_annotation(mask: np.ndarray, ann_id: int, image_id: int, class_id: int, crowd: bool) -> dict[str, Any]:
    """One instance from its visible (H, W) bool mask. Styles alternate with the id, as real COCO mixes
    polygons and RLE; crowd regions are uncompressed RLE, as in COCO."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    style = "uncompressed" if crowd else ("polygon", "compressed", "uncompressed")[ann_id % 3]
    segmentation: Any = _polygons(mask) if style == "polygon" else []
    if style == "uncompressed":
        segmentation = _uncompressed_rle(mask)
    elif not segmentation:  # compressed, or a polygon that would lose a hole
        segmentation = {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}
    return {"id": ann_id, "image_id": image_id, "category_id": coco_category_id(class_id),
            "segmentation": segmentation, "area": float(mask_util.area(rle)),
            "bbox": [float(x) for x in mask_util.toBbox(rle)], "iscrowd": int(crowd)}


def _write_sources(cfg: SynthesizeConfig, root: Path, progress: bool) -> dict[str, Any]:
    voc, coco = root / "VOC2012", root / "COCO"
    palette = voc_palette()
    ids: dict[str, list[str]] = {}
    coco_data: dict[str, dict[str, list[Any]]] = {s: {"images": [], "annotations": []} for s in COCO_SPLITS}
    first = 1
    for split_index, split in enumerate(SPLITS):
        count = getattr(cfg, f"{split}_images")
        ids[split] = [f"syn_{first + i:06d}" for i in range(count)]
        for index, name in enumerate(tqdm(ids[split], desc=f"synthesize {split}", disable=not progress)):
            sample = draw_sample(cfg, split_index, index)
            jpeg = voc / "JPEGImages" / f"{name}.jpg"
            _save_image(jpeg, sample.image, "JPEG", quality=95)
            write_png_atomic(voc / "SegmentationClassAug" / f"{name}.png", sample.mask)
            if split == "test":  # the VOC release format: a palette PNG whose pixel values are the ids
                write_png_atomic(voc / "SegmentationClass" / f"{name}.png", sample.mask, palette=palette)
            if split not in COCO_SPLITS:
                continue
            image_id = first + index
            file_name = f"COCO_{COCO_SPLITS[split]}_{image_id:012d}.jpg"
            _link(jpeg, coco / COCO_SPLITS[split] / file_name)
            data = coco_data[split]
            data["images"].append({"id": image_id, "file_name": file_name, "height": cfg.image_size,
                                   "width": cfg.image_size})
            for k, (class_id, crowd) in enumerate(zip(sample.class_ids, sample.crowd)):
                visible = sample.instances == k + 1
                if visible.any():  # a fully occluded instance has nothing to annotate
                    data["annotations"].append(coco_annotation(visible, image_id * 100 + k, image_id, class_id, crowd))
        first += count
    categories = [{"id": coco_category_id(c.id), "name": c.name, "supercategory": c.shape} for c in CLASSES]
    for split, data in coco_data.items():
        write_json_atomic(coco / "annotations" / f"instances_{COCO_SPLITS[split]}.json",
                          {"info": {"description": "fssmeta synthetic"}, "licenses": [], "images": data["images"],
                           "annotations": data["annotations"], "categories": categories}, indent=None)
    # Like VOC: the first quarter of the training ids is VOC train, the rest SBD train_noval.
    n_voc = max(1, round(0.25 * len(ids["train"])))
    lists = {"Segmentation/train.txt": ids["train"][:n_voc], "SegmentationAug/train_noval.txt": ids["train"][n_voc:],
             "Segmentation/val.txt": ids["test"], "Segmentation/selection.txt": ids["val"]}
    for rel, names in lists.items():
        write_text_atomic(voc / "ImageSets" / rel, "".join(f"{n}\n" for n in names))
    counts: dict[str, Any] = {split: len(names) for split, names in ids.items()}
    for split, data in coco_data.items():
        counts[f"coco_{split}_annotations"] = len(data["annotations"])
        counts[f"coco_{split}_crowd"] = sum(a["iscrowd"] for a in data["annotations"])
    return counts


def draw_target(cfg: SynthesizeConfig, set_index: int, class_index: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of class `class_index` (0-based) of a shape target: the image (gray: (H, W); hazy:
    (H, W, 3)) and its 255/0 mask of that class; other classes of the set may appear as distractors."""
    target = TARGET_SETS[set_index]
    rng = np.random.default_rng([cfg.seed, len(SPLITS) + set_index, class_index, index])
    size = cfg.image_size
    area = size * size
    while True:  # redraw the rare layout where distractors hide most of the class
        others = [k for k in range(len(target.classes)) if k != class_index]
        picks = [class_index] + list(rng.choice(others, int(rng.integers(0, 3)), replace=False))
        areas = [rng.uniform(0.1, 0.3) * area] + [rng.uniform(0.03, 0.12) * area for _ in picks[1:]]
        order = rng.permutation(len(picks))
        objects = [(target.classes[picks[k]].shape, target.classes[picks[k]].texture, areas[k], k == 0)
                   for k in order]
        textures = tuple(c.texture for c in target.classes)
        image, instances = draw.render_scene(rng, size, objects, textures)
        mask = (instances == 1 + int(np.flatnonzero(order == 0)[0])).astype(np.uint8) * 255
        if np.count_nonzero(mask) >= 0.05 * area:
            break
    shifted = draw.to_gray(rng, image) if target.name == "gray" else draw.to_hazy(rng, image)
    return shifted, mask


def draw_tiles(cfg: SynthesizeConfig, set_index: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A texture-only image: 2..4 regions of distinct textures; the SUIM colour-coded (H, W, 3) mask."""
    rng = np.random.default_rng([cfg.seed, len(SPLITS) + set_index, 0, index])
    textures = rng.choice(len(TARGET_SETS[set_index].classes), int(rng.integers(2, 5)), replace=False)
    image, instances = draw.render_tiles(rng, cfg.image_size, [draw.TARGET_TEXTURES[t] for t in textures])
    codes = np.zeros((256, 3), np.uint8)
    codes[1:len(textures) + 1] = [SUIM_COLOURS[t + 1] for t in textures]
    return draw.to_underwater(rng, image), codes[instances]


def _write_targets(cfg: SynthesizeConfig, root: Path, progress: bool) -> dict[str, int]:
    counts = {}
    per_class = cfg.target_images_per_class
    for set_index, target in enumerate(TARGET_SETS):
        base = root / "targets" / target.name
        if target.layout == "suim":
            jobs = [(0, i) for i in range(2 * per_class)]
        else:
            jobs = [(k, i) for k in range(len(target.classes)) for i in range(per_class)]
        for k, i in tqdm(jobs, desc=f"synthesize {target.name}", disable=not progress):
            if target.layout == "deepglobe":
                image, mask = draw_target(cfg, set_index, k, i)
                _save_image(base / str(k + 1) / "test" / "origin" / f"{i + 1:04d}.jpg", image, "JPEG", quality=95)
                write_png_atomic(base / str(k + 1) / "test" / "groundtruth" / f"{i + 1:04d}.png", mask)
            elif target.layout == "fss1000":
                image, mask = draw_target(cfg, set_index, k, i)
                folder = base / target.classes[k].name
                _save_image(folder / f"{i + 1}.jpg", image, "JPEG", quality=95)
                write_png_atomic(folder / f"{i + 1}.png", mask)
            else:
                image, mask = draw_tiles(cfg, set_index, i)
                _save_image(base / "images" / f"{i + 1:04d}.jpg", image, "JPEG", quality=95)
                _save_image(base / "masks" / f"{i + 1:04d}.bmp", mask, "BMP")
        if target.layout == "fss1000":
            write_text_atomic(base / "test.txt", "".join(f"{c.name}\n" for c in target.classes))
        counts[target.name] = len(jobs)
    return counts


def _config_record(cfg: SynthesizeConfig) -> dict[str, Any]:
    # The output location is not part of the dataset's identity: a moved dataset still matches.
    record = cfg.model_dump(mode="json")
    record.pop("out")
    return record


def _check(cfg: SynthesizeConfig) -> None:
    if cfg.image_size < 96:
        raise ConfigError(f"synthesize.image_size must be >= 96 to fit a {usable_pixels(96)}-pixel object, "
                         f"got {cfg.image_size}")
    for key in ("train_images", "test_images", "val_images", "target_images_per_class", "max_objects"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"synthesize.{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.boundary_width <= 10 or cfg.max_objects > 20:
        raise ConfigError("synthesize.boundary_width must be in 0..10 and synthesize.max_objects in 1..20")


def synthesize(cfg: SynthesizeConfig, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the dataset to `out` (default `cfg.out`) and return its manifest.

    A complete dataset made with the same config is left untouched. Otherwise everything is written to
    `<out>.tmp-<pid>` and swapped in at the end, so a failed run never leaves a partial dataset at `out`.
    """
    _check(cfg)
    out = Path(out if out is not None else cfg.out)
    record = _config_record(cfg)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            old = read_json(manifest_path, "synthetic manifest")
        except DataError:
            old = {}  # unreadable: regenerate
        if old.get("complete") and old.get("config") == record and old.get("generator_version") == GENERATOR_VERSION:
            return old
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Only ever replace a dataset this function wrote (it always has a manifest), never a user's folder.
        raise DataError(f"{out}: exists and is not a synthetic dataset (no manifest.json); remove it or pick "
                        "another synthesize.out")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = _write_sources(cfg, tmp, progress)
        counts["targets"] = _write_targets(cfg, tmp, progress)
        write_json_atomic(tmp / "classes.json", {
            "classes": [asdict(c) | {"coco_category_id": coco_category_id(c.id)} for c in CLASSES],
            "folds": {str(i): list(range(5 * i + 1, 5 * i + 6)) for i in range(4)},
            "targets": [{"name": t.name, "layout": t.layout, "root": f"targets/{t.name}",
                         "classes": [c.name for c in t.classes]} for t in TARGET_SETS],
        })
        manifest = {"complete": True, "generator_version": GENERATOR_VERSION, "config": record, "counts": counts}
        write_json_atomic(tmp / "manifest.json", manifest)  # last: its presence means the rest is there
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap directories: move any old dataset aside, rename the new one in, then delete the old one.
    previous = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, previous)
    os.replace(tmp, out)
    shutil.rmtree(previous, ignore_errors=True)
    return manifest
