"""`episodes`: write the fixed test and validation episode lists per (fold, shot, order, seed) as JSON.

Every evaluation reads these files, so every model is scored on identical episodes. Layout under `out`:
`fold<k>/<split>_<shot>shot_<order>_seed<seed>.json`, `all/val_<shot>shot_<order>_seed<seed>.json` (the
all-classes source split's validation, on the held-out source images), `targets/<name>/test_<shot>shot_seed<seed>.json`,
`targets/<name>/val_<shot>shot_seed<seed>.json` (a target's selection lists, drawn from images its test lists
never use), under `episodes.ways` > 1 `fold<k>/test_<N>way_<shot>shot_<order>_seed<seed>.json` (iFSL's FS-CS
lists, data/ways.py), and `manifest.json` (written last) naming every file with the protocol it was drawn under: the
prepared index's record plus `query_class` (`data.query_class`, docs/protocol.md sections 3 and 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from fssmeta.config import DataConfig, EpisodesConfig
from fssmeta.data.folds import ALL, Split, split_name
from fssmeta.data.io import DataError, read_json, write_json_atomic
from fssmeta.data.prepare import load_fold, load_index, present_classes
from fssmeta.data.sampler import (
    check_episodes,
    class_pools,
    episode_classes,
    sample_episodes,
    sample_target_episodes,
    selection_images,
)
from fssmeta.data.ways import draw_way_lists

if TYPE_CHECKING:
    from fssmeta.data.targets import TargetSet


def list_path(out: str | Path, fold: Split, split: str, shot: int, order: str, seed: int) -> Path:
    return Path(out) / split_name(fold) / f"{split}_{shot}shot_{order}_seed{seed}.json"


def target_list_path(out: str | Path, name: str, shot: int, seed: int, split: str = "test") -> Path:
    """A target's `test` list (PATNet protocol, the test seeds) or `val` list (its selection episodes, the
    validation seeds)."""
    return Path(out) / "targets" / name / f"{split}_{shot}shot_seed{seed}.json"


def write_episode_lists(data: DataConfig, cfg: EpisodesConfig, out: str | Path | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Draw every list, then write them all (the manifest last): a list that cannot be drawn stops the run
    with an error naming its fold, split, shot, order and seed (or target) before anything is written.

    Classes of a fold's pool with too few images for a query and `shot` supports cannot appear in that shot's
    lists; they are recorded per list (`classes_without_episodes`) and in the manifest's `warnings`, since
    the 1- and k-shot means then average different class sets."""
    out = Path(out or cfg.out)
    index = load_index(data.prepared)
    protocol = {**index["protocol"], "query_class": data.query_class}
    jobs = [(fold, split, shot, order, seed)
            for fold in cfg.folds for shot in cfg.shots for order in cfg.orders
            for split, seeds in (("test", cfg.test_seeds), ("val", cfg.val_seeds)) for seed in seeds]
    # The all-classes source split (PATNet's cross-domain source model) is only ever validated.
    jobs += [(ALL, "val", shot, order, seed) for shot in cfg.shots for order in cfg.orders for seed in cfg.val_seeds]
    drawn: list[tuple[Path, dict[str, Any]]] = []
    files, warnings = [], []
    fold_cache: dict[Split, dict[str, Any]] = {}
    present_cache: dict[tuple[Split, str], dict[str, list[int]] | None] = {}
    for fold, split, shot, order, seed in tqdm(jobs, desc="episode lists", disable=not progress, unit="list"):
        lists = fold_cache.setdefault(fold, load_fold(data.prepared, fold))
        # Checkpoint selection never looks at the test list's episodes: it uses the separate validation
        # pool when the dataset has one, else the test pool drawn with the (different) validation seeds.
        pool = "val" if split == "val" and lists["val"] else "test"
        if split == "val" and pool == "test" and seed in cfg.test_seeds:
            raise DataError(f"episodes.val_seeds: seed {seed} is also a test seed; validation would "
                            "repeat test episodes (the dataset has no separate validation pool)")
        entries = [(key, classes) for key, classes in lists[pool]]
        if (fold, pool) not in present_cache:
            present_cache[fold, pool] = present_classes(index, data, lists, pool)
        present = present_cache[fold, pool]
        count = cfg.test_episodes if split == "test" else cfg.val_episodes
        where = f"episodes fold {fold} {split} ({pool} pool) {shot}-shot {order} seed {seed}"
        try:
            episodes = sample_episodes(entries, shot, count, seed, order, present=present)
            check_episodes(episodes, entries, shot, present=present)
        except DataError as exc:
            raise DataError(f"{where}: {exc}; nothing was written") from None
        dropped = sorted(set(class_pools(entries)) - episode_classes(entries, shot, order, present))
        warning = (f"fold {fold} {split}: class(es) {dropped} have fewer than {shot + 1} images in the {pool} "
                   f"pool, so no {shot}-shot episode holds them")
        if dropped and warning not in warnings:  # once per fold, split and shot, not per seed and order
            warnings.append(warning)
        path = list_path(out, fold, split, shot, order, seed)
        drawn.append((path, {"dataset": index["dataset"], "fold": fold, "split": split, "pool": pool,
                             "shot": shot, "order": order, "seed": seed, "protocol": protocol,
                             "classes_without_episodes": dropped, "episodes": episodes}))
        files.append({"path": str(path.relative_to(out)), "fold": fold, "split": split, "pool": pool,
                      "shot": shot, "order": order, "seed": seed, "episodes": len(episodes)})
    ways = draw_way_lists(index, data, cfg, out)  # FS-CS N-way test lists (episodes.ways > 1; data/ways.py)
    files += [{"path": str(path.relative_to(out)), **{k: payload[k] for k in ("fold", "split", "pool", "ways", "shot",
                                                                           "order", "seed")},
               "episodes": len(payload["episodes"])} for path, payload in ways]
    targets = draw_target_lists(data, cfg, out, progress)
    for path, payload in [*drawn, *ways, *targets]:
        write_json_atomic(path, payload, indent=None)
    files += [{"path": str(path.relative_to(out)), "target": payload["target"], "split": payload["split"],
               "shot": payload["shot"], "seed": payload["seed"], "episodes": len(payload["episodes"])}
              for path, payload in targets]
    pools = {payload["target"]: {"target_val_fraction": cfg.target_val_fraction} for _, payload in targets}
    for _, payload in targets:
        pools[payload["target"]][f"{payload['pool']}_samples"] = payload["pool_samples"]
    manifest = {"protocol": protocol, "fingerprint": index["fingerprint"], "files": files,
                "target_pools": pools, "warnings": warnings}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def draw_target_lists(data: DataConfig, cfg: EpisodesConfig, out: Path,
                      progress: bool) -> list[tuple[Path, dict[str, Any]]]:
    """PATNet-protocol lists for every configured cross-domain target (1-way), drawn but not written: (path,
    list) pairs. An error names the target, shot and seed.

    With `episodes.target_val_fraction` > 0 each target's images are split first (`target_pools`): the
    selection pool gets `val` lists (each shot and validation seed, `episodes.val_episodes` episodes) that
    promotion and a target-scored sweep read; the `test` lists (each shot and test seed) draw their queries and
    supports from the other images only, so no selection image is ever a test query and no test query is ever
    seen in selection. With 0, the test lists draw from every image, as PATNet does, and there is no `val` list.
    """
    from fssmeta.data.targets import read_target

    drawn = []
    for name, target in tqdm(sorted(data.targets.items()), desc="target lists", disable=not progress, unit="set"):
        target_set = read_target(name, target.layout, target.root)
        pools = target_pools(target_set, cfg)
        splits = [("test", "test", cfg.test_seeds, cfg.target_episodes)]
        if cfg.target_val_fraction > 0:
            splits.append(("val", "selection", cfg.val_seeds, cfg.val_episodes))
        for split, pool, seeds, count in splits:
            by_class = pools[pool]
            for shot in cfg.shots:
                for seed in seeds:
                    try:
                        episodes = sample_target_episodes(by_class, shot, count, seed,
                                                          one_per_query=target.layout == "fss1000")
                    except DataError as exc:
                        raise DataError(f"episodes target {name} ({target.root}) {split} ({pool} pool) {shot}-shot "
                                        f"seed {seed}: {exc}; nothing was written") from None
                    drawn.append((target_list_path(out, name, shot, seed, split),
                                  {"target": name, "layout": target.layout, "root": target.root,
                                   "classes": list(target_set.classes), "split": split, "pool": pool,
                                   "target_val_fraction": cfg.target_val_fraction,
                                   "pool_samples": sum(len(keys) for keys in by_class.values()),
                                   "shot": shot, "seed": seed, "episodes": episodes}))
    return drawn


