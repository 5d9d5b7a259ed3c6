"""The data stages end to end on a tiny synthetic dataset: both readers agree, targets get test and selection
episode lists that share no image, and scoring a target for model choice reads its selection lists only."""

from __future__ import annotations

import json

import pytest

from fssmeta.cli import main
from fssmeta.data.episode_lists import load_episode_list, target_list_path
from fssmeta.data.io import DataError
from fssmeta.data.prepare import load_fold, load_index
from fssmeta.data.targets import read_target
from fssmeta.params import load_config
from tests.mlflow_helpers import BASE_CLASSES, TINY_MODEL


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    args = ["--params", "none", "--quiet", "--set", f"synthesize.out={root / 'synthetic'}",
            "--set", "synthesize.image_size=128", "--set", "synthesize.train_images=160",
            "--set", "synthesize.test_images=80", "--set", "synthesize.val_images=40",
            # 10 per class (20 SUIM images): every class keeps >= 2 images in both pools of a target at
            # episodes.target_val_fraction 0.2 (6 left some SUIM classes a single selection image)
            "--set", "synthesize.target_images_per_class=10"]
    assert main(["synthesize", *args]) == 0
    return root


def stage_args(root, fmt):
    syn = root / "synthetic"
    return ["--params", "none", "--quiet", "--set", f"data.root={syn}", "--set", f"data.format={fmt}",
            "--set", f"data.prepared={root / fmt / 'prepared'}", "--set", f"data.cache_dir={root / fmt / 'cache'}",
            "--set", f"episodes.out={root / fmt / 'episodes'}", "--set", "episodes.test_episodes=20",
            "--set", "episodes.test_seeds=[0]", "--set", "episodes.val_episodes=10", "--set", "episodes.shots=[1]",
            "--set", "episodes.target_episodes=12",
            "--set", (f"data.targets={{gray: {{layout: deepglobe, root: {syn}/targets/gray}}, "
                      f"hazy: {{layout: fss1000, root: {syn}/targets/hazy}}, "
                      f"tiles: {{layout: suim, root: {syn}/targets/tiles}}}}")]


def test_voc_and_coco_readers_index_the_same_dataset(synthetic):
    for fmt in ("voc", "coco"):
        assert main(["prepare", *stage_args(synthetic, fmt)]) == 0
    voc, coco = (load_index(synthetic / fmt / "prepared") for fmt in ("voc", "coco"))
    assert coco["format"] == "coco" and len(coco["pools"]["train"]) == len(voc["pools"]["train"]) == 160
    # COCO keys are image ids, VOC keys image stems: pair them by the shared JPEG name.
    by_name = {row["image"].rsplit("/", 1)[-1].split("_")[-1].lstrip("0").split(".")[0]: row
               for row in coco["pools"]["train"]}
    agree = 0
    for row in voc["pools"]["train"]:
        other = by_name[row["key"].split("_")[-1].lstrip("0")]
        # COCO has no 255 band, so its counts are larger; the set of classes present must agree
        agree += set(row["pixels"]) == set(other["pixels"])
    assert agree >= 0.95 * len(voc["pools"]["train"])
    assert load_fold(synthetic / "coco" / "prepared", 0)["val"] == []  # COCO has no selection pool


def test_episodes_include_the_cross_domain_targets(synthetic):
    args = stage_args(synthetic, "voc")
    assert main(["prepare", *args]) == 0
    assert main(["episodes", *args]) == 0
    out = synthetic / "voc" / "episodes"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f.get("target") for f in manifest["files"]} == {None, "gray", "hazy", "tiles"}
    gray = load_episode_list(target_list_path(out, "gray", 1, 0))
    assert [ep["class_id"] for ep in gray["episodes"]] == [i % 4 for i in range(12)]
    hazy = load_episode_list(target_list_path(out, "hazy", 1, 0))
    # FSS-1000 protocol: one episode per test image; ceil(0.2 x 10) = 2 images of each class are held out for
    # selection (episodes.target_val_fraction), so 8 per class are test images
    assert len(hazy["episodes"]) == 5 * 8
    assert len(load_episode_list(target_list_path(out, "hazy", 1, 1000, "val"))["episodes"]) == 5 * 2
    val = load_episode_list(out / "fold0" / "val_1shot_image_seed1000.json")
    assert val["pool"] == "val"  # the synthetic VOC layout has a selection pool
    listed = {f["path"] for f in manifest["files"] if f.get("target")}
    assert listed == {f"targets/{name}/{split}_1shot_seed{seed}.json" for name in ("gray", "hazy", "tiles")
                      for split, seed in (("test", 0), ("val", 1000))}
    assert manifest["target_pools"]["hazy"] == {"target_val_fraction": 0.2, "test_samples": 40, "selection_samples": 10}


