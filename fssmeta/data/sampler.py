"""Episode sampling: fixed test / validation lists written to disk, and training episodes drawn on the fly.

An episode is one class, one query containing it and `shot` distinct supports containing it, each a
different image from the query (docs/protocol.md section 3). Two orders exist in the field:
- `image` (PFENet family): walk the image list in order, repeating it; draw the class among the classes of
  that image (every fold class present at any pixel count, as PFENet/BAM do, when `present` is given; else
  its qualifying classes), so class frequency follows image frequency;
- `class` (HSNet COCO test): draw the class uniformly, then the query among its images.
Supports always come from the class's pool, which follows the small-object rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fssmeta.data.io import DataError

Entry = tuple[str, list[int]]  # (image key, classes that qualify in it)
Present = Mapping[str, Sequence[int]]  # image key -> the fold classes in it at any pixel count


def class_pools(entries: Sequence[Entry]) -> dict[int, list[str]]:
    """Image keys per class, in list order, each key once per class."""
    pools: dict[int, dict[str, None]] = {}
    for key, classes in entries:
        for c in classes:
            pools.setdefault(int(c), {})[key] = None
    return {c: list(keys) for c, keys in sorted(pools.items())}


def draw_supports(rng: np.random.Generator, pool: Sequence[str], query: str, shot: int) -> list[str]:
    """`shot` distinct keys from `pool`, none equal to the query."""
    candidates = [k for k in pool if k != query]
    if len(candidates) < shot:
        raise DataError(f"class has {len(candidates)} support candidate(s) besides query {query}; {shot} needed")
    picks = rng.choice(len(candidates), size=shot, replace=False)
    return [candidates[int(i)] for i in picks]


def usable_classes(pools: dict[int, list[str]], shot: int) -> set[int]:
    """Classes with enough images for a query and `shot` other supports."""
    return {c for c, keys in pools.items() if len(set(keys)) >= shot + 1}


def image_walk(entries: Sequence[Entry], pools: dict[int, list[str]], shot: int,
               present: Present | None = None) -> list[tuple[str, list[int]]]:
    """The `image`-order walk: each listed image with the classes its episode may take.

    With `present`, PFENet/BAM's rule: every class of `present[key]` (in the image at any pixel count), not
    only those passing the small-object rule. Without it, the image's qualifying classes. Either way a class
    needs `shot` images besides the query in its pool (PFENet's support loop would never end otherwise);
    images left with no class are dropped.
    """
    sizes = {c: len(keys) for c, keys in pools.items()}
    members = {c: set(keys) for c, keys in pools.items()}
    walk = []
    for key, qualifying in entries:
        if present is None:
            candidates = qualifying
        elif key in present:
            candidates = present[key]
        else:
            raise DataError(f"image {key}: no classes recorded for it; re-run `fssmeta prepare`")
        supports = {int(c): sizes.get(int(c), 0) - (key in members.get(int(c), ())) for c in candidates}
        classes = [c for c, available in supports.items() if available >= shot]
        if classes:
            walk.append((key, classes))
    return walk


def episode_classes(entries: Sequence[Entry], shot: int, order: str = "image",
                    present: Present | None = None) -> set[int]:
    """The classes some `shot`-shot episode of `order` can hold (the others go in `classes_without_episodes`)."""
    pools = class_pools(entries)
    if order == "class":
        return usable_classes(pools, shot)
    return {c for _, classes in image_walk(entries, pools, shot, present) for c in classes}


def sample_episodes(entries: Sequence[Entry], shot: int, count: int, seed: int, order: str = "image",
                    support_entries: Sequence[Entry] | None = None,
                    present: Present | None = None) -> list[dict[str, Any]]:
    """A fixed list of `count` episodes, reproducible from `seed`.

    `support_entries` (default: `entries`) is where supports come from; PFENet-family tests draw both
    from the same test list. `present` (key -> fold classes at any pixel count) switches the `image`
    order's query class to PFENet/BAM's rule (`data.query_class: present`); the `class` order ignores it.
    """
    if shot < 1 or count < 1:
        raise ValueError(f"shot and count must be >= 1, got shot={shot}, count={count}")
    pools = class_pools(support_entries if support_entries is not None else entries)
    rng = np.random.default_rng(seed)
    return [_episode(class_id, query, draw_supports(rng, pools[class_id], query, shot))
            for class_id, query in query_draws(entries, pools, shot, count, rng, order, present)]


def query_draws(entries: Sequence[Entry], pools: dict[int, list[str]], shot: int, count: int,
                rng: np.random.Generator, order: str = "image",
                present: Present | None = None) -> Iterator[tuple[int, str]]:
    """The (class, query) of each of `count` episodes in `order` (module docstring), drawn lazily from `rng`,
    so the caller draws each episode's supports from the same generator before the next query."""
    if order == "image":
        walk = image_walk(entries, pools, shot, present)
        if not walk:
            raise DataError(f"no image has a class with at least {shot + 1} images: cannot form {shot}-shot episodes")
        for i in range(count):
            query, classes = walk[i % len(walk)]
            yield classes[int(rng.integers(len(classes)))], query
    elif order == "class":
        usable = usable_classes(pools, shot)
        query_pools = {c: keys for c, keys in class_pools(entries).items() if c in usable}
        if not query_pools:
            raise DataError(f"no class has at least {shot + 1} images: cannot form {shot}-shot episodes")
        classes = sorted(query_pools)
        for _ in range(count):
            class_id = classes[int(rng.integers(len(classes)))]
            keys = query_pools[class_id]
            yield class_id, keys[int(rng.integers(len(keys)))]
    else:
        raise ValueError(f"unknown episode order {order!r}; expected image or class")


def _episode(class_id: int, query: str, supports: list[str]) -> dict[str, Any]:
    return {"class_id": int(class_id), "query": query, "supports": supports}


def sample_target_episodes(by_class: dict[int, list[int]], shot: int, count: int, seed: int,
                           one_per_query: bool = False) -> list[dict[str, Any]]:
    """PATNet protocol on a target set: episode i has class `i mod n_classes`, query and supports random.

    With `one_per_query` (FSS-1000) every sample is the query of exactly one episode, in order.
    Keys are sample indices (as strings) of the `TargetSet`.
    """
    rng = np.random.default_rng(seed)
    pools = {c: [str(i) for i in idx] for c, idx in sorted(by_class.items())}
    short = [c for c, keys in pools.items() if len(keys) < shot + 1]
    if short:
        raise DataError(f"target classes {short} have fewer than {shot + 1} images: cannot form {shot}-shot episodes")
    episodes = []
    if one_per_query:
        for c, keys in pools.items():
            for query in keys:
                episodes.append(_episode(c, query, draw_supports(rng, keys, query, shot)))
        return episodes
    classes = list(pools)
    for i in range(count):
        c = classes[i % len(classes)]
        query = pools[c][int(rng.integers(len(pools[c])))]
        episodes.append(_episode(c, query, draw_supports(rng, pools[c], query, shot)))
    return episodes


def selection_images(by_class: Mapping[int, Sequence[int]], image_of: Sequence[str], fraction: float,
                     seed: int = 0) -> set[str]:
    """The images a target holds out for selection (model choice on the target), never test queries.

    Per class, at least ceil(`fraction` x its samples) of its samples, drawn with a generator seeded by
    (`seed`, class) only, so the test and validation seeds never move an image between pools. An image is
    held out whole (`image_of`: sample index -> image file): a SUIM image is a sample of every class it
    shows, and none of them may be a test query. Rarer classes draw first; an image another class already
    held out counts towards a class's share, so a class may end with more than its share, never fewer
    (when it has the images).
    """
    held: set[str] = set()
    for c in sorted(by_class, key=lambda c: (len(by_class[c]), c)):
        samples = list(by_class[c])
        # rounded first: 0.1 x 30 is 3.0000000000000004 in floating point, and its ceiling 4
        share = math.ceil(round(fraction * len(samples), 6))
        free = [i for i in samples if image_of[i] not in held]
        missing = share - (len(samples) - len(free))
        if missing > 0:
            picks = np.random.default_rng([seed, int(c)]).permutation(len(free))[:missing]
            held |= {image_of[free[int(k)]] for k in picks}
    return held


def check_episodes(episodes: Sequence[dict[str, Any]], entries: Sequence[Entry], shot: int,
                   present: Present | None = None) -> None:
    """Raise DataError unless every episode is valid against the list it claims to come from: the query is
    a listed image holding the class (qualifying, or at any pixel count with `present`), every support
    qualifies for it."""
    classes_of: dict[str, set[int]] = {}
    for key, classes in entries:
        classes_of.setdefault(key, set()).update(int(c) for c in classes)
    for n, ep in enumerate(episodes):
        keys = [ep["query"], *ep["supports"]]
        if len(ep["supports"]) != shot or len(set(keys)) != len(keys):
            raise DataError(f"episode {n}: needs {shot} distinct supports different from the query, got {keys}")
        query = ep["query"]
        if present is not None and query in classes_of:
            if ep["class_id"] not in {int(c) for c in present.get(query, ())}:
                raise DataError(f"episode {n}: query {query} does not hold class {ep['class_id']}")
            keys = keys[1:]
        for key in keys:
            if ep["class_id"] not in classes_of.get(key, ()):
                raise DataError(f"episode {n}: image {key} does not qualify for class {ep['class_id']}")


class TrainEpisodeSampler:
    """Draws training episodes on the fly; episode `i` of `epoch` on `rank` depends only on those three
    numbers and the seed, so runs are reproducible and DDP ranks see distinct episodes."""

    def __init__(self, entries: Sequence[Entry], shot: int, seed: int, order: str = "image",
                 present: Present | None = None) -> None:
        self.entries = list(entries)
        self.pools = class_pools(self.entries)
        self.usable = usable_classes(self.pools, shot)
        self.walk = image_walk(self.entries, self.pools, shot, present)  # `present`: PFENet/BAM's query class
        if not self.walk:
            raise DataError(f"no training class has at least {shot + 1} images: cannot form {shot}-shot episodes")
        self.shot, self.seed, self.order = shot, seed, order
        self.classes = sorted(self.usable)

    def rng(self, epoch: int, rank: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, rank, index])

    def draw(self, epoch: int, rank: int, index: int) -> tuple[dict[str, Any], np.random.Generator]:
        """The episode and the generator to continue with (for the augmentation seeds)."""
        rng = self.rng(epoch, rank, index)
        class_id, query = self.draw_query(rng)
        return _episode(class_id, query, draw_supports(rng, self.pools[class_id], query, self.shot)), rng

    def draw_query(self, rng: np.random.Generator) -> tuple[int, str]:
        """An episode's class and query image, before its supports."""
        if self.order == "class":
            class_id = self.classes[int(rng.integers(len(self.classes)))]
            keys = self.pools[class_id]
            return class_id, keys[int(rng.integers(len(keys)))]
        query, classes = self.walk[int(rng.integers(len(self.walk)))]
        return classes[int(rng.integers(len(classes)))], query