def target_pools(target_set: TargetSet, cfg: EpisodesConfig) -> dict[str, dict[int, list[int]]]:
    """A target's samples per class in its `test` and `selection` pools (`sampler.selection_images`);
    the selection pool is empty at `episodes.target_val_fraction` 0. A class left with too few images in
    either pool for a query and max(`episodes.shots`) supports stops the stage, naming the target, the
    class and the key."""
    by_class = target_set.by_class()
    if cfg.target_val_fraction == 0:
        return {"test": by_class, "selection": {}}
    image_of = [str(sample.image) for sample in target_set.samples]
    held = selection_images(by_class, image_of, cfg.target_val_fraction)
    selection = {c: [i for i in keys if image_of[i] in held] for c, keys in by_class.items()}
    test = {c: [i for i in keys if image_of[i] not in held] for c, keys in by_class.items()}
    need = max(cfg.shots) + 1
    short = [f"class {target_set.classes[c]} has {len(by_class[c])} images: {len(selection[c])} for selection, "
             f"{len(test[c])} for test" for c in by_class if min(len(selection[c]), len(test[c])) < need]
    if short:
        if len(short) > 5:  # FSS-1000 has 240 classes: name a few
            short = [*short[:5], f"and {len(short) - 5} more classes"]
        raise DataError(f"episodes target {target_set.name} ({target_set.root}): {'; '.join(short)}; each pool needs "
                        f"at least {need} images of a class for {need - 1}-shot episodes (a query and {need - 1} "
                        f"supports). Change episodes.target_val_fraction ({cfg.target_val_fraction}; 0 = no "
                        "selection lists, and no promotion on this target) or episodes.shots; nothing was written")
    return {"test": test, "selection": selection}


def load_episode_list(path: str | Path) -> dict[str, Any]:
    data = read_json(path, "episode list")
    if not isinstance(data, dict) or "episodes" not in data:
        raise DataError(f"{path}: not an episode list (no 'episodes' key)")
    return data
