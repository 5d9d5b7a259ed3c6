"""Scoring on the fixed episode lists: per (fold, shot) on the test lists, per cross-domain target (PATNet
protocol), and per domain for promotion. Results layout: `<eval.out>/fold<k>/<method>.json` (one file per
fold, written by `fssmeta evaluate` and the evaluate stage alike, read by the report) and
`<eval.out>/targets/<method>-fold<k>.json`."""

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
from fssmeta.data.dataset import EpisodeDataset, IndexSource, TargetSource, episode_loader
from fssmeta.data.episode_lists import list_path, load_episode_list, target_list_path
from fssmeta.data.io import DataError, read_json, write_json_atomic
from fssmeta.data.prepare import load_index
from fssmeta.data.targets import read_target
from fssmeta.data.transforms import TestTransform
from fssmeta.metrics import IoUMeter
from fssmeta.models import get_method
from fssmeta.models.feature_cache import FeatureCache, caching
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


def _summarise(scores: list[dict[str, Any]]) -> dict[str, Any]:
    mious = [s["miou"] for s in scores]
    fbs = [s["fb_iou"] for s in scores]
    # population std over seeds (numpy's default, as the multi-seed papers report it)
    return {"miou_mean": statistics.fmean(mious), "miou_std": statistics.pstdev(mious),
            "fbiou_mean": statistics.fmean(fbs), "fbiou_std": statistics.pstdev(fbs), "seeds": scores}


def _score_lists(cfg: Config, model: torch.nn.Module, paths: dict[int, Path], source: Any, transform: TestTransform,
                 n_classes: int, progress: bool, desc: str, *, id_offset: int = 0,
                 names: tuple[str, ...] | None = None, keep: set[int] | None = None) -> list[dict[str, Any]]:
    """Score `model` on each seed's fixed list (the first `eval.episodes`); one score dict per seed.

    `id_offset` shifts the lists' class ids (target lists count classes from 0, meters from 1); `names`
    labels per-class IoUs by class name instead of id; `keep` (list class ids) drops every episode of another
    class before the first `eval.episodes` are taken. With `eval.feature_cache_mib` > 0 one frozen-feature
    cache serves all of this model's lists (models/feature_cache.py; the logits are exactly the uncached ones).
    """
    cache = FeatureCache(cfg.eval.feature_cache_mib * 2**20) if cfg.eval.feature_cache_mib else None
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
            scores = _score_lists(cfg, model, paths, source, transform, n_classes, progress,
                                  f"{method} fold {fold} {shot}-shot")
            results.setdefault(f"fold{fold}", {})[f"{shot}shot"] = _summarise(scores)
    mean = {}
    for shot in cfg.eval.shots:
        per_fold = [results[f"fold{f}"][f"{shot}shot"]["miou_mean"] for f in cfg.eval.folds]
        per_fold_fb = [results[f"fold{f}"][f"{shot}shot"]["fbiou_mean"] for f in cfg.eval.folds]
        mean[f"{shot}shot"] = {"miou": statistics.fmean(per_fold), "fb_iou": statistics.fmean(per_fold_fb)}
    protocol = {**index["protocol"], "query_class": cfg.data.query_class,
                "train_query_class": cfg.data.training_query_class,
                "resolution": cfg.eval.resolution,
                "test_size": cfg.eval.size, "canvas": transform.canvas if cfg.eval.resolution == "original" else "none",
                "episode_order": cfg.eval.episode_order, "test_seeds": list(cfg.episodes.test_seeds),
                "regime": regime_record(cfg, regime),
                "episodes_per_list": cfg.eval.episodes or "all",
                "checkpoint_selection": "validation list" if record.learned else "none",
                "backbone": backbone_record(cfg, record.key), "backbone_bn": record.bn_mode(cfg.model),
                "trained_shots": "each shot" if record.trains_each_shot else "1 (evaluated at every shot)"}
    seconds = time.perf_counter() - start
    for fold in cfg.eval.folds:
        per_fold = {"method": method, "protocol": protocol, "results": {f"fold{fold}": results[f"fold{fold}"]},
                    "mean": {k: {"miou": v["miou_mean"], "fb_iou": v["fbiou_mean"]}
                             for k, v in results[f"fold{fold}"].items()}}
        write_json_atomic(result_path(cfg, fold, method, regime), per_fold)
    return {"method": method, "regime": regime, "protocol": protocol, "results": results, "mean": mean, "seconds": seconds}


def result_path(cfg: Config, fold: int, method: str, regime: str = "none") -> Path:
    """Where a fold's evaluation of `method` lives: `<eval.out>/fold<k>/<method>.json`, and under the
    `tta` regime `<method>-tta.json` beside it."""
    return Path(cfg.eval.out) / f"fold{fold}" / f"{method}{regime_suffix(regime)}.json"


