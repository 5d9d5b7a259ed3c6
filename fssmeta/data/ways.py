"""iFSL's N-way FS-CS episodes (docs/protocol.md section 3): the support classes drawn as the official fs-cs
loader draws them (the query's own class with probability 1/2), the query's class presence, the fixed N-way test
lists, the 1-way FS-CS training episodes, and the datasets that yield `FSCSEpisode` items.

An N-way episode: a query image, N distinct support classes with `shot` supports each (distinct images within
a way, none the query; ways may share an image, as official), and per way whether its class is in the query at
any pixel count (official `query_class_presence`: `class in torch.unique(query_mask)` on the full mask).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fssmeta.config import DataConfig, EpisodesConfig
from fssmeta.data.dataset import IndexSource, TrainEpisodeDataset
from fssmeta.data.folds import ALL, Split, split_name
from fssmeta.data.io import DataError
from fssmeta.data.prepare import load_fold, present_classes
from fssmeta.data.sampler import Entry, Present, TrainEpisodeSampler, class_pools, draw_supports, query_draws
from fssmeta.episode import IGNORE_INDEX, FSCSEpisode

Pair = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]  # (image, label) -> tensors


def way_list_path(out: str | Path, fold: Split, split: str, ways: int, shot: int, order: str, seed: int) -> Path:
    return Path(out) / split_name(fold) / f"{split}_{ways}way_{shot}shot_{order}_seed{seed}.json"


def image_classes(index: dict[str, Any], pool: str) -> dict[str, set[int]]:
    """Per image of the index pool, every class it holds at any pixel count (what presence is judged on)."""
    return {row["key"]: {int(c) for c in row["pixels"]} for row in index["pools"][pool]}


def support_candidates(pools: Mapping[int, Sequence[str]], query: str, shot: int) -> list[int]:
    """The classes with `shot` images besides the query: those a way may take."""
    return [c for c, keys in pools.items() if sum(k != query for k in keys) >= shot]


def draw_way_classes(rng: np.random.Generator, candidates: Sequence[int], query_class: int, ways: int) -> list[int]:
    """`ways` distinct support classes, drawn without replacement with weight 1/2 on the query's class and
    1 / (2 (C - 1)) on each of the C - 1 others, in drawing order (official `sample_episode`:
    `np.random.choice(class_ids, way, p=p, replace=False)`). So the query's class is way 1 with probability 1/2,
    and among the ways with probability 1/2 at one way, more at N > 1 (docs/protocol.md section 3)."""
    if ways > len(candidates):
        raise DataError(f"{ways}-way episode: only {len(candidates)} classes have enough images for the supports")
    others = len(candidates) - 1
    if others == 0:
        return [int(query_class)]
    weights = np.array([0.5 if c == query_class else 0.5 / others for c in candidates])
    return [int(candidates[i]) for i in rng.choice(len(candidates), size=ways, replace=False, p=weights)]


def sample_way_episodes(entries: Sequence[Entry], contents: Mapping[str, set[int]], shot: int, ways: int, count: int,
                        seed: int, order: str = "image", present: Present | None = None) -> list[dict[str, Any]]:
    """A fixed list of `count` N-way episodes, reproducible from (`seed`, `ways`): the query and its class as
    the 1-way lists draw them (`sampler.query_draws`, `order` and `present` alike), then the ways' classes
    (`draw_way_classes`), each way's supports, and the presence of each way's class (`contents`)."""
    if shot < 1 or count < 1 or ways < 1:
        raise ValueError(f"shot, ways and count must be >= 1, got shot={shot}, ways={ways}, count={count}")
    pools = class_pools(entries)
    rng = np.random.default_rng([seed, ways])  # a stream of its own: the 1-way lists of `seed` are unchanged
    episodes = []
    for query_class, query in query_draws(entries, pools, shot, count, rng, order, present):
        classes = draw_way_classes(rng, support_candidates(pools, query, shot), query_class, ways)
        episodes.append({"query": query, "query_class": int(query_class), "classes": classes,
                         "supports": [draw_supports(rng, pools[c], query, shot) for c in classes],
                         "presence": [c in contents[query] for c in classes]})
    return episodes


def check_way_episodes(episodes: Sequence[dict[str, Any]], entries: Sequence[Entry],
                       contents: Mapping[str, set[int]], shot: int, ways: int) -> None:
    """Raise DataError unless every episode has `ways` distinct classes, `shot` distinct supports per way that
    are not the query and qualify for their class, and the presence its query's mask gives."""
    pools = {c: set(keys) for c, keys in class_pools(entries).items()}
    for n, ep in enumerate(episodes):
        classes, query = ep["classes"], ep["query"]
        if len(classes) != ways or len(set(classes)) != ways or len(ep["supports"]) != ways:
            raise DataError(f"episode {n}: needs {ways} distinct classes with supports each, got {classes}")
        for c, keys in zip(classes, ep["supports"], strict=True):
            if len(keys) != shot or len(set(keys)) != shot or query in keys or not set(keys) <= pools.get(c, set()):
                raise DataError(f"episode {n}: class {c} needs {shot} distinct supports of its own, other than "
                                f"the query {query}; got {keys}")
        if ep["presence"] != [c in contents[query] for c in classes]:
            raise DataError(f"episode {n}: presence {ep['presence']} is not what query {query} holds")


