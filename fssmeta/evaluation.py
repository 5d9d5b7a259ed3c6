"""Scoring on the fixed episode lists: per (fold, shot) on the test lists, the scoring core every list goes
through (`score_lists`), and the regimes (none / tta / finetune). Results layout:
`<eval.out>/fold<k>/<method>[-<regime>].json` (one file per fold, written by `fssmeta evaluate` and the
evaluate stage alike, read by the report). Cross-domain scoring is fssmeta/cross_domain.py."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fssmeta import distributed
from fssmeta.adaptation import with_regime
from fssmeta.config import Config, TTAConfig
from fssmeta.data import folds
from fssmeta.data.dataset import EpisodeDataset, IndexSource, episode_loader
from fssmeta.data.episode_lists import list_path, load_episode_list
from fssmeta.data.io import DataError, write_json_atomic
from fssmeta.data.prepare import load_index
from fssmeta.data.transforms import TestTransform
from fssmeta.fscs import score_way_lists, scores_ways, way_means
from fssmeta.metrics import IoUMeter
from fssmeta.models import get_method
from fssmeta.models.feature_cache import caching, evaluation_cache
from fssmeta.runs import default_device, evaluation_model
from fssmeta.train import evaluate


def scoring_transform(cfg: Config, method: str | None = None) -> TestTransform:
    """The source-domain test transform of `method` (default `model.method`): `eval.resolution` at
    `eval.size`, on the canvas `eval.canvas` names, or the method's own for `method` (docs/protocol.md
    section 4)."""
    canvas = get_method(method or cfg.model.method).test_canvas(cfg.eval.canvas)
    return TestTransform(cfg.eval.resolution, cfg.eval.size, canvas=canvas)


def backbone_record(cfg: Config, method: str) -> str:
    """Where `method`'s frozen backbone came from, for the results' protocol record and the report."""
    stage1 = get_method(method).stage1_for(cfg.model)
    if stage1 is not None and stage1.part == "base_learner":
        return f"{cfg.model.backbone}, the stage-1 PSPNet's (base learner)"
    if stage1 is not None:
        return f"{cfg.model.backbone}, the stage-1 PSPNet encoder (model.backbone_source: stage1)"
    return f"{cfg.model.backbone}, {cfg.model.weights or 'random init'} (model.weights)"


def summarise(scores: list[dict[str, Any]]) -> dict[str, Any]:
    mious = [s["miou"] for s in scores]
    fbs = [s["fb_iou"] for s in scores]
    # population std over seeds (numpy's default, as the multi-seed papers report it)
    return {"miou_mean": statistics.fmean(mious), "miou_std": statistics.pstdev(mious),
            "fbiou_mean": statistics.fmean(fbs), "fbiou_std": statistics.pstdev(fbs), "seeds": scores}


def score_lists(cfg: Config, model: torch.nn.Module, paths: dict[int, Path], source: Any, transform: TestTransform,
                 n_classes: int, progress: bool, desc: str, *, id_offset: int = 0,
                 names: tuple[str, ...] | None = None, keep: set[int] | None = None) -> list[dict[str, Any]]:
    """Score `model` on each seed's fixed list (the first `eval.episodes`); one score dict per seed.

    `id_offset` shifts the lists' class ids (target lists count classes from 0, meters from 1); `names`
    labels per-class IoUs by class name instead of id; `keep` (list class ids) drops every episode of another
    class before the first `eval.episodes` are taken. With `eval.feature_cache_mib` > 0 one frozen-feature
    cache serves all of this model's lists (models/feature_cache.py; the logits are exactly the uncached ones).
    """
    cache = evaluation_cache(cfg.eval.feature_cache_mib)
    lists = {}
    for seed, path in paths.items():
        episodes = load_episode_list(path)["episodes"]
        episodes = episodes if keep is None else [ep for ep in episodes if ep["class_id"] in keep]
        episodes = episodes[: cfg.eval.episodes] if cfg.eval.episodes else episodes
        lists[seed] = [{**ep, "class_id": ep["class_id"] + id_offset} for ep in episodes] if id_offset else episodes

    def score(episodes: list[dict[str, Any]], label: str, show: bool = progress) -> IoUMeter:
        loader = episode_loader(EpisodeDataset(episodes, source, transform), batch_size=cfg.eval.batch_size,
                                num_workers=cfg.eval.num_workers)
        return evaluate(model, loader, n_classes, amp=cfg.eval.amp, progress=show, desc=f"{desc} {label}",
                        score_logits=transform.score_logits)

    with caching(model, cache):
        if cache is None:
            meters = {seed: score(episodes, f"seed {seed}") for seed, episodes in lists.items()}
        else:
            # Class by class across every seed's list, so a bounded cache holds one class's images while all
            # the lists use them; each seed keeps its own meter. No figure can change: a meter is float64
            # sums of integer pixel counts, exact in any order and merged by addition.
            meters = {seed: IoUMeter(n_classes) for seed in lists}
            total = sum(len(episodes) for episodes in lists.values())
            with tqdm(total=total, desc=f"{desc} (cached, by class)", unit="ep", leave=False,
                      disable=not (progress and distributed.is_main_process())) as bar:
                for class_id in sorted({ep["class_id"] for episodes in lists.values() for ep in episodes}):
                    for seed, episodes in lists.items():
                        chunk = [ep for ep in episodes if ep["class_id"] == class_id]
                        if chunk:
                            meters[seed].merge(score(chunk, f"seed {seed} class {class_id}", show=False))
                            bar.update(len(chunk))
    scores = []
    for seed, meter in meters.items():
        per_class = {(names[c - 1] if names else str(c)): v for c, v in meter.per_class_iou().items()}
        scores.append({"seed": seed, "miou": meter.miou(), "fb_iou": meter.fb_iou(), "episodes": len(lists[seed]),
                       "per_class": per_class})
    if cache is not None and progress and distributed.is_main_process():
        tqdm.write(f"{desc}: {cache.describe()}")
    return scores


def evaluate_method(cfg: Config, method: str | None = None, *, progress: bool = True,
                    device: torch.device | None = None, regime: str | None = None) -> dict[str, Any]:
    """Score every (fold, shot) in `eval.folds` x `eval.shots` on every test seed's fixed list under `regime`
    (default `eval.regime`); write one `<eval.out>/fold<k>/<method>[-tta].json` per fold (the layout the
    report reads) and return all folds together."""
    device = device or default_device()
    method = method or cfg.model.method
    regime = regime or cfg.eval.regime
    record = get_method(method)
    cfg = regime_config(cfg, method, regime)
    index = load_index(cfg.data.prepared)
    source = IndexSource(index)
    transform = scoring_transform(cfg, method)
    n_classes = folds.num_classes(cfg.data.dataset)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for fold in cfg.eval.folds:
        for shot in cfg.eval.shots:
            model = with_regime(evaluation_model(cfg, fold, shot, method, device), regime,
                                regime_settings(cfg, regime))
            paths = {seed: list_path(cfg.episodes.out, fold, "test", shot, cfg.eval.episode_order, seed)
                     for seed in cfg.episodes.test_seeds}
            scores = score_lists(cfg, model, paths, source, transform, n_classes, progress,
                                  f"{method} fold {fold} {shot}-shot")
            results.setdefault(f"fold{fold}", {})[f"{shot}shot"] = summarise(scores)
            if scores_ways(cfg, record, regime):  # iFSL's FS-CS: ER and mIoU on the N-way lists (fscs.py)
                results[f"fold{fold}"][f"{shot}shot"]["fscs"] = score_way_lists(
                    cfg, model, fold, shot, source, transform, n_classes, progress, f"{method} fold {fold} {shot}-shot")
    mean = {}
    for shot in cfg.eval.shots:
        per_fold = [results[f"fold{f}"][f"{shot}shot"]["miou_mean"] for f in cfg.eval.folds]
        per_fold_fb = [results[f"fold{f}"][f"{shot}shot"]["fbiou_mean"] for f in cfg.eval.folds]
        mean[f"{shot}shot"] = {"miou": statistics.fmean(per_fold), "fb_iou": statistics.fmean(per_fold_fb),
                               **way_means([results[f"fold{f}"][f"{shot}shot"] for f in cfg.eval.folds])}
    protocol = {**index["protocol"], "query_class": cfg.data.query_class,
                "train_query_class": cfg.data.training_query_class,
                "resolution": cfg.eval.resolution,
                "test_size": cfg.eval.size, "canvas": transform.canvas if cfg.eval.resolution == "original" else "none",
                "episode_order": cfg.eval.episode_order, "test_seeds": list(cfg.episodes.test_seeds),
                "regime": regime_record(cfg, regime),
                "episodes_per_list": cfg.eval.episodes or "all",
                "checkpoint_selection": "validation list" if record.learned else "none",
                "backbone": backbone_record(cfg, record.key), "backbone_bn": record.bn_mode(cfg.model),
                "trained_shots": "each shot" if record.trains_each_shot else "1 (evaluated at every shot)",
                **({"fscs_ways": cfg.episodes.ways} if scores_ways(cfg, record, regime) else {})}
    seconds = time.perf_counter() - start
    for fold in cfg.eval.folds:
        per_fold = {"method": method, "protocol": protocol, "results": {f"fold{fold}": results[f"fold{fold}"]},
                    "mean": {k: {"miou": v["miou_mean"], "fb_iou": v["fbiou_mean"], **way_means([v])}
                             for k, v in results[f"fold{fold}"].items()}}
        write_json_atomic(result_path(cfg, fold, method, regime), per_fold)
    return {"method": method, "regime": regime, "protocol": protocol, "results": results, "mean": mean, "seconds": seconds}


def result_path(cfg: Config, fold: int, method: str, regime: str = "none") -> Path:
    """Where a fold's evaluation of `method` lives: `<eval.out>/fold<k>/<method>.json`, and under the
    `tta` regime `<method>-tta.json` beside it."""
    return Path(cfg.eval.out) / f"fold{fold}" / f"{method}{regime_suffix(regime)}.json"


def regime_suffix(regime: str) -> str:
    return "" if regime == "none" else f"-{regime}"


def regime_settings(cfg: Config, regime: str) -> TTAConfig:
    """The settings of an adapting regime: `eval.tta` or `eval.finetune` (`eval.tta` for `none`, unread)."""
    return cfg.eval.finetune if regime == "finetune" else cfg.eval.tta


def regime_config(cfg: Config, method: str, regime: str) -> Config:
    """`cfg` as `method` is scored under `regime`: under tta / finetune, `eval.<regime>.episodes` (when set)
    episodes per list. Both adapt learned parameters, so every learned method may be scored under either
    (finetune is CRNet's k-shot inference, and a like-for-like row for the others); a non-learned one cannot."""
    if regime != "none" and not get_method(method).learned:
        raise DataError(f"eval.regime {regime}: {method} learns nothing, so there is nothing to adapt at test time "
                        "(eval.regime / eval.target_regimes: use none for it)")
    episodes = regime_settings(cfg, regime).episodes
    if regime == "none" or not episodes:
        return cfg
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"episodes": episodes})})