def target_result_path(cfg: Config, method: str, fold: folds.Split, regime: str = "none") -> Path:
    """Where the cross-domain evaluation of `method`'s model of source split `fold` lives: for a fold,
    `<eval.out>/fold<k>/targets/<method>.json` (beside its in-domain results: the evaluate stage of that
    fold writes both); for the all-classes split, `<eval.out>/targets/<method>-all.json`; `-tta` before
    `.json` under tta."""
    if fold == folds.ALL:
        return Path(cfg.eval.out) / "targets" / f"{method}-{folds.ALL}{regime_suffix(regime)}.json"
    return Path(cfg.eval.out) / folds.split_name(fold) / "targets" / f"{method}{regime_suffix(regime)}.json"


def target_sources(cfg: Config) -> list[folds.Split]:
    """The source splits whose models score the targets under `eval.target_source`: `all` -> the all-classes
    split; `splits` -> every eval.folds fold; `fold` -> eval.target_fold."""
    source = cfg.eval.target_source
    return [folds.ALL] if source == "all" else list(cfg.eval.folds) if source == "splits" else [cfg.eval.target_fold]


def scores_targets(cfg: Config, fold: folds.Split) -> bool:
    """Whether the models of `fold` score the targets in the pipeline (data.targets set, and `fold` among
    `target_sources`)."""
    return bool(cfg.data.targets) and fold in target_sources(cfg)


def target_report(cfg: Config, method: str, regime: str = "none") -> dict[str, Any] | None:
    """`method`'s cross-domain result under `eval.target_source`, in `evaluate_targets`' shape (None while a
    file is missing): one source model's file as written, or for `splits` the mean over every split's file
    (`results[t][shot]`: mean and std over SPLITS of each split's test-seed mean) with the per-split rows."""
    paths = [target_result_path(cfg, method, fold, regime) for fold in target_sources(cfg)]
    if not all(p.is_file() for p in paths):
        return None
    reports = [read_json(p, f"cross-domain evaluation of {method} ({regime})") for p in paths]
    if cfg.eval.target_source != "splits":
        return {"source": cfg.eval.target_source, **reports[0]}
    summary = splits_summary(dict(zip(target_sources(cfg), reports, strict=True)))
    per = {t: {s: [row["targets"][t][s] for row in summary["per_split"].values()] for s in per_shot}
           for t, per_shot in summary["mean"].items()}
    results = {t: {s: {"miou_mean": statistics.fmean(v), "miou_std": statistics.pstdev(v)} for s, v in by.items()}
               for t, by in per.items()}
    return {"method": method, "source": "splits", "source_fold": "splits", "regime": regime,
            "protocol": summary["protocol"], "results": results,
            "mean_over_targets": summary["mean_over_targets"], "per_split": summary["per_split"]}


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


def evaluate_targets(cfg: Config, method: str | None = None, *, fold: folds.Split = 0, shot: int | None = None,
                     progress: bool = True, device: torch.device | None = None,
                     regime: str = "none") -> dict[str, Any]:
    """Cross-domain evaluation (PATNet protocol): the model trained on the source split `fold` (a fold, or
    `all` = every source class; selected on source-side validation episodes) scores every configured
    target's fixed 1-way lists, images and masks
    at `eval.resized_size` (400). Per target: mIoU over its classes, mean and std over test seeds; and the
    mean over targets. `regime` none, tta or finetune (`EpisodeAdaptation` on each episode's supports). Written to
    `target_result_path`."""
    device = device or default_device()
    method = method or cfg.model.method
    cfg = regime_config(cfg, method, regime)
    if not cfg.data.targets:
        raise DataError("data.targets is empty: configure at least one cross-domain target")
    shots = (shot,) if shot is not None else cfg.eval.shots
    results: dict[str, Any] = {}
    for s in shots:
        model = with_regime(evaluation_model(cfg, fold, s, method, device), regime, regime_settings(cfg, regime))
        for name in sorted(cfg.data.targets):
            scores = _target_scores(cfg, model, name, s, progress, f"{method} ({regime}) -> {name} {s}-shot",
                                    fold=fold)
            results.setdefault(name, {})[f"{s}shot"] = _summarise(scores)
    mean = {f"{s}shot": statistics.fmean(results[n][f"{s}shot"]["miou_mean"] for n in results) for s in shots}
    report = {"method": method, "source_fold": fold, "regime": regime, "protocol": {"resolution": "resized",
              "size": cfg.eval.resized_size, "test_seeds": list(cfg.episodes.test_seeds),
              "episodes_per_list": cfg.eval.episodes or "all", "checkpoint_selection": "source validation list",
              "regime": regime_record(cfg, regime)},
              "results": results, "mean_over_targets": mean}
    write_json_atomic(target_result_path(cfg, method, fold, regime), report)
    return report


