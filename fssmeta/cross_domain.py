"""Cross-domain scoring: which source model(s) score the `data.targets` lists (`eval.target_source`), the
PATNet-protocol target scores (regimes none / tta / finetune), RMT's per-split summary and seen-class filter,
and the per-domain selection scores promotion and target-scored sweeps choose on. Results layout:
`<eval.out>/targets/<method>-all[-<regime>].json` (the all-classes source model) and
`<eval.out>/fold<k>/targets/<method>[-<regime>].json` (a fold's model)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from fssmeta.adaptation import with_regime
from fssmeta.config import Config
from fssmeta.data import folds
from fssmeta.data.dataset import IndexSource, TargetSource
from fssmeta.data.episode_lists import list_path, target_list_path
from fssmeta.data.io import DataError, read_json, write_json_atomic
from fssmeta.data.prepare import load_index
from fssmeta.data.targets import read_target
from fssmeta.data.transforms import TestTransform
from fssmeta.evaluation import (
    regime_config,
    regime_record,
    regime_settings,
    regime_suffix,
    score_lists,
    scoring_transform,
    summarise,
)
from fssmeta.runs import default_device, evaluation_model


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
    rows = summary["per_split"].values()
    results = {t: {s: {"miou_mean": mean, "miou_std": statistics.pstdev(row["targets"][t][s] for row in rows)}
                   for s, mean in per_shot.items()} for t, per_shot in summary["mean"].items()}
    return {"method": method, "source": "splits", "source_fold": "splits", "regime": regime,
            "protocol": summary["protocol"], "results": results,
            "mean_over_targets": summary["mean_over_targets"], "per_split": summary["per_split"]}


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
            results.setdefault(name, {})[f"{s}shot"] = summarise(scores)
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
    return score_lists(cfg, model, paths, TargetSource(target_set), TestTransform("resized", cfg.eval.resized_size),
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


def target_selection_scores(cfg: Config, model: torch.nn.Module, name: str, shot: int, progress: bool,
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
    validation list(s); a `data.targets` name = its 1-way selection lists (`target_selection_scores`, PATNet
    protocol, `eval.resized_size`). `method` (default `model.method`) is the model's method, whose canvas
    `eval.canvas: method` picks."""
    if domain == "source":
        paths = {seed: list_path(cfg.episodes.out, fold, "val", shot, cfg.eval.episode_order, seed)
                 for seed in cfg.episodes.val_seeds}
        source, transform = IndexSource(load_index(cfg.data.prepared)), scoring_transform(cfg, method)
        scores = score_lists(cfg, model, paths, source, transform, folds.num_classes(cfg.data.dataset), progress,
                              f"source fold {fold}")
    elif domain in cfg.data.targets:
        scores = target_selection_scores(cfg, model, domain, shot, progress, f"{domain} selection", fold=fold)
    else:
        known = ", ".join(domains(cfg))
        raise DataError(f"domain {domain!r}: not `source` nor a data.targets name (known: {known})")
    return statistics.fmean(s["miou"] for s in scores)


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
