"""`episodes`: write the fixed test and validation episode lists per (fold, shot, order, seed) as JSON.

Every evaluation reads these files, so every model is scored on identical episodes. Layout under `out`:
`fold<k>/<split>_<shot>shot_<order>_seed<seed>.json`, `targets/<name>/test_<shot>shot_seed<seed>.json`,
and `manifest.json` (written last) naming every file with the protocol it was drawn under: the prepared
index's record plus `query_class` (`data.query_class`, docs/protocol.md section 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from fssmeta.config import DataConfig, EpisodesConfig
from fssmeta.data.io import DataError, read_json, write_json_atomic
from fssmeta.data.prepare import load_fold, load_index, present_classes
from fssmeta.data.sampler import (
    check_episodes,
    class_pools,
    episode_classes,
    sample_episodes,
    sample_target_episodes,
)


def list_path(out: str | Path, fold: int, split: str, shot: int, order: str, seed: int) -> Path:
    return Path(out) / f"fold{fold}" / f"{split}_{shot}shot_{order}_seed{seed}.json"


def target_list_path(out: str | Path, name: str, shot: int, seed: int) -> Path:
    return Path(out) / "targets" / name / f"test_{shot}shot_seed{seed}.json"


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
    drawn: list[tuple[Path, dict[str, Any]]] = []
    files, warnings = [], []
    fold_cache: dict[int, dict[str, Any]] = {}
    present_cache: dict[tuple[int, str], dict[str, list[int]] | None] = {}
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
    targets = draw_target_lists(data, cfg, out, progress)
    for path, payload in [*drawn, *targets]:
        write_json_atomic(path, payload, indent=None)
    files += [{"path": str(path.relative_to(out)), "target": payload["target"], "shot": payload["shot"],
               "seed": payload["seed"], "episodes": len(payload["episodes"])} for path, payload in targets]
    manifest = {"protocol": protocol, "fingerprint": index["fingerprint"], "files": files,
                "warnings": warnings}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def draw_target_lists(data: DataConfig, cfg: EpisodesConfig, out: Path,
                      progress: bool) -> list[tuple[Path, dict[str, Any]]]:
    """PATNet-protocol lists for every configured cross-domain target (1-way, each shot and test seed), drawn
    but not written: (path, list) pairs. An error names the target, shot and seed."""
    from fssmeta.data.targets import read_target

    drawn = []
    for name, target in tqdm(sorted(data.targets.items()), desc="target lists", disable=not progress, unit="set"):
        target_set = read_target(name, target.layout, target.root)
        by_class = target_set.by_class()
        for shot in cfg.shots:
            for seed in cfg.test_seeds:
                try:
                    episodes = sample_target_episodes(by_class, shot, cfg.target_episodes, seed,
                                                      one_per_query=target.layout == "fss1000")
                except DataError as exc:
                    raise DataError(f"episodes target {name} ({target.root}) {shot}-shot seed {seed}: {exc}; "
                                    "nothing was written") from None
                drawn.append((target_list_path(out, name, shot, seed),
                              {"target": name, "layout": target.layout, "root": target.root,
                               "classes": list(target_set.classes), "shot": shot, "seed": seed,
                               "episodes": episodes}))
    return drawn


def load_episode_list(path: str | Path) -> dict[str, Any]:
    data = read_json(path, "episode list")
    if not isinstance(data, dict) or "episodes" not in data:
        raise DataError(f"{path}: not an episode list (no 'episodes' key)")
    return data
