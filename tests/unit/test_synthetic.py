"""The synthetic dataset: class table, determinism, VOC / COCO / target layouts, atomic regeneration."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from fssmeta.config import SynthesizeConfig
from fssmeta.data import synthetic
from fssmeta.data.io import DataError
from fssmeta.data.synthetic import CLASSES, SUIM_COLOURS, TARGET_SETS, synthesize, usable_pixels

# pycocotools' own numpy-2 copy warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

TINY = SynthesizeConfig(image_size=96, train_images=24, test_images=10, val_images=6, target_images_per_class=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    synthesize(TINY, out, progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[str]:
    return path.read_text().split()


def test_class_table() -> None:
    pairs = [(c.shape, c.texture) for c in CLASSES]
    assert [c.id for c in CLASSES] == list(range(1, 21))
    assert len(set(pairs)) == 20
    assert len({c.name for c in CLASSES}) == 20
    for counts in (Counter(s for s, _ in pairs), Counter(t for _, t in pairs)):
        assert len(counts) == 5 and min(counts.values()) >= 2
    for fold in range(4):
        members = CLASSES[5 * fold:5 * fold + 5]
        assert len({c.shape for c in members}) == 5
        assert len({c.texture for c in members}) == 5
    # The decoys are exactly the shape-texture pairs that are not classes.
    assert len(synthetic.DECOYS) == 5 and not set(synthetic.DECOYS) & set(pairs)


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    synthesize(TINY, tmp_path / "same", progress=False)
    reference, again = _files(dataset), _files(tmp_path / "same")
    assert reference.keys() == again.keys()
    assert all(reference[k] == again[k] for k in reference)
    synthesize(TINY.model_copy(update={"seed": 1}), tmp_path / "other", progress=False)
    other = _files(tmp_path / "other")
    changed = [k for k in reference if k.endswith((".jpg", ".png", ".bmp")) and reference[k] != other.get(k)]
    assert len(changed) > 0.9 * sum(k.endswith((".jpg", ".png", ".bmp")) for k in reference)


def test_class_mask_band() -> None:
    instances = np.zeros((12, 12), np.uint8)
    instances[2:10, 2:6] = 1
    instances[2:10, 6:10] = 2
    mask = synthetic.class_mask(instances, (7, 3), boundary_width=1)
    # One pixel either side of every edge, the edge between the two objects included.
    assert list(mask[5]) == [0, 255, 255, 7, 7, 255, 255, 3, 3, 255, 255, 0]
    assert list(mask[:, 3]) == [0, 255, 255, 7, 7, 7, 7, 7, 7, 255, 255, 0]
    assert np.array_equal(synthetic.class_mask(instances, (7, 3), 0)[2:10, 2:10] > 0, instances[2:10, 2:10] > 0)


def test_voc_layout(dataset: Path) -> None:
    voc = dataset / "VOC2012"
    ids = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    assert len(ids) == 40 and ids[0] == "syn_000001"
    sets = voc / "ImageSets"
    train, noval = _lines(sets / "Segmentation/train.txt"), _lines(sets / "SegmentationAug/train_noval.txt")
    test, selection = _lines(sets / "Segmentation/val.txt"), _lines(sets / "Segmentation/selection.txt")
    assert train + noval == ids[:24] and len(train) == 6
    assert test == ids[24:34] and selection == ids[34:]
    assert sorted(train + noval + test + selection) == ids
    band = small = 0
    for name in ids:
        with Image.open(voc / "SegmentationClassAug" / f"{name}.png") as img:
            assert img.mode == "L"
            mask = np.array(img)
        with Image.open(voc / "JPEGImages" / f"{name}.jpg") as img:
            assert img.mode == "RGB" and img.size == (96, 96) == mask.shape[::-1]
        assert set(np.unique(mask)) <= set(range(21)) | {255}
        band += (mask == 255).any()
        counts = np.bincount(mask.ravel(), minlength=256)[1:21]
        assert counts.max() >= usable_pixels(96)  # every image passes the small-object filter once
        small += ((counts > 0) & (counts < 2048)).any()
        palette_path = voc / "SegmentationClass" / f"{name}.png"
        assert palette_path.is_file() == (name in test)
        if name in test:
            with Image.open(palette_path) as img:
                assert img.mode == "P"
                assert np.array_equal(np.array(img), mask)
    assert band == len(ids) and small > 0


def test_coco_matches_voc(dataset: Path) -> None:
    styles: Counter[str] = Counter()
    for coco_split, voc_ids in (("train2014", range(1, 25)), ("val2014", range(25, 35))):
        coco = COCO(str(dataset / "COCO" / "annotations" / f"instances_{coco_split}.json"))
        cat_ids = sorted(coco.getCatIds())
        assert cat_ids != list(range(1, 21))  # gaps: a reader must map sorted ids to 1..20
        contiguous = {cat: i + 1 for i, cat in enumerate(cat_ids)}
        assert [coco.cats[cat]["name"] for cat in cat_ids] == [c.name for c in CLASSES]
        assert sorted(coco.getImgIds()) == list(voc_ids)
        for image_id in voc_ids:
            info = coco.imgs[image_id]
            jpeg = dataset / "COCO" / coco_split / info["file_name"]
            assert info["file_name"] == f"COCO_{coco_split}_{image_id:012d}.jpg"
            assert jpeg.read_bytes() == (dataset / "VOC2012/JPEGImages" / f"syn_{image_id:06d}.jpg").read_bytes()
            labels = np.zeros((info["height"], info["width"]), np.uint8)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                labels[coco.annToMask(ann) > 0] = contiguous[ann["category_id"]]
                segmentation = ann["segmentation"]
                styles["polygon" if isinstance(segmentation, list) else
                       "uncompressed" if isinstance(segmentation["counts"], list) else "compressed"] += 1
                styles["crowd"] += ann["iscrowd"]
            voc_mask = np.array(Image.open(dataset / "VOC2012/SegmentationClassAug" / f"syn_{image_id:06d}.png"))
            valid = voc_mask != 255
            assert np.mean(labels[valid] == voc_mask[valid]) >= 0.99
    assert all(styles[s] > 0 for s in ("polygon", "compressed", "uncompressed", "crowd")), styles


def _mean_std(paths: list[Path]) -> float:
    return float(np.mean([np.asarray(Image.open(p).convert("RGB"), np.float32).std() for p in paths]))


def test_targets(dataset: Path) -> None:
    targets = dataset / "targets"
    gray = targets / "gray"
    for k in range(1, 5):
        images = sorted(p.stem for p in (gray / str(k) / "test" / "origin").glob("*.jpg"))
        masks = sorted(p.stem for p in (gray / str(k) / "test" / "groundtruth").glob("*.png"))
        assert images == masks and len(images) == 4
        for stem in images:
            rgb = np.asarray(Image.open(gray / str(k) / "test" / "origin" / f"{stem}.jpg").convert("RGB"))
            assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
            mask = np.asarray(Image.open(gray / str(k) / "test" / "groundtruth" / f"{stem}.png"))
            assert mask.shape == rgb.shape[:2] and set(np.unique(mask)) == {0, 255}
    hazy = targets / "hazy"
    names = _lines(hazy / "test.txt")
    assert names == [c.name for c in TARGET_SETS[1].classes] and len(names) == 5
    for name in names:
        assert sorted(p.stem for p in (hazy / name).glob("*.jpg")) == sorted(p.stem for p in (hazy / name).glob("*.png"))
        for png in (hazy / name).glob("*.png"):
            assert set(np.unique(np.asarray(Image.open(png).convert("L")))) == {0, 255}
    # Haze and blur flatten the image: far less contrast than the source domain.
    sources = sorted((dataset / "VOC2012/JPEGImages").glob("*.jpg"))
    assert _mean_std(sorted(hazy.glob("*/*.jpg"))) < 0.7 * _mean_std(sources)
    tiles = targets / "tiles"
    stems = sorted(p.stem for p in (tiles / "images").glob("*.jpg"))
    assert stems == sorted(p.stem for p in (tiles / "masks").glob("*.bmp")) and len(stems) == 8
    regions = []
    for stem in stems:
        mask = np.asarray(Image.open(tiles / "masks" / f"{stem}.bmp"))
        assert mask.shape == (96, 96, 3)
        colours = {tuple(int(x) for x in c) for c in np.unique(mask.reshape(-1, 3), axis=0)}
        assert colours <= set(SUIM_COLOURS)
        regions.append(len(colours - {(0, 0, 0)}))
    assert 1 <= min(regions) and max(regions) <= 4 and np.mean(regions) >= 2


def test_metadata(dataset: Path) -> None:
    classes = json.loads((dataset / "classes.json").read_text())
    assert [c["name"] for c in classes["classes"]] == [c.name for c in CLASSES]
    assert [t["layout"] for t in classes["targets"]] == ["deepglobe", "fss1000", "suim"]
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["counts"]["train"] == 24 and manifest["counts"]["targets"]["tiles"] == 8
    assert manifest["config"]["seed"] == TINY.seed


def test_rerun_is_noop_and_change_regenerates(tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = synthesize(TINY, out, progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert synthesize(TINY, out, progress=False) == first
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    changed = synthesize(TINY.model_copy(update={"val_images": 7}), out, progress=False)
    assert changed["counts"]["val"] == 7
    assert len(_lines(out / "VOC2012/ImageSets/Segmentation/selection.txt")) == 7
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary or old copy left behind


def test_failure_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic.draw_sample
    calls = []

    def failing(*args: object) -> synthetic.Sample:
        calls.append(args)
        if len(calls) > 5:
            raise RuntimeError("injected")
        return real(*args)

    monkeypatch.setattr(synthetic, "draw_sample", failing)
    with pytest.raises(RuntimeError, match="injected"):
        synthesize(TINY, tmp_path / "data", progress=False)
    assert list(tmp_path.iterdir()) == []
    # An existing dataset survives a failed regeneration untouched.
    monkeypatch.setattr(synthetic, "draw_sample", real)
    synthesize(TINY, tmp_path / "data", progress=False)
    monkeypatch.setattr(synthetic, "draw_sample", failing)
    calls.clear()
    with pytest.raises(RuntimeError, match="injected"):
        synthesize(TINY.model_copy(update={"seed": 3}), tmp_path / "data", progress=False)
    assert json.loads((tmp_path / "data/manifest.json").read_text())["config"]["seed"] == TINY.seed
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_rejects_too_small_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        synthesize(TINY.model_copy(update={"image_size": 64}), tmp_path / "data", progress=False)


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        synthesize(TINY, tmp_path / "data", progress=False)
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"
