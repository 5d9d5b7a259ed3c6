"""Cross-domain target readers: tiny generated datasets in each PATNet layout, pairing and binarisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fssmeta.data.io import DataError
from fssmeta.data.targets import (
    FSS1000_SPLIT_SIZES,
    SUIM_CLASSES,
    TARGET_LAYOUTS,
    TargetSample,
    TargetSet,
    fss1000_split,
    read_target,
)

H = W = 16


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def image(path: Path, size: tuple[int, int] = (H, W)) -> Path:
    return save(path, np.full((*size, 3), 90))


def gray(path: Path, value: int = 255, rows: slice = slice(4, 12)) -> Path:
    """An 8-bit mask: `value` on `rows`, 0 elsewhere."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[rows] = value
    return save(path, mask)


def expected_binary(rows: slice = slice(4, 12)) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[rows] = 1
    return mask


def problem_lines(exc: pytest.ExceptionInfo) -> list[str]:
    return [line.strip() for line in str(exc.value).splitlines()[1:]]  # one problem per line under a header


# ---- Deepglobe


def make_deepglobe(root: Path) -> None:
    for k in ("1", "2", "10"):  # "10" after "2": numeric order, not string order
        image(root / k / "test" / "origin" / f"tile_{k}.jpg")
        gray(root / k / "test" / "groundtruth" / f"tile_{k}.png", 200)  # 200 >= 128 is foreground


def test_deepglobe_classes_pairing_binarisation(tmp_path: Path) -> None:
    make_deepglobe(tmp_path)
    (tmp_path / "notes").mkdir()  # a non-numbered folder is not a class
    target = read_target("Deepglobe", "deepglobe", tmp_path)
    assert target.classes == ("1", "2", "10")
    assert [(s.image.name, s.mask.name, s.class_index) for s in target.samples] == [
        ("tile_1.jpg", "tile_1.png", 0), ("tile_2.jpg", "tile_2.png", 1), ("tile_10.jpg", "tile_10.png", 2)
    ]
    assert target.by_class() == {0: [0], 1: [1], 2: [2]}
    img, mask = target.load(2)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected_binary())


def test_threshold_is_128(tmp_path: Path) -> None:
    values = np.array([[0, 100, 127, 128, 129, 200, 254, 255]] * 2, dtype=np.uint8)
    image(tmp_path / "1" / "test" / "origin" / "a.jpg", size=values.shape)
    save(tmp_path / "1" / "test" / "groundtruth" / "a.png", values)
    _, mask = read_target("Deepglobe", "deepglobe", tmp_path).load(0)
    np.testing.assert_array_equal(mask[0], [0, 0, 0, 1, 1, 1, 1, 1])