def regime_record(cfg: Config, regime: str) -> dict[str, Any]:
    """The regime as results record it: its name and, for tta / finetune, its settings under its name."""
    settings = {} if regime == "none" else {regime: regime_settings(cfg, regime).model_dump(mode="json")}
    return {"name": regime, **settings}


def format_report(report: dict[str, Any]) -> str:
    """A readable table: mIoU (mean +- std over seeds) and FB-IoU per fold and shot, and the fold mean."""
    shots = list(report["mean"])
    lines = [f"{report['method']}  ({report['protocol']['dataset']}, {report['protocol']['resolution']}, "
             f"order {report['protocol']['episode_order']}, seeds {report['protocol']['test_seeds']})",
             "fold    " + "".join(f"{s:>24}" for s in shots)]
    for fold, per_shot in report["results"].items():
        cells = "".join(f"{100 * r['miou_mean']:>10.1f} +- {100 * r['miou_std']:4.1f} ({100 * r['fbiou_mean']:4.1f})"
                        for r in per_shot.values())
        lines.append(f"{fold:<8}{cells}")
    lines.append("mean    " + "".join(f"{100 * m['miou']:>18.1f} ({100 * m['fb_iou']:4.1f})" for m in report["mean"].values()))
    lines.append("cells: mIoU mean +- std over seeds (FB-IoU), in %")
    for shot, m in report["mean"].items():  # iFSL's FS-CS task, when scored
        if "fscs" in m:
            lines.append(f"FS-CS {m['fscs']['ways']}-way {shot}: ER {100 * m['fscs']['er']:.1f}, "
                         f"mIoU {100 * m['fscs']['miou']:.1f} (fold mean, %)")
    return "\n".join(lines)


