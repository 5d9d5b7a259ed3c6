"""The `prepare` -> `episodes` stages through the CLI on a tiny VOC-layout dataset."""

from __future__ import annotations

import json

import pytest

from fssmeta.cli import main
from fssmeta.data.episode_lists import list_path, load_episode_list
from tests.conftest import box_mask, write_voc


@pytest.fixture
def voc3(tmp_path):
    """20 train images (one per class) and 60 test images (three per class), 64x64."""
    masks = {f"tr{c:02d}": box_mask((64, 64), [(c, 0, 0, 64, 64)]) for c in range(1, 21)}
    masks |= {f"te{i:02d}": box_mask((64, 64), [(i % 20 + 1, 0, 0, 64, 40)]) for i in range(60)}
    return write_voc(tmp_path / "VOC2012", masks, [f"tr{c:02d}" for c in range(1, 21)], [f"te{i:02d}" for i in range(60)])


def run(tmp_path, root, *extra):
    common = ["--params", "none", "--quiet", "--set", "data.dataset=pascal", "--set", f"data.root={root}",
              "--set", f"data.prepared={tmp_path / 'prepared'}", "--set", "data.val_list=",
              "--set", f"episodes.out={tmp_path / 'episodes'}", "--set", "episodes.shots=[1, 2]",
              "--set", "episodes.test_episodes=30", "--set", "episodes.test_seeds=[0, 1]",
              "--set", "episodes.val_episodes=10", "--set", "episodes.val_seeds=[7]", *extra]
    return common


def test_prepare_then_episodes(voc3, tmp_path, capsys):
    args = run(tmp_path, voc3)
    assert main(["prepare", *args]) == 0
    assert "fold 0: train 15, test 15, val 0" in capsys.readouterr().out
    assert main(["episodes", *args]) == 0
    out = capsys.readouterr().out
    # 4 folds x 2 shots x 2 orders x (2 test + 1 val seed), and the all-classes split's 2 x 2 x 1 val lists
    assert "wrote 52 episode lists" in out
    manifest = json.loads((tmp_path / "episodes" / "manifest.json").read_text())
    assert manifest["protocol"]["dataset"] == "pascal" and len(manifest["files"]) == 52
    every = load_episode_list(list_path(tmp_path / "episodes", "all", "val", 1, "image", 7))
    assert every["fold"] == "all" and every["split"] == "val" and every["pool"] == "test"
    assert len({ep["class_id"] for ep in every["episodes"]}) > 5  # every class is a candidate, not one fold's five
    assert not (tmp_path / "episodes" / "all" / "test_1shot_image_seed0.json").exists()  # validated only
    lists = load_episode_list(list_path(tmp_path / "episodes", 2, "test", 2, "image", 1))
    assert lists["shot"] == 2 and lists["pool"] == "test" and len(lists["episodes"]) == 30
    for ep in lists["episodes"]:
        assert 11 <= ep["class_id"] <= 15
        keys = [ep["query"], *ep["supports"]]
        assert len(set(keys)) == 3 and all(int(k[2:]) % 20 + 1 == ep["class_id"] for k in keys)
    val = load_episode_list(list_path(tmp_path / "episodes", 0, "val", 1, "class", 7))
    assert val["pool"] == "test" and val["seed"] == 7  # no selection pool: the test pool, other seeds
    # reproducible: a second run writes byte-identical lists
    before = list_path(tmp_path / "episodes", 3, "test", 1, "class", 0).read_bytes()
    assert main(["episodes", *args]) == 0
    assert list_path(tmp_path / "episodes", 3, "test", 1, "class", 0).read_bytes() == before


def test_val_seed_equal_to_test_seed_is_refused(voc3, tmp_path, capsys):
    args = run(tmp_path, voc3, "--set", "episodes.val_seeds=[1]")
    assert main(["prepare", *args]) == 0
    assert main(["episodes", *args]) == 2
    assert "episodes.val_seeds: seed 1 is also a test seed" in capsys.readouterr().err


def test_episodes_before_prepare_says_what_to_run(tmp_path, capsys):
    assert main(["episodes", "--params", "none", "--set", f"data.prepared={tmp_path / 'p'}"]) == 2
    assert "run `fssmeta prepare` first" in capsys.readouterr().err