def test_target_selection_episodes_never_touch_a_test_query(synthetic):
    """Every target's selection (val) lists and test lists share no image: no selection query or support is a
    test query, no test query is seen in selection (sample keys, and image files: a SUIM image is a sample of
    each class it shows)."""
    args = stage_args(synthetic, "voc") + ["--set", "episodes.test_seeds=[0, 1]", "--set", "episodes.val_seeds=[7, 8]"]
    assert main(["prepare", *args]) == 0
    assert main(["episodes", *args]) == 0
    out = synthetic / "voc" / "episodes"
    for name, layout in (("gray", "deepglobe"), ("hazy", "fss1000"), ("tiles", "suim")):
        samples = read_target(name, layout, synthetic / "synthetic" / "targets" / name).samples
        test = [load_episode_list(target_list_path(out, name, 1, seed)) for seed in (0, 1)]
        val = [load_episode_list(target_list_path(out, name, 1, seed, "val")) for seed in (7, 8)]
        assert {v["split"] for v in val} == {"val"} and {t["split"] for t in test} == {"test"}
        test_queries = {ep["query"] for t in test for ep in t["episodes"]}
        test_keys = test_queries | {k for t in test for ep in t["episodes"] for k in ep["supports"]}
        val_keys = {k for v in val for ep in v["episodes"] for k in (ep["query"], *ep["supports"])}
        assert val_keys and test_queries
        assert not val_keys & test_queries and not val_keys & test_keys, name
        assert not {samples[int(k)].image for k in val_keys} & {samples[int(k)].image for k in test_keys}, name
        # every class is in both pools, so each domain's selection score averages the same classes as its test
        assert {ep["class_id"] for v in val for ep in v["episodes"]} == {ep["class_id"] for ep in test[0]["episodes"]}


def test_scoring_a_target_for_model_choice_reads_its_selection_lists_only(synthetic):
    import torch

    from fssmeta.cross_domain import score_domain
    from fssmeta.models import build_model

    args = stage_args(synthetic, "voc")
    assert main(["prepare", *args]) == 0 and main(["episodes", *args]) == 0
    sets = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
    cfg = load_config(None, [*sets, "eval.resized_size=65"]).model_copy(update={"model": TINY_MODEL})
    torch.manual_seed(0)
    model = build_model(cfg.model, shot=1, base_classes=BASE_CLASSES).eval()
    out = synthetic / "voc" / "episodes" / "targets" / "hazy"
    tests = sorted(out.glob("test_*.json"))
    saved = [path.read_bytes() for path in tests]
    try:
        for path in tests:
            path.write_text("not an episode list")  # a test list read here would fail the scoring
        score = score_domain(cfg, model, "hazy", fold=0, shot=1)
        assert 0.0 <= score <= 1.0 and score_domain(cfg, model, "hazy", fold=0, shot=1) == score
    finally:
        for path, data in zip(tests, saved, strict=True):
            path.write_bytes(data)
    off = cfg.model_copy(update={"episodes": cfg.episodes.model_copy(update={"target_val_fraction": 0.0})})
    with pytest.raises(DataError, match="target hazy: episodes.target_val_fraction is 0, so it has no selection"):
        score_domain(off, model, "hazy", fold=0, shot=1)
    elsewhere = cfg.model_copy(update={"episodes": cfg.episodes.model_copy(update={"val_seeds": (5,)})})
    with pytest.raises(DataError, match="val_1shot_seed5.json: no 1-shot selection list of target hazy"):
        score_domain(elsewhere, model, "hazy", fold=0, shot=1)


def test_target_pools_too_small_or_switched_off(synthetic, capsys):
    args = stage_args(synthetic, "voc")
    assert main(["prepare", *args]) == 0
    capsys.readouterr()
    # 1-shot needs 2 images of a class in each pool; ceil(0.1 x 10) = 1 is held out for selection
    assert main(["episodes", *args, "--set", "episodes.target_val_fraction=0.1"]) == 2
    err = capsys.readouterr().err
    assert "episodes target gray" in err and "class 1 has 10 images: 1 for selection, 9 for test" in err
    assert "episodes.target_val_fraction (0.1" in err and "nothing was written" in err
    # 0: PATNet's whole pool for the test lists, and no selection list
    out = synthetic / "voc" / "episodes"
    assert main(["episodes", *args, "--set", "episodes.target_val_fraction=0"]) == 0
    assert len(load_episode_list(target_list_path(out, "hazy", 1, 0))["episodes"]) == 5 * 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["split"] for f in manifest["files"] if f.get("target")} == {"test"}
    assert manifest["target_pools"]["hazy"] == {"target_val_fraction": 0.0, "test_samples": 50}