def evaluate_target_splits(cfg: Config, method: str | None = None, *, progress: bool = True,
                           device: torch.device | None = None, regime: str = "none") -> dict[str, Any]:
    """RMT's cross-domain tables: the model of EVERY source split (`eval.folds`) scores every target
    (`evaluate_targets`, one results file per split as usual); the per-split rows and their mean are written
    to `target_splits_path`. A target result then no longer depends on which five classes one fold held out."""
    method = method or cfg.model.method
    per_split = {fold: evaluate_targets(cfg, method, fold=fold, progress=progress, device=device, regime=regime)
                 for fold in cfg.eval.folds}
    summary = {"method": method, "regime": regime, "source": "splits", **splits_summary(per_split)}
    write_json_atomic(target_splits_path(cfg, method, regime), summary)
    return summary


def splits_summary(per_split: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per split (fold) its targets' mIoU and their mean; per target and shot the mean over splits; the mean
    over splits of each split's mean over targets. `per_split` maps a fold to its `evaluate_targets` report."""
    first = next(iter(per_split.values()))
    shots, targets = list(first["mean_over_targets"]), list(first["results"])
    rows = {folds.split_name(fold): {"targets": {t: {s: r["results"][t][s]["miou_mean"] for s in shots} for t in targets},
                            "mean_over_targets": dict(r["mean_over_targets"])} for fold, r in per_split.items()}
    mean = {t: {s: statistics.fmean(row["targets"][t][s] for row in rows.values()) for s in shots} for t in targets}
    return {"folds": list(per_split), "protocol": first["protocol"], "per_split": rows, "mean": mean,
            "mean_over_targets": {s: statistics.fmean(row["mean_over_targets"][s] for row in rows.values())
                                  for s in shots}}


def target_splits_path(cfg: Config, method: str, regime: str = "none") -> Path:
    """`<eval.out>/targets/<method>-splits.json` (`-splits-tta.json` under tta): every split's model."""
    return Path(cfg.eval.out) / "targets" / f"{method}-splits{regime_suffix(regime)}.json"


def format_splits_report(summary: dict[str, Any]) -> str:
    """Per split and shot the mean over targets, then per target the mean over splits (RMT's layout)."""
    shots = list(summary["mean_over_targets"])
    lines = [f"{summary['method']} (every split's model, regime {summary['regime']}) on the targets",
             "row       " + "".join(f"{s:>10}" for s in shots)]
    for split, row in summary["per_split"].items():
        lines.append(f"{split:<10}" + "".join(f"{100 * row['mean_over_targets'][s]:>10.1f}" for s in shots))
    for target, per_shot in summary["mean"].items():
        lines.append(f"{target:<10}" + "".join(f"{100 * per_shot[s]:>10.1f}" for s in shots))
    lines.append("mean      " + "".join(f"{100 * summary['mean_over_targets'][s]:>10.1f}" for s in shots))
    lines.append("rows: a split's mean over targets; a target's mean over splits; the mean of the split means")
    return "\n".join(lines)


def _target_scores(cfg: Config, model: torch.nn.Module, name: str, shot: int, progress: bool,
                   desc: str, split: str = "test", fold: folds.Split = 0) -> list[dict[str, Any]]:
    """One score dict per seed of `model` (trained on source split `fold`) on target `name`'s fixed 1-way
    lists (PATNet protocol): its test lists (`episodes.test_seeds`), or with `split="val"` its selection lists
    (`episodes.val_seeds`); with `exclude_seen_classes`, the episodes of the classes it did not train on."""
    target = cfg.data.targets[name]
    target_set = read_target(name, target.layout, target.root)
    seeds = cfg.episodes.test_seeds if split == "test" else cfg.episodes.val_seeds
    paths = {seed: target_list_path(cfg.episodes.out, name, shot, seed, split) for seed in seeds}
    return _score_lists(cfg, model, paths, TargetSource(target_set), TestTransform("resized", cfg.eval.resized_size),
                        len(target_set.classes), progress, desc, id_offset=1, names=target_set.classes,
                        keep=unseen_classes(cfg, name, target_set.classes, fold))


def unseen_classes(cfg: Config, name: str, classes: tuple[str, ...], fold: folds.Split) -> set[int] | None:
    """With `data.targets.<name>.exclude_seen_classes` (RMT's COCO-20i -> PASCAL), the indices of the target's
    classes that source split `fold` did not train on, matched by name (`folds.canonical_name`); None = all.
    Nothing left (e.g. the all-classes source model) is a DataError naming both."""
    if not cfg.data.targets[name].exclude_seen_classes:
        return None
    seen = folds.seen_class_names(cfg.data.dataset, fold, cfg.data.coco_split)
    keep = {i for i, c in enumerate(classes) if folds.canonical_name(c) not in seen}
    if not keep:
        raise DataError(f"data.targets.{name}.exclude_seen_classes: the {cfg.data.dataset} model of source split "
                        f"{fold} trained on every class of target {name}, so none is left to score (use "
                        "eval.target_source splits, RMT's per-split protocol)")
    return keep


def _target_selection_scores(cfg: Config, model: torch.nn.Module, name: str, shot: int, progress: bool,
                             desc: str, fold: folds.Split = 0) -> list[dict[str, Any]]:
    """One score dict per validation seed of `model` on target `name`'s SELECTION lists
    (`targets/<name>/val_<shot>shot_seed<seed>.json`, drawn from images its test lists never use; docs/protocol.md
    section 5), scored as its test lists are. With `episodes.target_val_fraction` 0 there are none: refused."""
    if cfg.episodes.target_val_fraction == 0:
        raise DataError(f"target {name}: episodes.target_val_fraction is 0, so it has no selection episodes to choose "
                        "a model on (its test lists never are); set it > 0 and rerun the episodes stage")
    paths = [target_list_path(cfg.episodes.out, name, shot, seed, "val") for seed in cfg.episodes.val_seeds]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)}: no {shot}-shot selection list of target {name}; run the episodes "
                        "stage (`fssmeta episodes`) with episodes.target_val_fraction > 0")
    return _target_scores(cfg, model, name, shot, progress, desc, split="val", fold=fold)


