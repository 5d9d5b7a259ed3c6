"""COCO 2014 reader: loads `instances_*.json` and renders each image's annotations once into a class-id PNG."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm import tqdm

from fssmeta.data.io import (
    DataError,
    Problems,
    SampleRef,
    image_size,
    read_json,
    write_json_atomic,
    write_png_atomic,
)
from fssmeta.episode import IGNORE_INDEX

COCO_SPLITS = {"train": "train2014", "test": "val2014"}
CROWD_MODES = ("foreground", "ignore")
EMPTY_SEGMENTATION_MODES = ("skip", "error")
MANIFEST_FORMAT = 2  # bump when the rendering rules change, so old caches are redrawn
# The 80 COCO category ids: 1..90 less the ten ids no category uses. Fixed rather than read from a file's
# `categories`, so that a file listing only the classes it uses cannot shift the contiguous ids.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
PROBLEMS_PER_KIND = 20

# pycocotools' own createIndex raises a bare KeyError on a missing field: check the fields first.
_REQUIRED_FIELDS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "segmentation"),
    "categories": ("id",),
}


class CocoProblems(Problems):
    """`Problems` that lists at most `per_kind` messages of each kind, then counts the rest: one bad
    category id repeated on thousands of annotations must not push a wrong image size out of the report."""

    def __init__(self, what: str, per_kind: int = PROBLEMS_PER_KIND) -> None:
        super().__init__(what)
        self.per_kind = per_kind
        self.kinds: list[str] = []  # the kind of each entry of `items`

    def add(self, path: str | Path, message: str, kind: str = "other") -> None:
        super().add(path, message)
        self.kinds.append(kind)

    def add_error(self, error: DataError, kind: str = "other") -> None:
        super().add_error(error)
        self.kinds.append(kind)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        seen: Counter[str] = Counter()
        shown = []
        for item, kind in zip(self.items, self.kinds):
            seen[kind] += 1
            if seen[kind] <= self.per_kind:
                shown.append(item)
        shown += [f"... and {n - self.per_kind} more '{kind}' problem(s)"
                  for kind, n in seen.items() if n > self.per_kind]
        raise DataError(f"{self.what}: {len(self.items)} problem(s)\n  " + "\n  ".join(shown))


def annotation_path(root: Path, split: str) -> Path:
    if split not in COCO_SPLITS:
        raise DataError(f"unknown COCO split {split!r}; expected one of {sorted(COCO_SPLITS)}")
    return Path(root) / "annotations" / f"instances_{COCO_SPLITS[split]}.json"


def load_coco(root: Path, split: str) -> COCO:
    """The pycocotools index of `<root>/annotations/instances_<split dir>.json`, its structure checked."""
    path = annotation_path(root, split)
    problems = CocoProblems(f"COCO annotation file {path}")
    coco = _read_index(path, problems)
    problems.raise_if_any()
    assert coco is not None  # None comes only with a problem, raised above
    return coco


def _read_index(path: Path, problems: CocoProblems) -> COCO | None:
    """The index of one annotation file, or None with its structural problems added to `problems`."""
    try:
        data = read_json(path, what=f"COCO annotation file (expected <root>/annotations/{path.name})")
    except DataError as exc:
        problems.add_error(exc, "annotation file")
        return None
    if not isinstance(data, dict):
        problems.add(path, f"top level must be a JSON object, got {type(data).__name__}", "annotation file")
        return None
    missing_keys = [key for key in _REQUIRED_FIELDS if not isinstance(data.get(key), list)]
    for key in missing_keys:
        problems.add(path, f"missing or non-list top-level key '{key}'", "annotation file")
    if missing_keys:
        return None
    before = len(problems)
    for key, fields in _REQUIRED_FIELDS.items():
        for index, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                name = entry.get("id", f"#{index}") if isinstance(entry, dict) else f"#{index}"
                problems.add(path, f"{key} entry {name} lacks {', '.join(missing)}", "missing field")
    if len(problems) > before:
        return None
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def contiguous_ids(category_ids: Sequence[int] = COCO_CATEGORY_IDS) -> dict[int, int]:
    """Category ids, in the order given, -> 1..N (the 80 COCO ids -> 1..80; docs/protocol.md section 1)."""
    return {int(cat_id): index + 1 for index, cat_id in enumerate(category_ids)}


def _is_empty(segmentation: Any) -> bool:
    return isinstance(segmentation, list) and not segmentation


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


def _fingerprint(ann_path: Path, crowd: str, empty_segmentation: str, id_map: dict[int, int]) -> dict:
    stat = ann_path.stat()
    return {
        "format": MANIFEST_FORMAT,
        "annotation_file": ann_path.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "crowd": crowd,
        "empty_segmentation": empty_segmentation,
        "category_ids": {str(k): v for k, v in id_map.items()},
    }


def render_coco_masks(
    root: Path,
    split: str,
    cache_dir: Path,
    crowd: Literal["foreground", "ignore"],
    progress: bool = True,
    *,
    category_ids: Sequence[int] = COCO_CATEGORY_IDS,
    empty_segmentation: Literal["skip", "error"] = "skip",
    problems: CocoProblems | None = None,
) -> list[SampleRef]:
    """Render (or reuse) `cache_dir/<split dir>/<image_id>.png` for every image; refs sorted by image id.

    `category_ids` map, in order, to the class ids 1..N. The cache is valid while the manifest matches the
    annotation file's size and mtime, the crowd and empty-segmentation modes and the id map; then only PNGs
    that went missing are drawn. Every bad input is reported in one DataError; with `problems` they are
    added there instead and the caller raises, so that `prepare` reports both splits in one run.
    """
    if crowd not in CROWD_MODES:
        raise DataError(f"unknown crowd mode {crowd!r}; expected one of {CROWD_MODES}")
    if empty_segmentation not in EMPTY_SEGMENTATION_MODES:
        raise DataError(f"unknown empty-segmentation mode {empty_segmentation!r}; "
                        f"expected one of {EMPTY_SEGMENTATION_MODES}")
    root, cache_dir = Path(root), Path(cache_dir)
    ann_path = annotation_path(root, split)
    own = problems is None
    problems = CocoProblems(f"COCO {split} split ({ann_path})") if problems is None else problems
    before = len(problems)
    coco = _read_index(ann_path, problems)
    if coco is None:
        if own:
            problems.raise_if_any()
        return []  # the caller raises
    id_map = contiguous_ids(category_ids)
    out_dir = cache_dir / COCO_SPLITS[split]
    manifest_path = out_dir / "manifest.json"

    skipped = _check_annotations(coco, ann_path, id_map, empty_segmentation, problems)
    images = sorted(coco.dataset["images"], key=lambda img: img["id"])
    refs = [SampleRef(key=str(img["id"]), image=root / COCO_SPLITS[split] / img["file_name"],
                      mask=out_dir / f"{img['id']}.png") for img in images]
    bad_images = _check_images(images, [ref.image for ref in refs], ann_path, problems)
    if skipped:
        ids = skipped[:PROBLEMS_PER_KIND]
        warnings.warn(f"{ann_path}: left out {len(skipped)} annotation(s) with an empty segmentation "
                      f"(data.coco_empty_segmentation: skip): ids {ids}{' ...' if len(skipped) > len(ids) else ''}",
                      stacklevel=2)

    manifest = {**_fingerprint(ann_path, crowd, empty_segmentation, id_map), "skipped_empty_segmentation": skipped}
    manifest = json.loads(json.dumps(manifest))  # normalised exactly as a manifest read back from disk
    fresh = manifest_path.is_file() and _read_manifest(manifest_path) == manifest
    if not fresh:
        # the old PNGs may follow other rules: without a manifest a crash midway means "redraw everything"
        manifest_path.unlink(missing_ok=True)
    todo = [(img, ref) for img, ref in zip(images, refs) if not (fresh and ref.mask.is_file())]
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips numpy 2's copy=False deprecation on every call; it is harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        for img, ref in tqdm(todo, desc=f"COCO {split} masks", disable=not progress or not todo):
            # bad categories and empty segmentations are already reported (or skipped) above
            anns = [ann for ann in coco.imgToAnns.get(img["id"], [])
                    if ann["category_id"] in id_map and not _is_empty(ann["segmentation"])]
            label, errors = render_image(anns, int(img["height"]), int(img["width"]), id_map, crowd)
            for error in errors:
                problems.add(ann_path, f"image {img['id']}, {error}", "malformed segmentation")
            if not errors and img["id"] not in bad_images:  # a PNG at a wrong stated size would mislead
                write_png_atomic(ref.mask, label)
    if own:
        problems.raise_if_any()
    if len(problems) == before and not fresh:
        write_json_atomic(manifest_path, manifest)  # last: it vouches for every PNG above
    return refs


def _check_annotations(coco: COCO, ann_path: Path, id_map: dict[int, int], empty_segmentation: str,
                       problems: CocoProblems) -> list[int]:
    """Report annotations with an unknown image or category id, and empty segmentations in `error` mode;
    return the ids of the empty ones that `skip` leaves out."""
    skipped = []
    for ann in coco.dataset["annotations"]:
        where = f"annotation {ann['id']}"
        if ann["image_id"] not in coco.imgs:
            problems.add(ann_path, f"{where}: unknown image id {ann['image_id']}", "unknown image id")
        if ann["category_id"] not in id_map:
            problems.add(ann_path, f"{where}: unknown category id {ann['category_id']} (not one of the "
                         f"{len(id_map)} category ids)", "unknown category id")
        if not _is_empty(ann["segmentation"]):
            continue
        if empty_segmentation == "skip":
            skipped.append(ann["id"])
        else:
            file_name = coco.imgs.get(ann["image_id"], {}).get("file_name", "not listed")
            problems.add(ann_path, f"{where} of image {ann['image_id']} ({file_name}): empty segmentation []; "
                         "data.coco_empty_segmentation: skip leaves such annotations out", "empty segmentation")
    return skipped


def _check_images(images: list[dict], paths: list[Path], ann_path: Path, problems: CocoProblems) -> set[int]:
    """Report listed images that are missing, unreadable or of another size than their entry states; return
    the ids of those of the wrong size, whose masks must not be written."""
    wrong_size = set()
    for img, path in zip(images, paths):
        if not path.is_file():
            problems.add(ann_path, f"image {img['id']}: file {path} is listed but missing", "missing image")
            continue
        try:
            height, width = image_size(path)  # the header only: cheap beside the decode in `prepare`
        except DataError as exc:
            problems.add_error(exc, "unreadable image")
            continue
        if (height, width) != (img["height"], img["width"]):
            # named against the JSON entry: a mask drawn at the stated size would only fail later, in `prepare`
            problems.add(ann_path, f"image {img['id']} ({img['file_name']}): stated size {img['width']}x"
                         f"{img['height']} differs from the image file's {width}x{height} (width x height)",
                         "image size")
            wrong_size.add(img["id"])
    return wrong_size


def _read_manifest(path: Path) -> Any:
    try:
        return read_json(path, what="COCO mask cache manifest")
    except DataError:
        return None  # a damaged manifest only means the cache is redrawn