def draw_way_lists(index: dict[str, Any], data: DataConfig, cfg: EpisodesConfig,
                   out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """At `episodes.ways` N > 1, drawn and checked but not written, as (path, list) pairs:
    - the N-way test lists of each fold, shot, order and test seed (`episodes.test_episodes` each);
    - the 1-way FS-CS validation lists of each fold and of the all-classes split, shot, order and validation
      seed (`episodes.val_episodes` each, from the validation pool as the 1-way FS-S ones): what
      `train.task: fscs` selects its checkpoint on, as the official fs-cs trainer validates at its training
      way (1) on episodes whose query holds the support class with probability 1/2.
    An error names the list; none are drawn at `episodes.ways` 1."""
    if cfg.ways == 1:
        return []
    protocol = {**index["protocol"], "query_class": data.query_class}
    jobs = [(fold, "test", cfg.ways, cfg.test_seeds, cfg.test_episodes) for fold in cfg.folds]
    jobs += [(fold, "val", 1, cfg.val_seeds, cfg.val_episodes) for fold in (*cfg.folds, ALL)]
    contents: dict[str, dict[str, set[int]]] = {}
    drawn = []
    for fold, split, ways, seeds, count in jobs:
        lists = load_fold(data.prepared, fold)
        pool = "val" if split == "val" and lists["val"] else "test"  # as the 1-way lists (episode_lists.py)
        if pool not in contents:  # each pool's class sets once, not once per job
            contents[pool] = image_classes(index, pool)
        held = contents[pool]
        entries = [(key, classes) for key, classes in lists[pool]]
        present = present_classes(index, data, lists, pool)
        for shot in cfg.shots:
            for order in cfg.orders:
                for seed in seeds:
                    try:
                        episodes = sample_way_episodes(entries, held, shot, ways, count, seed, order, present)
                        check_way_episodes(episodes, entries, held, shot, ways)
                    except DataError as exc:
                        raise DataError(f"episodes fold {fold} {split} {ways}-way {shot}-shot {order} seed {seed}: "
                                        f"{exc}; nothing was written") from None
                    flags = [p for ep in episodes for p in ep["presence"]]
                    drawn.append((way_list_path(out, fold, split, ways, shot, order, seed),
                                  {"dataset": index["dataset"], "fold": fold, "split": split, "pool": pool,
                                   "ways": ways, "shot": shot, "order": order, "seed": seed,
                                   "protocol": protocol, "presence_rate": sum(flags) / len(flags),
                                   "episodes": episodes}))
    return drawn


def way_labels(mask: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Way n's class -> n (1..N), every other class -> 0, 255 stays 255 (official
    `generate_query_episodic_mask`)."""
    label = np.zeros_like(mask)
    for n, c in enumerate(classes, 1):
        label[mask == c] = n
    label[mask == IGNORE_INDEX] = IGNORE_INDEX
    return label


def way_episode(ep: dict[str, Any], source: IndexSource, pair: Pair,
                score_mask: Callable[[np.ndarray], torch.Tensor] | None = None) -> FSCSEpisode:
    """One N-way episode as tensors (unbatched): each image through `pair`; the query mask at `score_mask`'s
    resolution when given. Presence comes from the query's full mask; a list whose recorded presence differs
    was drawn from other data (re-run the episodes stage)."""
    classes = [int(c) for c in ep["classes"]]
    supports = [[pair(*source.load(k, c)) for k in keys] for c, keys in zip(classes, ep["supports"], strict=True)]
    image, mask = source.load_raw(ep["query"])
    label = way_labels(mask, classes)
    query_img, query_mask = pair(image, label)
    presence = [bool((mask == c).any()) for c in classes]
    if "presence" in ep and presence != list(ep["presence"]):
        raise DataError(f"query {ep['query']}: the list records presence {ep['presence']}, its mask gives {presence}; "
                        "the list was drawn from other data: re-run `fssmeta episodes`")
    return FSCSEpisode(torch.stack([torch.stack([img for img, _ in way]) for way in supports]),
                       torch.stack([torch.stack([m for _, m in way]) for way in supports]), query_img,
                       query_mask if score_mask is None else score_mask(label), torch.tensor(classes),
                       torch.tensor(presence))


class WayEpisodeDataset(torch.utils.data.Dataset):
    """A fixed N-way list scored under a test convention (`TestTransform`)."""

    def __init__(self, episodes: Sequence[dict[str, Any]], source: IndexSource, transform: Any) -> None:
        self.episodes, self.source, self.transform = list(episodes), source, transform

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> FSCSEpisode:
        return way_episode(self.episodes[i], self.source, self.transform, self.transform.score_mask)


class FSCSTrainSampler:
    """1-way FS-CS training episodes (official fs-cs loader, split `trn`, way 1): the query and its class as
    `sampler` draws them, then the support class by `draw_way_classes` (the query's own with probability 1/2,
    else another base class with enough images) and its supports. Episode i of an epoch depends only on the
    seed, the epoch, the rank and i, as `TrainEpisodeSampler`'s."""

    def __init__(self, sampler: TrainEpisodeSampler, ways: int = 1) -> None:
        self.sampler, self.ways = sampler, ways

    def draw(self, epoch: int, rank: int, index: int) -> tuple[dict[str, Any], np.random.Generator]:
        s = self.sampler
        rng = s.rng(epoch, rank, index)
        query_class, query = s.draw_query(rng)
        classes = draw_way_classes(rng, support_candidates(s.pools, query, s.shot), query_class, self.ways)
        return {"query": query, "query_class": query_class, "classes": classes,
                "supports": [draw_supports(rng, s.pools[c], query, s.shot) for c in classes]}, rng


class TrainWayEpisodeDataset(TrainEpisodeDataset):
    """`TrainEpisodeDataset` over an `FSCSTrainSampler`: `FSCSEpisode` items, each image augmented with its
    own seed from the episode's generator."""

    def __getitem__(self, i: int) -> FSCSEpisode:
        ep, rng = self.sampler.draw(self.epoch, 0, self.global_index(i))
        return way_episode(ep, self.source, lambda image, label: self.transform(image, label,
                                                                                rng=int(rng.integers(2**31))))