def domains(cfg: Config) -> list[str]:
    """The domains a model is scored and promoted on: `source` and every data.targets name."""
    return ["source", *sorted(cfg.data.targets)]


def score_domain(cfg: Config, model: torch.nn.Module, domain: str, *, fold: folds.Split, shot: int,
                 progress: bool = False, method: str | None = None) -> float:
    """Mean mIoU over validation seeds of `model` on one domain's fixed SELECTION episodes, for choosing among
    models on the SAME episodes (promotion, target-scored sweeps), never on test lists: `source` = the fold's
    validation list(s); a `data.targets` name = its 1-way selection lists (`_target_selection_scores`, PATNet
    protocol, `eval.resized_size`). `method` (default `model.method`) is the model's method, whose canvas
    `eval.canvas: method` picks."""
    if domain == "source":
        paths = {seed: list_path(cfg.episodes.out, fold, "val", shot, cfg.eval.episode_order, seed)
                 for seed in cfg.episodes.val_seeds}
        source, transform = IndexSource(load_index(cfg.data.prepared)), scoring_transform(cfg, method)
        scores = _score_lists(cfg, model, paths, source, transform, folds.num_classes(cfg.data.dataset), progress,
                              f"source fold {fold}")
    elif domain in cfg.data.targets:
        scores = _target_selection_scores(cfg, model, domain, shot, progress, f"{domain} selection", fold=fold)
    else:
        known = ", ".join(domains(cfg))
        raise DataError(f"domain {domain!r}: not `source` nor a data.targets name (known: {known})")
    return statistics.fmean(s["miou"] for s in scores)


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
    return "\n".join(lines)


def source_label(report: dict[str, Any]) -> str:
    """How a cross-domain result names its source model(s): `every source class`, `fold <k>`, or (splits)
    `every split's model, mean of fold0, fold1, ...`."""
    if "per_split" in report:
        return f"every split's model, mean of {', '.join(report['per_split'])}"
    fold = report["source_fold"]
    return "one model on every source class" if fold == folds.ALL else f"fold {fold}"


def format_target_report(report: dict[str, Any]) -> str:
    """Cross-domain table: per target and shot, mIoU mean +- std over seeds; the mean over targets."""
    shots = list(report["mean_over_targets"])
    lines = [f"{report['method']} (source: {source_label(report)}, regime {report.get('regime', 'none')}) on the targets, "
             f"{report['protocol']['resolution']} {report['protocol']['size']}",
             "target    " + "".join(f"{s:>18}" for s in shots)]
    for name, per_shot in report["results"].items():
        lines.append(f"{name:<10}" + "".join(f"{100 * r['miou_mean']:>10.1f} +- {100 * r['miou_std']:4.1f}"
                                              for r in per_shot.values()))
    lines.append("mean      " + "".join(f"{100 * v:>18.1f}" for v in report["mean_over_targets"].values()))
    return "\n".join(lines)
