"""Episode lists: reproducible from the seed, valid, in both orders; training episodes per epoch and rank."""

from __future__ import annotations

from collections import Counter

import pytest

from fssmeta.data.io import DataError
from fssmeta.data.sampler import (
    TrainEpisodeSampler,
    check_episodes,
    class_pools,
    sample_episodes,
    sample_target_episodes,
    selection_images,
)

# 18 images of classes 1..3, one image "multi" holds two classes; class 4 has a single image (never usable).
ENTRIES = [(f"k{i}", [1 + i % 3]) for i in range(18)] + [("multi", [1, 2]), ("lonely", [4])]


@pytest.mark.parametrize("order", ["image", "class"])
@pytest.mark.parametrize("shot", [1, 5])
def test_lists_reproducible_and_valid(order, shot):
    a = sample_episodes(ENTRIES, shot, 50, seed=7, order=order)
    assert a == sample_episodes(ENTRIES, shot, 50, seed=7, order=order)
    assert a != sample_episodes(ENTRIES, shot, 50, seed=8, order=order)
    assert len(a) == 50
    check_episodes(a, ENTRIES, shot)
    for ep in a:
        assert len(set(ep["supports"])) == shot and ep["query"] not in ep["supports"]
    assert all(ep["class_id"] != 4 for ep in a)


def test_image_order_walks_the_list_and_repeats():
    eps = sample_episodes(ENTRIES, 1, 30, seed=0, order="image")
    walk = [k for k, cs in ENTRIES if cs != [4]]  # "lonely" has no usable class
    assert [ep["query"] for ep in eps] == [walk[i % len(walk)] for i in range(30)]
    assert {ep["class_id"] for ep in eps if ep["query"] == "multi"} <= {1, 2}


def test_class_order_draws_classes_uniformly():
    eps = sample_episodes(ENTRIES, 1, 3000, seed=0, order="class")
    counts = Counter(ep["class_id"] for ep in eps)
    assert set(counts) == {1, 2, 3}
    assert all(900 < n < 1100 for n in counts.values())


def test_check_episodes_catches_bad_lists():
    good = sample_episodes(ENTRIES, 1, 5, seed=0)
    with pytest.raises(DataError, match="does not qualify for class"):
        check_episodes([{**good[0], "class_id": 4}], ENTRIES, 1)
    with pytest.raises(DataError, match="distinct supports"):
        check_episodes([{**good[0], "supports": [good[0]["query"]]}], ENTRIES, 1)


def test_not_enough_images_is_a_clear_error():
    with pytest.raises(DataError, match="at least 3 images"):
        sample_episodes([("a", [1]), ("b", [1])], 2, 10, seed=0)


def test_target_episodes_follow_patnet():
    by_class = {0: [0, 1, 2, 3], 1: [4, 5, 6], 2: [7, 8]}
    eps = sample_target_episodes(by_class, 1, 12, seed=0)
    assert [ep["class_id"] for ep in eps] == [i % 3 for i in range(12)]
    for ep in eps:
        pool = {str(i) for i in by_class[ep["class_id"]]}
        assert ep["query"] in pool and set(ep["supports"]) <= pool and ep["query"] not in ep["supports"]
    fss = sample_target_episodes(by_class, 1, 0, seed=0, one_per_query=True)
    assert [ep["query"] for ep in fss] == [str(i) for i in range(9)]
    with pytest.raises(DataError, match=r"target classes \[2\]"):
        sample_target_episodes(by_class, 2, 10, seed=0)


def test_selection_images_hold_out_a_share_of_every_class_by_whole_image():
    # classes 0 and 1 with 10 single-class images each; class 2 lives only on images that also hold class 1
    # (a SUIM image is a sample of every class it shows): samples 20..24 are images m0..m4 again
    image_of = [f"a{i}" for i in range(10)] + [f"m{i}" for i in range(10)] + [f"m{i}" for i in range(5)]
    by_class = {0: list(range(10)), 1: list(range(10, 20)), 2: list(range(20, 25))}
    held = selection_images(by_class, image_of, 0.2)
    assert held == selection_images(by_class, image_of, 0.2)  # fixed by (seed, class) alone
    per_class = {c: sum(image_of[i] in held for i in keys) for c, keys in by_class.items()}
    # ceil(0.2 x n) = 2, 2, 1. Class 2 (the rarest) draws 1 image first; it counts for class 1 too, which then
    # draws 1 more (4 images in all). That one may also hold class 2: a class gets its share or more.
    assert per_class[0] == 2 and per_class[1] == 2 and per_class[2] in (1, 2)
    assert held <= set(image_of) and len(held) == 4
    assert selection_images(by_class, image_of, 0.1) != selection_images(by_class, image_of, 0.1, seed=1)
    assert selection_images(by_class, image_of, 0.0) == set()
    # 0.1 x 30 is 3.0000000000000004 in floating point: still 3 images, not 4
    assert len(selection_images({0: list(range(30))}, [str(i) for i in range(30)], 0.1)) == 3