def test_deepglobe_problems_collected(tmp_path: Path) -> None:
    make_deepglobe(tmp_path)
    image(tmp_path / "1" / "test" / "origin" / "lonely.jpg")  # no mask
    gray(tmp_path / "2" / "test" / "groundtruth" / "orphan.png")  # no image
    (tmp_path / "3" / "test" / "origin").mkdir(parents=True)  # empty class
    (tmp_path / "3" / "test" / "groundtruth").mkdir()
    (tmp_path / "10" / "test" / "groundtruth" / "tile_10.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        read_target("Deepglobe", "deepglobe", tmp_path)
    lines = problem_lines(info)
    assert len(lines) == 4, info.value
    assert any("lonely.jpg" in line and "no mask" in line and "lonely.png" in line for line in lines)
    assert any("orphan.png" in line and "mask without an image" in line for line in lines)
    assert any(str(tmp_path / "3" / "test" / "origin") in line and "class 3 has no samples" in line
               for line in lines)
    assert any("tile_10.png" in line and "unreadable" in line for line in lines)


def test_size_mismatch_reported_and_checked_on_load(tmp_path: Path) -> None:
    image(tmp_path / "1" / "test" / "origin" / "a.jpg", size=(H, 12))
    gray(tmp_path / "1" / "test" / "groundtruth" / "a.png")
    with pytest.raises(DataError, match=r"a\.jpg: size 16x12 differs from mask .*a\.png \(16x16\)"):
        read_target("Deepglobe", "deepglobe", tmp_path)
    sample = TargetSample(tmp_path / "1" / "test" / "origin" / "a.jpg", tmp_path / "1" / "test" / "groundtruth" / "a.png", 0)
    target = TargetSet("Deepglobe", "deepglobe", tmp_path, ("1",), (sample,))
    with pytest.raises(DataError, match=r"a\.jpg and .*a\.png: image is 16x12 but mask is 16x16"):
        target.load(0)


@pytest.mark.parametrize("layout", TARGET_LAYOUTS)
def test_missing_root_names_root_and_layout(tmp_path: Path, layout: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}: X root not found; the {layout} layout is <root>"):
        read_target("X", layout, missing)


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown target layout"):
        read_target("X", "coco", tmp_path)


# ---- ISIC2018


def test_isic(tmp_path: Path) -> None:
    inputs, truth = tmp_path / "ISIC2018_Task1-2_Training_Input", tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    for k, ids in (("1", ["ISIC_0000002", "ISIC_0000001"]), ("2", ["ISIC_0000003"]), ("3", ["ISIC_0000004"])):
        for image_id in ids:
            image(inputs / k / f"{image_id}.jpg")
            gray(truth / f"{image_id}_segmentation.png")
    gray(truth / "ISIC_0009999_segmentation.png")  # a mask no class uses is fine
    (truth / "LICENSE.txt").write_text("the release ships text files beside the masks")
    target = read_target("ISIC", "isic", tmp_path)
    assert target.classes == ("1", "2", "3")
    assert [s.image.stem for s in target.samples] == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"]
    assert target.samples[0].mask == truth / "ISIC_0000001_segmentation.png"
    assert target.by_class() == {0: [0, 1], 1: [2], 2: [3]}
    np.testing.assert_array_equal(target.load(3)[1], expected_binary())

    image(inputs / "2" / "ISIC_0000005.jpg")
    with pytest.raises(DataError) as info:
        read_target("ISIC", "isic", tmp_path)
    assert problem_lines(info) == [f"{inputs / '2' / 'ISIC_0000005.jpg'}: no mask {truth / 'ISIC_0000005_segmentation.png'}"]


# ---- Chest X-ray


def make_chest(root: Path) -> None:
    image(root / "CXR_png" / "CHNCXR_0001_0.png")
    gray(root / "masks" / "CHNCXR_0001_0_mask.png")
    image(root / "CXR_png" / "MCUCXR_0001_0.png")
    gray(root / "masks" / "MCUCXR_0001_0.png")  # Montgomery masks carry no "_mask" suffix
    image(root / "CXR_png" / "CHNCXR_0002_1_mask_x.png")  # "_mask" inside a stem is not a suffix
    gray(root / "masks" / "CHNCXR_0002_1_mask_x_mask.png")


def test_chest_xray_pairs_by_stem(tmp_path: Path) -> None:
    make_chest(tmp_path)
    target = read_target("Chest X-ray", "chest_xray", tmp_path)
    assert target.classes == ("lung",)
    assert [(s.image.name, s.mask.name) for s in target.samples] == [
        ("CHNCXR_0001_0.png", "CHNCXR_0001_0_mask.png"),
        ("CHNCXR_0002_1_mask_x.png", "CHNCXR_0002_1_mask_x_mask.png"),
        ("MCUCXR_0001_0.png", "MCUCXR_0001_0.png"),
    ]
    np.testing.assert_array_equal(target.load(0)[1], expected_binary())


def test_chest_xray_one_to_one(tmp_path: Path) -> None:
    make_chest(tmp_path)
    image(tmp_path / "CXR_png" / "CHNCXR_0003_0.png")  # image without a mask: unlabelled, left out
    assert len(read_target("Chest X-ray", "chest_xray", tmp_path).samples) == 3
    gray(tmp_path / "masks" / "CHNCXR_0004_0_mask.png")  # mask without an image
    gray(tmp_path / "masks" / "CHNCXR_0001_0.png")  # a second mask for CHNCXR_0001_0
    with pytest.raises(DataError) as info:
        read_target("Chest X-ray", "chest_xray", tmp_path)
    lines = problem_lines(info)
    assert len(lines) == 2, info.value
    assert any(line.startswith(str(tmp_path / "masks" / "CHNCXR_0004_0_mask.png")) and "without an image" in line
               for line in lines)
    assert any("CHNCXR_0001_0.png: 2 masks" in line and "CHNCXR_0001_0_mask.png" in line for line in lines)


# ---- FSS-1000


def make_fss(root: Path, classes: list[str], n: int = 3) -> None:
    for name in classes:
        for i in list(range(1, n + 1)) + [10]:
            image(root / name / f"{i}.jpg")
            gray(root / name / f"{i}.png")


def test_fss1000_with_list_file(tmp_path: Path) -> None:
    make_fss(tmp_path, ["bus", "hotel_slipper", "not_listed"])
    (tmp_path / "test.txt").write_text("hotel_slipper\nbus\n")
    target = read_target("FSS-1000", "fss1000", tmp_path)
    assert target.classes == ("hotel_slipper", "bus")  # the list's order
    assert [s.image.name for s in target.samples[:4]] == ["1.jpg", "2.jpg", "3.jpg", "10.jpg"]
    assert all(s.mask == s.image.with_suffix(".png") for s in target.samples)
    assert {k: len(v) for k, v in target.by_class().items()} == {0: 4, 1: 4}

    (tmp_path / "bus" / "2.png").unlink()
    (tmp_path / "test.txt").write_text("hotel_slipper\nbus\nmissing_class\n")
    with pytest.raises(DataError) as info:
        read_target("FSS-1000", "fss1000", tmp_path)
    lines = problem_lines(info)
    assert len(lines) == 2, info.value
    assert any(str(tmp_path / "bus" / "2.jpg") in line and "no mask" in line for line in lines)
    assert any(str(tmp_path / "missing_class") in line and "test.txt is missing" in line for line in lines)


def test_fss1000_defaults_to_packaged_test_split(tmp_path: Path) -> None:
    make_fss(tmp_path, ["bus"], n=1)
    with pytest.raises(DataError) as info:
        read_target("FSS-1000", "fss1000", tmp_path)
    assert "239 problem(s)" in str(info.value)  # every packaged test class but "bus" is missing
    assert f"{tmp_path / 'hotel_slipper'}: class folder listed in the packaged FSS-1000 test split" in str(info.value)


def test_fss1000_test_split() -> None:
    names = fss1000_split("test")
    assert len(names) == 240 == len(set(names))
    assert names[:3] == ["bus", "hotel_slipper", "burj_al"] and "abe's_flyingfish" in names


@pytest.mark.parametrize("split", ["train", "val"])
def test_fss1000_train_val_split_not_packaged_says_what_to_place(split: str) -> None:
    # Only the official test list ships (HSNet's train/val lists were drawn at random and are not in reach
    # offline); asking for the others must tell the user what to place where.
    with pytest.raises(DataError) as info:
        fss1000_split(split)
    assert "juhongm999/hsnet" in str(info.value) and f"{FSS1000_SPLIT_SIZES[split]} names" in str(info.value)


def test_fss1000_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown FSS-1000 split 'trn'"):
        fss1000_split("trn")


# ---- SUIM

NOISY = {  # SUIM class code -> a slightly-off colour as JPEG-ish tools leave them
    "HD": (3, 2, 250), "PF": (5, 250, 0), "WR": (0, 251, 249), "RO": (252, 4, 1),
    "RI": (250, 0, 253), "FV": (250, 250, 5), "SR": (250, 255, 251),
}


def suim_mask(codes_by_rows: dict[str, slice]) -> np.ndarray:
    rgb = np.full((H, W, 3), (2, 1, 3), dtype=np.uint8)  # water, slightly off black
    for code, rows in codes_by_rows.items():
        rgb[rows] = NOISY[code]
    return rgb


def make_suim(root: Path) -> None:
    layouts = {
        "d_r_1_": {"HD": slice(0, 4), "FV": slice(8, 16)},
        "d_r_2_": {"PF": slice(0, 2), "WR": slice(2, 4), "RO": slice(4, 6), "RI": slice(6, 8), "SR": slice(8, 16)},
    }
    for stem, codes in layouts.items():
        image(root / "images" / f"{stem}.jpg")
        save(root / "masks" / f"{stem}.bmp", suim_mask(codes))


def test_suim_presence_and_class_masks(tmp_path: Path) -> None:
    make_suim(tmp_path)
    target = read_target("SUIM", "suim", tmp_path)
    assert target.classes == tuple(name for name, _ in SUIM_CLASSES) == ("HD", "PF", "WR", "RO", "RI", "FV", "SR")
    assert [(s.image.stem, target.classes[s.class_index]) for s in target.samples] == [
        ("d_r_1_", "HD"), ("d_r_2_", "PF"), ("d_r_2_", "WR"), ("d_r_2_", "RO"),
        ("d_r_2_", "RI"), ("d_r_1_", "FV"), ("d_r_2_", "SR"),
    ]
    assert all(len(indices) == 1 for indices in target.by_class().values())
    _, fish = target.load(5)
    np.testing.assert_array_equal(fish, expected_binary(slice(8, 16)))
    _, rocks = target.load(6)  # (250, 255, 251) is white, i.e. sea-floor, not plants or fish
    np.testing.assert_array_equal(rocks, expected_binary(slice(8, 16)))
    _, robots = target.load(3)
    np.testing.assert_array_equal(robots, expected_binary(slice(4, 6)))


def test_suim_problems(tmp_path: Path) -> None:
    make_suim(tmp_path)
    save(tmp_path / "masks" / "d_r_2_.bmp", suim_mask({"HD": slice(0, 16)}))  # now only divers: 5 classes empty
    image(tmp_path / "images" / "d_r_3_.jpg")  # no mask
    save(tmp_path / "masks" / "d_r_4_.bmp", suim_mask({"SR": slice(0, 16)}))  # no image
    with pytest.raises(DataError) as info:
        read_target("SUIM", "suim", tmp_path)
    lines = problem_lines(info)
    assert len(lines) == 7, info.value
    assert any("d_r_3_.jpg: no mask" in line and "d_r_3_.bmp" in line for line in lines)
    assert any("d_r_4_.bmp: mask without an image" in line for line in lines)
    for code in ("PF", "WR", "RO", "RI", "SR"):
        assert any(f"class {code} has no samples" in line for line in lines)


def test_pascal_layout_reads_every_class_of_an_image_and_keeps_the_ignore_ring(tmp_path: Path) -> None:
    from tests.conftest import write_voc

    first = np.zeros((24, 24), np.uint8)
    first[2:10, 2:10], first[14:20, 14:20] = 1, 7  # aeroplane and car
    first[1, 2:10] = 255  # VOC's boundary
    second = np.full((24, 24), 14, np.uint8)  # motorbike everywhere
    root = write_voc(tmp_path / "VOC2012", {"te00": first, "te01": second, "tr00": second}, ["tr00"], ["te00", "te01"])
    voc = read_target("voc", "pascal", root)
    assert voc.classes[0] == "aeroplane" and len(voc.classes) == 20
    assert [(s.image.stem, s.class_index) for s in voc.samples] == [("te00", 0), ("te00", 6), ("te01", 13)]
    _, plane = voc.load(0)
    assert plane[5, 5] == 1 and plane[16, 16] == 0 and plane[1, 5] == 255 and plane[0, 0] == 0
    (root / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError, match=r"val.txt: image list not found"):
        read_target("voc", "pascal", root)


def test_seen_classes_are_left_out_per_source_split() -> None:
    # RMT's COCO-20i -> PASCAL: each COCO split's model is scored on the PASCAL classes it never trained on
    from fssmeta.cross_domain import unseen_classes
    from fssmeta.data.folds import PASCAL_CLASSES
    from fssmeta.params import load_config

    def kept(dataset: str, fold: int | str) -> list[str]:
        cfg = load_config(None, {"data.dataset": dataset, "data.targets": {
            "voc": {"layout": "pascal", "root": "unused", "exclude_seen_classes": True}}})
        return [PASCAL_CLASSES[i] for i in sorted(unseen_classes(cfg, "voc", PASCAL_CLASSES, fold))]

    assert kept("coco", 0) == ["aeroplane", "boat", "chair", "diningtable", "dog", "person"]
    assert kept("coco", 1) == ["bicycle", "bus", "horse", "sofa"]  # sofa = COCO's couch
    assert kept("coco", 3) == ["bottle", "cat", "cow", "motorbike"]  # motorbike = COCO's motorcycle
    assert kept("pascal", 2) == list(PASCAL_CLASSES[10:15])  # a PASCAL fold: its own novel classes
    with pytest.raises(DataError, match=r"exclude_seen_classes: the coco model of source split all trained on every"):
        kept("coco", "all")
    cfg = load_config(None, {"data.targets": {"voc": {"layout": "pascal", "root": "unused"}}})
    assert unseen_classes(cfg, "voc", PASCAL_CLASSES, 0) is None  # off: every class is scored
