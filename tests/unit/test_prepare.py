"""PASCAL reader, the protocol filters and every bad input `prepare` must report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from fssmeta.config import DataConfig
from fssmeta.data.io import DataError, read_mask
from fssmeta.data.pascal import read_list, voc_pools
from fssmeta.data.prepare import fold_lists, load_fold, prepare
from tests.conftest import box_mask, write_voc
from tests.unit.test_coco import annotations, make_coco


def voc_config(root, tmp_path, **kw) -> DataConfig:
    return DataConfig(dataset="pascal", root=str(root), prepared=str(tmp_path / "prepared"), **kw)


def test_list_formats_and_pools(tiny_voc, tmp_path):
    assert read_list(tiny_voc / "ImageSets/SegmentationAug/train_noval.txt")[:2] == ["tr10", "tr11"]
    pools = voc_pools(voc_config(tiny_voc, tmp_path), tiny_voc)
    assert [r.key for r in pools["train"]] == [f"tr{i:02d}" for i in range(20)]
    assert len(pools["test"]) == 20 and len(pools["val"]) == 4
    assert pools["train"][0].mask == tiny_voc / "SegmentationClassAug" / "tr00.png"
    hsnet = voc_pools(voc_config(tiny_voc, tmp_path, train_pool="hsnet"), tiny_voc)
    # trainaug minus the test list: every mask that is not a test image (the val images included)
    assert {r.key for r in hsnet["train"]} == {f"tr{i:02d}" for i in range(20)} | {f"va{i:02d}" for i in range(4)}


def test_palette_masks_read_as_class_ids(tiny_voc):
    palette = Image.open(tiny_voc / "SegmentationClass" / "te00.png")
    assert palette.mode == "P"
    np.testing.assert_array_equal(read_mask(tiny_voc / "SegmentationClass" / "te00.png"),
                                  read_mask(tiny_voc / "SegmentationClassAug" / "te00.png"))
    # an RGB conversion would have destroyed the ids: read_mask refuses RGB masks outright
    Image.open(tiny_voc / "SegmentationClass" / "te00.png").convert("RGB").save(tiny_voc / "rgb.png")
    with pytest.raises(DataError, match=r"rgb.png: mask must be a single-channel 8-bit or palette PNG, got mode RGB$"):
        read_mask(tiny_voc / "rgb.png")


def test_prepare_filters(tiny_voc, tmp_path):
    summary = prepare(voc_config(tiny_voc, tmp_path), progress=False)
    assert summary["pools"] == {"train": 20, "test": 20, "val": 4}
    fold0 = load_fold(tmp_path / "prepared", 0)
    assert fold0["novel"] == [1, 2, 3, 4, 5]
    # exclude_novel_images drops tr00..tr04 (novel classes) and tr16 (a 36-pixel class-2 distractor)
    assert [k for k, _ in fold0["train"]] == [f"tr{i:02d}" for i in range(5, 20) if i != 16]
    assert fold0["train"][0] == ["tr05", [6]]
    assert ["tr08", [9]] in fold0["train"]  # its 36-pixel class-14 object fails the small-object rule
    assert [k for k, _ in fold0["test"]] == [f"te{i:02d}" for i in range(5)]
    assert fold0["test"][0] == ["te00", [1]] and fold0["test"][1] == ["te01", [2]]
    assert fold0["val"] == [["va00", [1]], ["va01", [2]], ["va02", [1]], ["va03", [2]]]
    # the small-object rule drops te19 (a 10x10 object, 80 pixels once the band rows are 255)
    assert [k for k, _ in load_fold(tmp_path / "prepared", 3)["test"]] == ["te15", "te16", "te17", "te18"]
    index = json.loads((tmp_path / "prepared" / "index.json").read_text())
    assert index["protocol"]["exclude_novel_images"] is True
    assert index["pools"]["test"][19]["pixels"] == {"20": 80}
    # the all-classes source split: nothing held out, so nothing excluded; its validation holds out images
    every = load_fold(tmp_path / "prepared", "all")
    assert every["fold"] == "all" and every["novel"] == [] and every["base"] == list(range(1, 21))
    assert [k for k, _ in every["train"]] == [f"tr{i:02d}" for i in range(20)]  # tr16 too (with class 17 only:
    assert ["tr16", [17]] in every["train"] and ["tr00", [1]] in every["train"]  # its distractor is too small)
    assert every["val"] == [["va00", [1]], ["va01", [2]], ["va02", [1]], ["va03", [2]]]
    assert [k for k, _ in every["test"]] == [f"te{i:02d}" for i in range(19)]  # te19 fails the small-object rule


def test_filter_switches(tiny_voc, tmp_path):
    prepare(voc_config(tiny_voc, tmp_path), progress=False)
    index = json.loads((tmp_path / "prepared" / "index.json").read_text())
    keep = fold_lists(index, voc_config(tiny_voc, tmp_path, exclude_novel_images=False), 0)
    assert len(keep["train"]) == 15  # PFENet/HSNet keep tr16 (novel pixels become background)
    no_filter = fold_lists(index, voc_config(tiny_voc, tmp_path, min_object_pixels=0, exclude_novel_images=False), 0)
    assert ["tr08", [9, 14]] in no_filter["train"] and ["tr16", [17]] in no_filter["train"]
    assert ["tr00", [6]] in no_filter["train"]  # an image of a novel class still trains on its base object
    assert fold_lists(index, voc_config(tiny_voc, tmp_path, min_object_pixels=0), 3)["test"][-1] == ["te19", [20]]
    with pytest.raises(DataError, match=r"fold 0: no train images left after the filters \(data.min_object_pixels=99999"):
        fold_lists(index, voc_config(tiny_voc, tmp_path, min_object_pixels=99999), 0)


def test_hsnet_pool_lists_one_entry_per_image_and_class(tmp_path):
    # every image holds two classes of 64x32 pixels: c and c+10 (mod 20), so each fold trains and tests
    masks = {f"a{c:02d}": box_mask((64, 64), [(c, 0, 0, 64, 32), (c % 20 + 1 if c > 10 else c + 10, 0, 32, 64, 32)])
             for c in range(1, 21)}
    root = write_voc(tmp_path / "VOC2012", masks, [], [])
    (root / "ImageSets/Segmentation/val.txt").write_text("a01\na06\na11\na16\n")
    prepare(voc_config(root, tmp_path, train_pool="hsnet", val_list="", exclude_novel_images=False), progress=False)
    train = load_fold(tmp_path / "prepared", 0)["train"]
    assert all(len(classes) == 1 for _, classes in train)
    assert ["a07", [7]] in train and ["a07", [17]] in train


def test_prepare_reports_every_bad_file_at_once(tmp_path):
    masks = {f"i{i}": box_mask((32, 32), [(6, 0, 0, 32, 32)]) for i in range(6)}
    masks["t0"] = box_mask((32, 32), [(1, 0, 0, 32, 32)])
    root = write_voc(tmp_path / "VOC2012", masks, [f"i{i}" for i in range(6)], ["t0"])
    (root / "JPEGImages" / "i0.jpg").write_bytes(b"not a jpeg")  # corrupt image
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(root / "SegmentationClassAug" / "i1.png")  # size mismatch
    Image.fromarray(np.full((32, 32), 42, np.uint8)).save(root / "SegmentationClassAug" / "i2.png")  # bad id
    (root / "SegmentationClassAug" / "i3.png").unlink()  # missing mask
    (root / "JPEGImages" / "i4.jpg").unlink()  # missing image
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as err:
        prepare(voc_config(root, tmp_path), progress=False)
    message = str(err.value)
    assert "5 problem(s)" in message
    assert "i0.jpg: unreadable or corrupt image" in message
    assert "i1.png: mask size 32x16 differs from its image" in message
    assert "i2.png: class ids [42] out of range (expected 0..20 or 255)" in message
    assert "i3.png: mask file not found" in message
    assert "i4.jpg: image file not found" in message
    assert not out.exists()  # nothing half-written


def test_missing_root_and_list(tmp_path):
    with pytest.raises(DataError, match="nowhere: dataset root not found"):
        prepare(voc_config(tmp_path / "nowhere", tmp_path), progress=False)
    root = tmp_path / "VOC2012"
    (root / "SegmentationClassAug").mkdir(parents=True)
    with pytest.raises(DataError, match=r"ImageSets/Segmentation/val.txt: list file not found"):
        prepare(voc_config(root, tmp_path), progress=False)


def test_failed_prepare_keeps_previous_outputs(tiny_voc, tmp_path):
    prepare(voc_config(tiny_voc, tmp_path), progress=False)
    before = (tmp_path / "prepared" / "fold0.json").read_bytes()
    (tiny_voc / "JPEGImages" / "tr01.jpg").write_bytes(b"broken")
    with pytest.raises(DataError):
        prepare(voc_config(tiny_voc, tmp_path), progress=False)
    assert (tmp_path / "prepared" / "fold0.json").read_bytes() == before
    assert not list((tmp_path / "prepared").glob(".*tmp"))


def test_prepare_reports_every_coco_problem_at_once(tmp_path):
    root = tmp_path / "COCO"
    train = make_coco(root, [*annotations(), {**annotations()[0], "id": 42, "category_id": 30}], "train2014")
    empty = {"id": 41, "image_id": 102, "category_id": 1, "iscrowd": 0, "segmentation": []}
    test = make_coco(root, [*annotations(), empty], "val2014")
    Image.new("RGB", (11, 8)).save(root / "val2014" / "COCO_val2014_000000000101.jpg")  # the entry states 10x8
    paths = {"root": str(root), "cache_dir": str(tmp_path / "cache"), "prepared": str(tmp_path / "prepared")}
    for mode, count in (("skip", 2), ("error", 3)):
        with pytest.raises(DataError) as err, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepare(DataConfig(dataset="coco", coco_empty_segmentation=mode, **paths), progress=False)
        lines = str(err.value).splitlines()
        assert f"{count} problem(s)" in lines[0], lines
        assert f"  {train}: annotation 42: unknown category id 30 (not one of the 80 category ids)" in lines
        assert any(line.startswith(f"  {test}: image 101 (COCO_val2014_000000000101.jpg): stated size 10x8 "
                                   "differs from the image file's 11x8") for line in lines)
        # `skip` leaves the empty annotation out with a warning; `error` lists it with the rest
        skipped = [w for w in caught if "left out 1 annotation(s) with an empty segmentation" in str(w.message)]
        assert len(skipped) == (mode == "skip")
        assert any(line.startswith(f"  {test}: annotation 41 of image 102") for line in lines) == (mode == "error")
    assert not (tmp_path / "prepared").exists()
