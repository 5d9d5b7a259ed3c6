"""The data stages end to end on a tiny synthetic dataset: both readers agree, targets get episode lists."""

from __future__ import annotations

import json

import pytest

from fssmeta.cli import main
from fssmeta.data.episode_lists import load_episode_list, target_list_path
from fssmeta.data.prepare import load_fold, load_index


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    args = ["--params", "none", "--quiet", "--set", f"synthesize.out={root / 'synthetic'}",
            "--set", "synthesize.image_size=128", "--set", "synthesize.train_images=160",
            "--set", "synthesize.test_images=80", "--set", "synthesize.val_images=40",
            "--set", "synthesize.target_images_per_class=6"]
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
    assert len(hazy["episodes"]) == 5 * 6  # FSS-1000 protocol: one episode per test image
    val = load_episode_list(out / "fold0" / "val_1shot_image_seed1000.json")
    assert val["pool"] == "val"  # the synthetic VOC layout has a selection pool