def test_a_class_too_small_for_k_shot_is_reported_not_silently_dropped(voc3, tmp_path, capsys):
    # te02 / te22 / te42 hold class 3: remove two, and class 3 has one test image (no 1-shot episode at all)
    # ... keep two: enough for 1-shot (a query + 1 support), too few for 2-shot
    (voc3 / "ImageSets/Segmentation/val.txt").write_text("\n".join(f"te{i:02d}" for i in range(60) if i != 42) + "\n")
    args = run(tmp_path, voc3)
    assert main(["prepare", *args]) == 0
    assert main(["episodes", *args]) == 0
    out = capsys.readouterr().out
    assert "warning: fold 0 test: class(es) [3] have fewer than 3 images in the test pool, so no 2-shot episode" in out
    manifest = json.loads((tmp_path / "episodes" / "manifest.json").read_text())
    # once per split (test, val) of fold 0 and for the all-classes split's val lists, not per seed and order
    assert len(manifest["warnings"]) == 3 and "fold all val: class(es) [3]" in manifest["warnings"][2]
    two = load_episode_list(list_path(tmp_path / "episodes", 0, "test", 2, "image", 0))
    one = load_episode_list(list_path(tmp_path / "episodes", 0, "test", 1, "image", 0))
    assert two["classes_without_episodes"] == [3] and 3 not in {ep["class_id"] for ep in two["episodes"]}
    assert one["classes_without_episodes"] == [] and 3 in {ep["class_id"] for ep in one["episodes"]}


def test_a_list_that_cannot_be_drawn_names_it_and_writes_nothing(voc3, tmp_path, capsys):
    args = run(tmp_path, voc3, "--set", "episodes.shots=[1, 3]")  # 3 images per class: no 3-shot episode
    assert main(["prepare", *args]) == 0
    assert main(["episodes", *args]) == 2
    err = capsys.readouterr().err
    assert "episodes fold 0 test (test pool) 3-shot image seed 0: no image has a class with at least 4 images" in err
    assert "nothing was written" in err
    assert not (tmp_path / "episodes").exists()  # not even the 1-shot lists drawn before it


def test_query_class_rule_is_recorded_and_changes_the_lists(tmp_path, capsys):
    # te00: class 1 on 64 x 36 = 2304 pixels (qualifies) and class 2 on 20 x 25 = 500 pixels (present only);
    # the other test images hold one class each on 64 x 40 pixels.
    masks = {f"tr{c:02d}": box_mask((64, 64), [(c, 0, 0, 64, 64)]) for c in range(1, 21)}
    masks |= {f"te{i:02d}": box_mask((64, 64), [(i % 20 + 1, 0, 0, 64, 40)]) for i in range(1, 60)}
    masks["te00"] = box_mask((64, 64), [(1, 0, 0, 64, 36), (2, 0, 39, 20, 25)])
    root = write_voc(tmp_path / "VOC2012", masks, [f"tr{c:02d}" for c in range(1, 21)], [f"te{i:02d}" for i in range(60)])
    index = None
    lists = {}
    for rule in ("present", "qualifying"):
        args = run(tmp_path / rule, root, "--set", f"data.query_class={rule}", "--set", "episodes.folds=[0]",
                   "--set", "episodes.orders=[image]", "--set", "episodes.test_episodes=200")
        assert main(["prepare", *args]) == 0 and main(["episodes", *args]) == 0
        manifest = json.loads((tmp_path / rule / "episodes" / "manifest.json").read_text())
        assert manifest["protocol"]["query_class"] == rule
        lists[rule] = load_episode_list(list_path(tmp_path / rule / "episodes", 0, "test", 1, "image", 0))
        assert lists[rule]["protocol"]["query_class"] == rule
        index = json.loads((tmp_path / rule / "prepared" / "index.json").read_text())
    capsys.readouterr()
    pixels = {row["key"]: row["pixels"] for row in index["pools"]["test"]}
    on_te00 = {rule: {ep["class_id"] for ep in lists[rule]["episodes"] if ep["query"] == "te00"} for rule in lists}
    assert on_te00["present"] == {1, 2} and on_te00["qualifying"] == {1}
    for rule in lists:
        for ep in lists[rule]["episodes"]:  # supports always pass the 2048-pixel rule
            assert all(pixels[k].get(str(ep["class_id"]), 0) >= 2048 for k in ep["supports"])
    assert lists["present"]["episodes"] != lists["qualifying"]["episodes"]