def test_train_sampler_depends_on_epoch_rank_index_only():
    sampler = TrainEpisodeSampler(ENTRIES, shot=1, seed=3)
    first = [sampler.draw(0, 0, i)[0] for i in range(20)]
    assert first == [sampler.draw(0, 0, i)[0] for i in range(20)]
    assert first != [sampler.draw(1, 0, i)[0] for i in range(20)]
    assert first != [sampler.draw(0, 1, i)[0] for i in range(20)]
    check_episodes(first, ENTRIES, 1)
    assert class_pools(ENTRIES)[1][-1] == "multi"


# "big" holds a large object of class 1 (qualifying) and a 500-pixel object of class 2 (present only);
# b0..b3 hold class 2 large enough to qualify, a0..a3 class 1.
SMALL_OBJECT = [("big", [1]), *[(f"a{i}", [1]) for i in range(4)], *[(f"b{i}", [2]) for i in range(4)]]
PRESENT = {"big": [1, 2], **{f"a{i}": [1] for i in range(4)}, **{f"b{i}": [2] for i in range(4)}}


@pytest.mark.parametrize("shot", [1, 4])
def test_present_rule_lets_a_small_object_be_the_querys_class(shot):
    present = sample_episodes(SMALL_OBJECT, shot, 200, seed=0, order="image", present=PRESENT)
    qualifying = sample_episodes(SMALL_OBJECT, shot, 200, seed=0, order="image")
    on_big = [ep["class_id"] for ep in present if ep["query"] == "big"]
    assert 2 in on_big and 1 in on_big  # drawn among both classes the query holds
    assert {ep["class_id"] for ep in qualifying if ep["query"] == "big"} == {1}
    pools = class_pools(SMALL_OBJECT)
    for ep in present:  # supports always come from the class's pool: they pass the small-object rule
        assert set(ep["supports"]) <= set(pools[ep["class_id"]])
        assert ep["class_id"] == 1 or "big" not in ep["supports"]
    check_episodes(present, SMALL_OBJECT, shot, present=PRESENT)
    with pytest.raises(DataError, match="does not qualify for class 2"):
        check_episodes(present, SMALL_OBJECT, shot)  # the qualifying rule's check refuses them
    # the class order is unchanged by the rule
    assert sample_episodes(SMALL_OBJECT, shot, 50, seed=0, order="class", present=PRESENT) == \
        sample_episodes(SMALL_OBJECT, shot, 50, seed=0, order="class")


def test_present_rule_needs_enough_supports_besides_the_query():
    # Class 2 qualifies in one image only: no 1-shot episode can hold it when "b0" is the query, but "big"
    # (class 2 present, not qualifying) can be a class-2 query with the support "b0".
    entries = [("big", [1]), ("a0", [1]), ("b0", [2])]
    eps = sample_episodes(entries, 1, 60, seed=0, present={"big": [1, 2], "a0": [1], "b0": [2]})
    assert {(ep["query"], ep["class_id"]) for ep in eps} == {("big", 1), ("big", 2), ("a0", 1)}
    assert all(ep["supports"] == ["b0"] for ep in eps if ep["class_id"] == 2)


def test_check_episodes_under_present_refuses_a_class_the_query_lacks():
    good = sample_episodes(SMALL_OBJECT, 1, 5, seed=0, present=PRESENT)
    with pytest.raises(DataError, match="query a0 does not hold class 2"):
        check_episodes([{"class_id": 2, "query": "a0", "supports": ["b0"]}], SMALL_OBJECT, 1, present=PRESENT)
    with pytest.raises(DataError, match="does not qualify"):  # an unlisted query is refused either way
        check_episodes([{**good[0], "query": "elsewhere"}], SMALL_OBJECT, 1, present=PRESENT)


def test_train_sampler_follows_the_present_rule():
    present = TrainEpisodeSampler(SMALL_OBJECT, shot=1, seed=0, present=PRESENT)
    qualifying = TrainEpisodeSampler(SMALL_OBJECT, shot=1, seed=0)
    drawn = [present.draw(0, 0, i)[0] for i in range(300)]
    assert any(ep["query"] == "big" and ep["class_id"] == 2 for ep in drawn)
    assert all(ep["class_id"] == 1 for ep in (qualifying.draw(0, 0, i)[0] for i in range(300)) if ep["query"] == "big")
    check_episodes(drawn, SMALL_OBJECT, 1, present=PRESENT)
