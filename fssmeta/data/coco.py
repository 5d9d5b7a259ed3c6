"""COCO 2014 reader: loads `instances_*.json` and renders each image's annotations once into a class-id PNG."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm import tqdm

from fssmeta.data.io import DataError, Problems, SampleRef, read_json, write_json_atomic, write_png_atomic
from fssmeta.episode import IGNORE_INDEX

COCO_SPLITS = {"train": "train2014", "test": "val2014"}
CROWD_MODES = ("foreground", "ignore")
MANIFEST_FORMAT = 1  # bump when the rendering rules change, so old caches are redrawn

# pycocotools' own createIndex raises a bare KeyError on a missing field: check the fields first.
_REQUIRED_FIELDS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "segmentation"),
    "categories": ("id",),
}


def annotation_path(root: Path, split: str) -> Path:
    if split not in COCO_SPLITS:
        raise DataError(f"unknown COCO split {split!r}; expected one of {sorted(COCO_SPLITS)}")
    return Path(root) / "annotations" / f"instances_{COCO_SPLITS[split]}.json"


def load_coco(root: Path, split: str) -> COCO:
    """The pycocotools index of `<root>/annotations/instances_<split dir>.json`, its structure checked."""
    path = annotation_path(root, split)
    data = read_json(path, what=f"COCO annotation file (expected <root>/annotations/{path.name})")
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in _REQUIRED_FIELDS:
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list top-level key '{key}'")
    problems = Problems(f"COCO annotation file {path}")
    for key, fields in _REQUIRED_FIELDS.items():
        for index, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                name = entry.get("id", f"#{index}") if isinstance(entry, dict) else f"#{index}"
                problems.add(path, f"{key} entry {name} lacks {', '.join(missing)}")
    problems.raise_if_any()
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def contiguous_ids(coco: COCO) -> dict[int, int]:
    """COCO category ids sorted ascending -> 1..N (N = 80 for COCO 2014; docs/protocol.md section 2)."""
    ids = sorted({int(cat["id"]) for cat in coco.dataset["categories"]})
    return {cat_id: index + 1 for index, cat_id in enumerate(ids)}


def _decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One annotation's segmentation (polygons, compressed or uncompressed RLE) as a bool (H, W) mask."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty polygon list")
        for polygon in segmentation:
            # pycocotools reads a 4-number "polygon" as a box without complaint: reject it here
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                count = len(polygon) if isinstance(polygon, list) else type(polygon).__name__
                raise ValueError(f"polygon with {count} numbers (needs an even count >= 6)")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
        if isinstance(segmentation["counts"], list):  # uncompressed RLE (iscrowd regions)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
    else:
        raise ValueError("segmentation is neither a polygon list nor an RLE dict")
    return mask_utils.decode(rle).astype(bool)


def render_image(
    anns: list[dict], height: int, width: int, id_map: dict[int, int], crowd: str
) -> tuple[np.ndarray, list[str]]:
    """The uint8 (H, W) class-id mask of one image, and one message per annotation that failed to decode."""
    errors = []
    instances = []  # (pixel count, annotation id, contiguous class, iscrowd, bool mask)
    for ann in anns:
        try:
            binary = _decode(ann["segmentation"], height, width)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            errors.append(f"annotation {ann['id']}: malformed segmentation ({exc})")
            continue
        instances.append((int(binary.sum()), ann["id"], id_map[ann["category_id"]], bool(ann.get("iscrowd")), binary))
    # largest first, so a small object lying on a large one is still visible; id breaks ties deterministically
    instances.sort(key=lambda inst: (-inst[0], inst[1]))
    label = np.zeros((height, width), dtype=np.uint8)
    covered = np.zeros((height, width), dtype=bool)
    for _, _, class_id, is_crowd, binary in instances:
        if is_crowd and crowd == "ignore":
            continue
        label[binary] = class_id
        covered |= binary
    if crowd == "ignore":
        # a crowd region is ignored only where no individual instance already gives a label
        for _, _, _, is_crowd, binary in instances:
            if is_crowd:
                label[binary & ~covered] = IGNORE_INDEX
    return label, errors


def _fingerprint(ann_path: Path, crowd: str, id_map: dict[int, int]) -> dict:
    stat = ann_path.stat()
    fingerprint = {
        "format": MANIFEST_FORMAT,
        "annotation_file": ann_path.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "crowd": crowd,
        "category_ids": {str(k): v for k, v in id_map.items()},
    }
    return json.loads(json.dumps(fingerprint))  # normalised exactly as a manifest read back from disk


def render_coco_masks(
    root: Path,
    split: str,
    cache_dir: Path,
    crowd: Literal["foreground", "ignore"],
    progress: bool = True,
) -> list[SampleRef]:
    """Render (or reuse) `cache_dir/<split dir>/<image_id>.png` for every image; refs sorted by image id.

    The cache is valid while the manifest matches the annotation file's size and mtime, the crowd mode and
    the id map; then only PNGs that went missing are drawn. Every bad input is reported in one DataError.
    """
    if crowd not in CROWD_MODES:
        raise DataError(f"unknown crowd mode {crowd!r}; expected one of {CROWD_MODES}")
    root, cache_dir = Path(root), Path(cache_dir)
    ann_path = annotation_path(root, split)
    coco = load_coco(root, split)
    id_map = contiguous_ids(coco)
    out_dir = cache_dir / COCO_SPLITS[split]
    manifest_path = out_dir / "manifest.json"
    fingerprint = _fingerprint(ann_path, crowd, id_map)

    problems = Problems(f"COCO {split} split ({ann_path})")
    for ann in coco.dataset["annotations"]:
        if ann["image_id"] not in coco.imgs:
            problems.add(ann_path, f"annotation {ann['id']}: unknown image id {ann['image_id']}")
        if ann["category_id"] not in id_map:
            problems.add(ann_path, f"annotation {ann['id']}: unknown category id {ann['category_id']}")
    images = sorted(coco.dataset["images"], key=lambda img: img["id"])
    refs = []
    for img in images:
        image_path = root / COCO_SPLITS[split] / img["file_name"]
        if not image_path.is_file():
            problems.add(ann_path, f"image {img['id']}: file {image_path} is listed but missing")
        refs.append(SampleRef(key=str(img["id"]), image=image_path, mask=out_dir / f"{img['id']}.png"))

    fresh = manifest_path.is_file() and _read_manifest(manifest_path) == fingerprint
    if not fresh:
        # the old PNGs may follow other rules: without a manifest a crash midway means "redraw everything"
        manifest_path.unlink(missing_ok=True)
    todo = [(img, ref) for img, ref in zip(images, refs) if not (fresh and ref.mask.is_file())]
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips numpy 2's copy=False deprecation on every call; it is harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        for img, ref in tqdm(todo, desc=f"COCO {split} masks", disable=not progress or not todo):
            # an unknown category is already reported above; rendering the rest still finds other bad ones
            anns = [ann for ann in coco.imgToAnns.get(img["id"], []) if ann["category_id"] in id_map]
            label, errors = render_image(anns, int(img["height"]), int(img["width"]), id_map, crowd)
            for error in errors:
                problems.add(ann_path, f"image {img['id']}, {error}")
            if not errors:
                write_png_atomic(ref.mask, label)
    problems.raise_if_any()
    if not fresh:
        write_json_atomic(manifest_path, fingerprint)  # last: it vouches for every PNG above
    return refs


def _read_manifest(path: Path) -> Any:
    try:
        return read_json(path, what="COCO mask cache manifest")
    except DataError:
        return None  # a damaged manifest only means the cache is redrawn
