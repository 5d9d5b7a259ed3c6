"""COCO reader: a tiny generated COCO 2014 layout with every segmentation encoding, rendered and checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from fssmeta.config import DataConfig
from fssmeta.data.coco import COCO_CATEGORY_IDS, COCO_SPLITS, contiguous_ids, load_coco, render_coco_masks
from fssmeta.data.folds import COCO_CLASSES
from fssmeta.data.io import DataError

# a subset, listed out of order: the ids still map by the fixed 80 (person, airplane, dog, toothbrush -> 1, 5, 17, 80)
CATEGORIES = [
    {"id": 90, "name": "toothbrush"},
    {"id": 1, "name": "person"},
    {"id": 18, "name": "dog"},
    {"id": 5, "name": "airplane"},
]
SIZES = {101: (8, 10), 102: (6, 6), 103: (5, 7)}  # image id -> (H, W)


def rect(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}  # as the JSON files hold it


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a background run, as COCO's iscrowd regions are stored."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def annotations() -> list[dict]:
    return [
        # image 101: a small person (compressed RLE) listed BEFORE the large dog (polygon) that contains it
        {"id": 11, "image_id": 101, "category_id": 1, "iscrowd": 0,
         "segmentation": compressed_rle(rect(8, 10, slice(2, 4), slice(2, 4)))},
        {"id": 12, "image_id": 101, "category_id": 18, "iscrowd": 0,
         "segmentation": [[1, 1, 7, 1, 7, 5, 1, 5]]},  # covers rows 1..4, cols 1..6
        # image 102: an airplane (uncompressed RLE) and a larger crowd of toothbrushes overlapping row 2
        {"id": 21, "image_id": 102, "category_id": 5, "iscrowd": 0,
         "segmentation": uncompressed_rle(rect(6, 6, slice(0, 3), slice(0, 6)))},
        {"id": 22, "image_id": 102, "category_id": 90, "iscrowd": 1,
         "segmentation": uncompressed_rle(rect(6, 6, slice(2, 6), slice(0, 6)))},
    ]


def make_coco(root: Path, anns: list[dict] | None = None, split_dir: str = "train2014",
              categories: list[dict] | None = None) -> Path:
    images = []
    for image_id, (height, width) in SIZES.items():
        name = f"COCO_{split_dir}_{image_id:012d}.jpg"
        (root / split_dir).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (image_id, 0, 0)).save(root / split_dir / name)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    data = {"images": images, "annotations": annotations() if anns is None else anns,
            "categories": CATEGORIES if categories is None else categories}
    path = root / "annotations" / f"instances_{split_dir}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def expected_101() -> np.ndarray:
    label = np.zeros((8, 10), dtype=np.uint8)
    label[1:5, 1:7] = 17  # dog
    label[2:4, 2:4] = 1  # person, painted after the larger dog
    return label


def test_contiguous_ids_are_the_fixed_80() -> None:
    id_map = contiguous_ids()
    assert len(COCO_CATEGORY_IDS) == len(COCO_CLASSES) == 80 and list(id_map.values()) == list(range(1, 81))
    assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}.isdisjoint(id_map)
    assert (id_map[1], id_map[13], id_map[18], id_map[90]) == (1, 12, 17, 80)
    assert COCO_CLASSES[id_map[13] - 1] == "stop sign" and COCO_CLASSES[id_map[90] - 1] == "toothbrush"


def test_class_ids_ignore_the_files_categories(tmp_path: Path) -> None:
    # the file lists only the 5 categories it uses: sorting those would make stop sign (13) class 3, not 12
    anns = [{"id": 41, "image_id": 103, "category_id": 13, "iscrowd": 0, "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3]]}]
    make_coco(tmp_path, annotations() + anns, categories=[*CATEGORIES, {"id": 13, "name": "stop sign"}])
    refs = render_coco_masks(tmp_path, "train", tmp_path / "cache", crowd="foreground", progress=False)
    assert set(np.unique(read_png(refs[2].mask))) == {0, 12}
    np.testing.assert_array_equal(read_png(refs[0].mask), expected_101())


def test_category_outside_the_80_is_an_error(tmp_path: Path) -> None:
    # 26 is one of the ten unused ids: listing it in `categories` does not make it a class
    anns = annotations() + [{"id": 41, "image_id": 103, "category_id": 26, "iscrowd": 0,
                             "segmentation": [[0, 0, 3, 0, 3, 3]]}]
    ann_path = make_coco(tmp_path, anns, categories=[*CATEGORIES, {"id": 26, "name": "hat"}])
    with pytest.raises(DataError) as info:
        render_coco_masks(tmp_path, "train", tmp_path / "cache", crowd="foreground", progress=False)
    assert f"{ann_path}: annotation 41: unknown category id 26 (not one of the 80 category ids)" in str(info.value)


@pytest.mark.parametrize("crowd", ["foreground", "ignore"])
def test_render_pixels(tmp_path: Path, crowd: str) -> None:
    make_coco(tmp_path)
    refs = render_coco_masks(tmp_path, "train", tmp_path / "cache", crowd=crowd, progress=False)
    assert [r.key for r in refs] == ["101", "102", "103"]
    assert refs[0].image == tmp_path / "train2014" / "COCO_train2014_000000000101.jpg"
    assert refs[0].mask == tmp_path / "cache" / "train2014" / "101.png"
    np.testing.assert_array_equal(read_png(refs[0].mask), expected_101())

    label_102 = np.zeros((6, 6), dtype=np.uint8)
    label_102[0:3] = 5  # the airplane keeps the overlapping row 2 in both modes
    label_102[3:6] = 80 if crowd == "foreground" else 255
    np.testing.assert_array_equal(read_png(refs[1].mask), label_102)
    np.testing.assert_array_equal(read_png(refs[2].mask), np.zeros((5, 7), dtype=np.uint8))

    manifest = json.loads((tmp_path / "cache" / "train2014" / "manifest.json").read_text())
    assert manifest["crowd"] == crowd
    assert manifest["category_ids"] == {str(k): v for k, v in contiguous_ids().items()}
    assert manifest["empty_segmentation"] == "skip" and manifest["skipped_empty_segmentation"] == []


def test_test_split_uses_val2014(tmp_path: Path) -> None:
    make_coco(tmp_path, split_dir=COCO_SPLITS["test"])
    refs = render_coco_masks(tmp_path, "test", tmp_path / "cache", crowd="ignore", progress=False)
    assert refs[0].mask.parent == tmp_path / "cache" / "val2014"
    np.testing.assert_array_equal(read_png(refs[0].mask), expected_101())


def test_cache_reused_then_refreshed(tmp_path: Path) -> None:
    ann_path = make_coco(tmp_path)
    cache = tmp_path / "cache"
    refs = render_coco_masks(tmp_path, "train", cache, crowd="ignore", progress=False)
    mtimes = [r.mask.stat().st_mtime_ns for r in refs]
    manifest_mtime = (cache / "train2014" / "manifest.json").stat().st_mtime_ns

    again = render_coco_masks(tmp_path, "train", cache, crowd="ignore", progress=False)
    assert again == refs
    assert [r.mask.stat().st_mtime_ns for r in refs] == mtimes
    assert (cache / "train2014" / "manifest.json").stat().st_mtime_ns == manifest_mtime

    # a PNG that went missing is redrawn alone
    refs[2].mask.unlink()
    render_coco_masks(tmp_path, "train", cache, crowd="ignore", progress=False)
    assert refs[2].mask.is_file()
    assert [r.mask.stat().st_mtime_ns for r in refs[:2]] == mtimes[:2]

    # another crowd mode redraws everything
    render_coco_masks(tmp_path, "train", cache, crowd="foreground", progress=False)
    assert read_png(refs[1].mask)[5, 0] == 80
    assert json.loads((cache / "train2014" / "manifest.json").read_text())["crowd"] == "foreground"

    # an edited annotation file (new mtime) redraws too: a PNG scribbled over comes back
    Image.fromarray(np.zeros((8, 10), dtype=np.uint8)).save(refs[0].mask)
    render_coco_masks(tmp_path, "train", cache, crowd="foreground", progress=False)
    assert not read_png(refs[0].mask).any()  # same inputs: the cache is trusted
    os.utime(ann_path, ns=(ann_path.stat().st_atime_ns, ann_path.stat().st_mtime_ns + 10**9))
    render_coco_masks(tmp_path, "train", cache, crowd="foreground", progress=False)
    np.testing.assert_array_equal(read_png(refs[0].mask), expected_101())
    assert json.loads((cache / "train2014" / "manifest.json").read_text())["mtime_ns"] == ann_path.stat().st_mtime_ns


def test_bad_inputs_all_reported(tmp_path: Path) -> None:
    anns = annotations() + [
        {"id": 31, "image_id": 101, "category_id": 12, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]},
        {"id": 32, "image_id": 103, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 2, 0]]},
        {"id": 33, "image_id": 103, "category_id": 5, "iscrowd": 1,
         "segmentation": {"size": [5, 7], "counts": [3, 100]}},  # runs overflow the image: pycocotools raises
        {"id": 34, "image_id": 999, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]},
    ]
    ann_path = make_coco(tmp_path, anns)
    (tmp_path / "train2014" / "COCO_train2014_000000000102.jpg").unlink()
    with pytest.raises(DataError) as info:
        render_coco_masks(tmp_path, "train", tmp_path / "cache", crowd="ignore", progress=False)
    message = str(info.value)
    assert "5 problem(s)" in message
    lines = message.splitlines()[1:]  # one line per problem under the header, each naming the JSON file
    assert len(lines) == 5 and all(str(ann_path) in line for line in lines), message
    assert any("annotation 31" in line and "unknown category id 12" in line for line in lines)
    assert any("annotation 32" in line and "polygon with 4 numbers" in line for line in lines)
    assert any("annotation 33" in line and "malformed segmentation" in line for line in lines)
    assert any("annotation 34" in line and "unknown image id 999" in line for line in lines)
    assert any("image 102" in line and "COCO_train2014_000000000102.jpg" in line for line in lines)
    assert not (tmp_path / "cache" / "train2014" / "manifest.json").exists()


def test_load_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "annotations" / "instances_train2014.json"
    with pytest.raises(DataError, match="instances_train2014.json.*not found"):
        load_coco(tmp_path, "train")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(DataError, match="instances_train2014.json: malformed JSON"):
        load_coco(tmp_path, "train")
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="instances_train2014.json: missing .*'categories'"):
        load_coco(tmp_path, "train")
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match="images entry 1 lacks file_name, height, width"):
        load_coco(tmp_path, "train")


def test_unknown_split_and_crowd_mode(tmp_path: Path) -> None:
    make_coco(tmp_path)
    with pytest.raises(DataError, match="unknown COCO split"):
        load_coco(tmp_path, "val")
    with pytest.raises(DataError, match="unknown crowd mode"):
        render_coco_masks(tmp_path, "train", tmp_path / "cache", crowd="drop", progress=False)  # type: ignore[arg-type]


def test_wrong_stated_size_named_against_the_annotation_file(tmp_path: Path) -> None:
    ann_path = make_coco(tmp_path)
    name = "COCO_train2014_000000000103.jpg"
    Image.new("RGB", (9, 5)).save(tmp_path / "train2014" / name)  # the entry states 7x5
    with pytest.raises(DataError) as info:
        render_coco_masks(tmp_path, "train", tmp_path / "cache", crowd="foreground", progress=False)
    message = str(info.value)
    assert "1 problem(s)" in message and ".png" not in message, message
    assert f"{ann_path}: image 103 ({name}): stated size 7x5 differs from the image file's 9x5" in message
    assert not (tmp_path / "cache" / "train2014" / "103.png").exists()


def test_empty_segmentation_skipped_or_an_error(tmp_path: Path) -> None:
    empty = {"id": 41, "image_id": 103, "category_id": 1, "iscrowd": 0, "segmentation": []}
    ann_path = make_coco(tmp_path, annotations() + [empty])
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match=r"left out 1 annotation\(s\) with an empty segmentation .*ids \[41\]"):
        refs = render_coco_masks(tmp_path, "train", cache, crowd="foreground", progress=False)
    assert not read_png(refs[2].mask).any()
    np.testing.assert_array_equal(read_png(refs[0].mask), expected_101())
    manifest = json.loads((cache / "train2014" / "manifest.json").read_text())
    assert manifest["empty_segmentation"] == "skip" and manifest["skipped_empty_segmentation"] == [41]

    # the mode is part of the cache fingerprint: `error` does not trust the PNGs drawn under `skip`
    with pytest.raises(DataError) as info:
        render_coco_masks(tmp_path, "train", cache, crowd="foreground", progress=False, empty_segmentation="error")
    assert (f"{ann_path}: annotation 41 of image 103 (COCO_train2014_000000000103.jpg): empty segmentation []"
            in str(info.value))
    assert not (cache / "train2014" / "manifest.json").exists()
    assert DataConfig().coco_empty_segmentation == "skip"


def test_problems_capped_per_kind(tmp_path: Path) -> None:
    bad = [{"id": 100 + i, "image_id": 101, "category_id": 83, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2]]}
           for i in range(25)]
    make_coco(tmp_path, annotations() + bad)
    (tmp_path / "train2014" / "COCO_train2014_000000000102.jpg").unlink()
    with pytest.raises(DataError) as info:
        render_coco_masks(tmp_path, "train", tmp_path / "cache", crowd="foreground", progress=False)
    lines = str(info.value).splitlines()
    assert "26 problem(s)" in lines[0]
    assert sum("unknown category id 83" in line for line in lines) == 20
    assert any("image 102" in line and "listed but missing" in line for line in lines)  # not crowded out
    assert lines[-1].strip() == "... and 5 more 'unknown category id' problem(s)"
