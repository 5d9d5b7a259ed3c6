"""iFSL's FS-CS scoring (docs/protocol.md section 4): a method whose record says `fscs`, on the N-way test lists
(`episodes.ways` > 1, fssmeta/data/ways.py), scored by mIoU over the merged argmax, per class as the official
fs-cs evaluation accumulates it, and by the exact ratio (ER) of its presence decisions; per test seed, beside
the 1-way results of the same checkpoint."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fssmeta import distributed
from fssmeta.config import Config
from fssmeta.data.dataset import IndexSource, episode_loader
from fssmeta.data.episode_lists import load_episode_list
from fssmeta.data.transforms import TestTransform
from fssmeta.data.ways import WayEpisodeDataset, way_list_path
from fssmeta.episode import IGNORE_INDEX, FSCSEpisode, SegOutput
from fssmeta.metrics import ExactRatioMeter, IoUMeter
from fssmeta.models.feature_cache import caching, evaluation_cache
from fssmeta.models.method import Method
from fssmeta.train import run_episodes


def scores_ways(cfg: Config, record: Method, regime: str) -> bool:
    """Whether an evaluation of `record` under `regime` also scores the N-way lists: `episodes.ways` > 1, a
    method that does FS-CS, and no test-time adaptation (tta / finetune adapt on 1-way views only)."""
    return cfg.episodes.ways > 1 and record.fscs and regime == "none"


def update_way_iou(meter: IoUMeter, pred: torch.Tensor, target: torch.Tensor, class_ids: torch.Tensor) -> None:
    """Add a batch of N-way predictions, way by way: the pixels predicted n (the argmax over background and the
    N ways) against the pixels of way n's class, into that class's intersection and union. As the official
    `AverageMeter.update_seg` (a histogram per way, scattered to the class ids): a class absent from the query
    still adds the pixels predicted as it to its union. pred (B, H, W) 0..N; target (B, H, W) 0..N / 255;
    class_ids (B, N). The meter's pooled FB-IoU sums become per-way sums, meaningless here: unreported."""
    ignored = target == IGNORE_INDEX
    for n in range(class_ids.shape[1]):
        way_target = torch.where(ignored, target, (target == n + 1).long())
        meter.update((pred == n + 1).long(), way_target, class_ids[:, n])


@torch.no_grad()
def evaluate_ways(model: nn.Module, loader: Iterable[FSCSEpisode], num_classes: int, *, amp: bool | str = False,
                  progress: bool = False, desc: str = "FS-CS",
                  score_logits: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]) -> tuple[IoUMeter, ExactRatioMeter]:
    """Score fixed N-way episodes: the (1 + N)-channel logits mapped to the query mask's size by
    `score_logits`, argmax, class-wise IoU (`update_way_iou`); the forward's presence against the query's, ER.
    Both meters are reduced across ranks."""
    iou, exact = IoUMeter(num_classes), ExactRatioMeter()

    def score(out: SegOutput, episode: FSCSEpisode) -> None:
        if out.presence is None:
            raise ValueError(f"{type(model).__name__} returned no class presence for an N-way episode")
        pred = score_logits(out.logits.float(), tuple(episode.query_mask.shape[-2:])).argmax(1)
        update_way_iou(iou, pred, episode.query_mask, episode.class_ids)
        exact.update(out.presence.cpu(), episode.presence.cpu())

    run_episodes(model, loader, score, amp=amp, progress=progress, desc=desc)
    iou.reduce_(distributed.all_reduce_sum)
    exact.reduce_(distributed.all_reduce_sum)
    return iou, exact


def score_way_lists(cfg: Config, model: nn.Module, fold: int, shot: int, source: IndexSource,
                    transform: TestTransform, n_classes: int, progress: bool, desc: str) -> dict[str, Any]:
    """`model` on each test seed's `episodes.ways`-way list of (fold, shot) (the first `eval.episodes`),
    through one frozen-feature cache when `eval.feature_cache_mib` > 0: ER and mIoU per seed, their mean and
    population std over seeds."""
    cache = evaluation_cache(cfg.eval.feature_cache_mib)
    ways = cfg.episodes.ways
    seeds = []
    with caching(model, cache):
        for seed in cfg.episodes.test_seeds:
            path: Path = way_list_path(cfg.episodes.out, fold, "test", ways, shot, cfg.eval.episode_order, seed)
            episodes = load_episode_list(path)["episodes"]
            episodes = episodes[: cfg.eval.episodes] if cfg.eval.episodes else episodes
            loader = episode_loader(WayEpisodeDataset(episodes, source, transform), batch_size=cfg.eval.batch_size,
                                    num_workers=cfg.eval.num_workers)
            iou, exact = evaluate_ways(model, loader, n_classes, amp=cfg.eval.amp, progress=progress,
                                       desc=f"{desc} {ways}-way seed {seed}", score_logits=transform.score_logits)
            flags = [p for ep in episodes for p in ep["presence"]]
            seeds.append({"seed": seed, "er": exact.value(), "miou": iou.miou(), "episodes": len(episodes),
                          "presence_rate": sum(flags) / len(flags),
                          "per_class": {str(c): v for c, v in iou.per_class_iou().items()}})
    ers, mious = [s["er"] for s in seeds], [s["miou"] for s in seeds]
    return {"ways": ways, "er_mean": statistics.fmean(ers), "er_std": statistics.pstdev(ers),
            "miou_mean": statistics.fmean(mious), "miou_std": statistics.pstdev(mious), "seeds": seeds}


def way_means(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """The FS-CS entry of a results `mean` block: {"fscs": {ways, er, miou}} (means over the folds' per-shot
    results given), or {} when they hold none."""
    scored = [r["fscs"] for r in per_fold if "fscs" in r]
    if not scored:
        return {}
    return {"fscs": {"ways": scored[0]["ways"], "er": statistics.fmean(s["er_mean"] for s in scored),
                     "miou": statistics.fmean(s["miou_mean"] for s in scored)}}


def add_way_metrics(row: dict[str, Any], per_fold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A `metrics.json` row (report.metrics: one method and shot) with the FS-CS scores added when the folds
    hold them: `er_<N>way` and `miou_<N>way`, the fold mean and each fold's mean over seeds."""
    means = way_means(list(per_fold.values())).get("fscs")
    if means is None:
        return row
    er, miou = f"er_{means['ways']}way", f"miou_{means['ways']}way"
    row = {**row, er: means["er"], miou: means["miou"]}
    for fold, s in ((f, r["fscs"]) for f, r in per_fold.items() if "fscs" in r):
        row[fold] = {**row.get(fold, {}), er: s["er_mean"], miou: s["miou_mean"]}
    return row


def fscs_markdown(collected: dict[str, dict[str, Any]], shots: tuple[int, ...]) -> str:
    """The FS-CS table of the report: per method and shot with N-way results, each fold's ER and mIoU (mean ±
    std over seeds) and their fold means; "" when no method has any."""
    lines = []
    for method, entry in collected.items():
        folds = sorted(entry["results"])
        for shot in shots:
            scored = [entry["results"][f][f"{shot}shot"].get("fscs") for f in folds]
            if not all(scored):
                continue
            if not lines:
                lines = ["| method | ways | shot | " + " | ".join(f"{f} ER / mIoU" for f in folds)
                         + " | mean ER | mean mIoU |", "|" + "---|" * (len(folds) + 5)]
            cells = [f"{100 * s['er_mean']:.1f} ± {100 * s['er_std']:.1f} / {100 * s['miou_mean']:.1f} ± "
                     f"{100 * s['miou_std']:.1f}" for s in scored]
            er = statistics.fmean(s["er_mean"] for s in scored)
            miou = statistics.fmean(s["miou_mean"] for s in scored)
            lines.append(f"| {method} | {scored[0]['ways']} | {shot} | " + " | ".join(cells)
                         + f" | **{100 * er:.1f}** | **{100 * miou:.1f}** |")
    if not lines:
        return ""
    return "\n".join([*lines, "", "ER: share of episodes whose N presence decisions (max foreground probability "
                      ">= 0.5) are all right; mIoU: per class over the merged argmax of background and the N ways, "
                      "summed over each list; in %, mean ± std over test seeds (docs/protocol.md section 4)."]) + "\n"
