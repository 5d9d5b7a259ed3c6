"""The stages a user runs, built from params: base-learner training, episodic meta-training, evaluation.

Each stage is a function of the typed config and a fold (and shot); the CLI and the Ray integration call
them. Paths: `<train.out>/fold<k>/base/` and `<train.out>/fold<k>/<method>-<shot>shot/` hold `last.pt`,
`best.pt` and `history.json`; `<eval.out>/<method>.json` holds the scores.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fssmeta import distributed
from fssmeta.checkpoint import read_checkpoint, restore, resume
from fssmeta.config import Config, ModelConfig, TrainConfig, config_to_dict
from fssmeta.data import folds
from fssmeta.data.dataset import (
    BaseSegmentationDataset,
    EpisodeDataset,
    IndexSource,
    TrainEpisodeDataset,
    episode_loader,
)
from fssmeta.data.episode_lists import list_path, load_episode_list
from fssmeta.data.io import DataError, write_json_atomic
from fssmeta.data.prepare import load_fold, load_index
from fssmeta.data.sampler import TrainEpisodeSampler
from fssmeta.data.transforms import TestTransform, TrainTransform
from fssmeta.losses import base_losses, episode_losses
from fssmeta.models import build_model, load_base_learner
from fssmeta.models.baseline import PrototypeBaseline
from fssmeta.models.pspnet import build_pspnet
from fssmeta.train import FitResult, LossFn, Reporter, build_optimizer, build_scheduler, evaluate, fit


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def base_dir(cfg: Config, fold: int) -> Path:
    return Path(cfg.train.out) / f"fold{fold}" / "base"


def meta_dir(cfg: Config, fold: int, shot: int, method: str | None = None) -> Path:
    return Path(cfg.train.out) / f"fold{fold}" / f"{method or cfg.model.method}-{shot}shot"


def prepare_model(model: torch.nn.Module, device: torch.device, train_cfg: TrainConfig) -> torch.nn.Module:
    model = model.to(device)
    if device.type == "cuda" and train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _loader(dataset: Any, train_cfg: TrainConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=False, drop_last=True,
                      num_workers=train_cfg.num_workers, persistent_workers=train_cfg.num_workers > 0)


def _resume_payload(run: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, enabled: bool) -> dict | None:
    last = run / "last.pt"
    if enabled and last.is_file():
        return resume(last, model=model, optimizer=optimizer, scheduler=scheduler)
    return None


def train_base(cfg: Config, fold: int, *, progress: bool = True, resume_run: bool = True,
               device: torch.device | None = None) -> FitResult:
    """BAM stage 1: the PSPNet base learner, supervised on the fold's base classes (novel pixels -> 0)."""
    device = device or default_device()
    tc = cfg.train_base
    torch.manual_seed(tc.seed)
    index, lists = load_index(cfg.data.prepared), load_fold(cfg.data.prepared, fold)
    model = prepare_model(build_pspnet(cfg.model, 1 + len(lists["base"])), device, tc)
    dataset = BaseSegmentationDataset([key for key, _ in lists["train"]], IndexSource(index, ("train",)),
                                      TrainTransform(cfg.transform), lists["base"], seed=tc.seed,
                                      length=tc.episodes_per_epoch)
    loader = _loader(dataset, tc)
    optimizer = build_optimizer(model.parameters(), tc.optim)
    scheduler = build_scheduler(optimizer, tc.optim, tc.epochs * len(loader))
    run = base_dir(cfg, fold)
    start = _resume_payload(run, model, optimizer, scheduler, resume_run)
    return fit(model, train_loader=loader, loss_fn=base_losses, optimizer=optimizer, scheduler=scheduler,
               epochs=tc.epochs, checkpoint_dir=run, config=config_to_dict(cfg), start=start, amp=tc.amp,
               grad_clip=tc.grad_clip, progress=progress, desc=f"base fold {fold}")


def build_meta_model(cfg: Config, fold: int, shot: int, device: torch.device) -> torch.nn.Module:
    """The configured method for (fold, shot), initialised from the fold's stage-1 base learner."""
    lists = load_fold(cfg.data.prepared, fold)
    model = build_model(cfg.model.model_copy(update={"shot": shot}), base_classes=lists["base"])
    base = base_dir(cfg, fold) / "last.pt"
    if not base.is_file():
        raise DataError(f"{base}: no base learner for fold {fold}; run `fssmeta train-base --fold {fold}` first")
    load_base_learner(model, read_checkpoint(base)["model"])
    return prepare_model(model, device, cfg.train)


def validation_loader(cfg: Config, fold: int, shot: int) -> DataLoader | None:
    """The fixed validation list (never the test list) for checkpoint selection; None when disabled."""
    if cfg.train.val_episodes <= 0:
        return None
    path = list_path(cfg.episodes.out, fold, "val", shot, cfg.eval.episode_order, cfg.episodes.val_seeds[0])
    episodes = load_episode_list(path)["episodes"][: cfg.train.val_episodes]
    # Under DDP each rank scores its share; `evaluate` sums the IoU counts over ranks, so the score is the same.
    episodes = episodes[distributed.rank() :: distributed.world_size()]
    index = load_index(cfg.data.prepared)
    dataset = EpisodeDataset(episodes, IndexSource(index), TestTransform(cfg.eval.resolution, _test_size(cfg)))
    return episode_loader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers)


def _test_size(cfg: Config) -> int:
    return cfg.eval.test_size if cfg.eval.resolution == "original" else cfg.eval.resized_size


def train_meta(cfg: Config, fold: int, *, progress: bool = True, resume_run: bool = True,
               device: torch.device | None = None, forward_wrapper: Any = None, reporter: Reporter | None = None,
               start: dict | None = None, checkpoint_dir: Path | None = None,
               loss_fn: LossFn = episode_losses) -> FitResult:
    """Episodic meta-training of `model.method` on the fold's base classes, validated on the fixed
    validation list every epoch; `best.pt` keeps the best validation mIoU.

    `start` (a checkpoint payload) is loaded into the raw model before `forward_wrapper` (e.g. DDP) wraps it;
    `loss_fn` lets a caller observe the steps (the Ray integration's fault injection) without a loop change.
    """
    device = device or default_device()
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_meta_model(cfg, fold, tc.shot, device)
    index, lists = load_index(cfg.data.prepared), load_fold(cfg.data.prepared, fold)
    sampler = TrainEpisodeSampler([(k, cs) for k, cs in lists["train"]], tc.shot, seed=tc.seed)
    dataset = TrainEpisodeDataset(sampler, IndexSource(index, ("train",)), TrainTransform(cfg.transform),
                                  length=tc.episodes_per_epoch, rank=distributed.rank(),
                                  world_size=distributed.world_size(), batch_size=tc.batch_size)
    loader = _loader(dataset, tc)
    optimizer = build_optimizer(model.parameters(), tc.optim)
    scheduler = build_scheduler(optimizer, tc.optim, tc.epochs * len(loader))
    run = checkpoint_dir or meta_dir(cfg, fold, tc.shot)
    if start is not None:
        # A payload Ray handed back: every rank loads it; each rank keeps its own (seeded) RNG stream.
        resume_payload = restore(start, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
    else:
        resume_payload = _resume_payload(run, model, optimizer, scheduler, resume_run)
    val_loader = validation_loader(cfg, fold, tc.shot)
    n_classes = folds.num_classes(cfg.data.dataset)

    def validate(m: torch.nn.Module) -> dict[str, float]:
        if val_loader is None:
            return {}
        meter = evaluate(m, val_loader, n_classes, amp=tc.amp, progress=progress, desc="validate")
        return {"val_miou": meter.miou(), "val_fbiou": meter.fb_iou()}

    forward_model = forward_wrapper(model) if forward_wrapper is not None else model
    return fit(model, train_loader=loader, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
               epochs=tc.epochs, validate=validate, checkpoint_dir=run, config=config_to_dict(cfg),
               start=resume_payload, reporter=reporter, forward_model=forward_model, amp=tc.amp,
               grad_clip=tc.grad_clip, progress=progress, desc=f"{cfg.model.method} fold {fold} {tc.shot}-shot")


def _summarise(scores: list[dict[str, Any]]) -> dict[str, Any]:
    mious = [s["miou"] for s in scores]
    fbs = [s["fb_iou"] for s in scores]
    # population std over seeds (numpy's default, as the multi-seed papers report it)
    return {"miou_mean": statistics.fmean(mious), "miou_std": statistics.pstdev(mious),
            "fbiou_mean": statistics.fmean(fbs), "fbiou_std": statistics.pstdev(fbs), "seeds": scores}


def _score_lists(cfg: Config, model: torch.nn.Module, paths: dict[int, Path], source: Any, transform: TestTransform,
                 n_classes: int, progress: bool, desc: str, *, id_offset: int = 0,
                 names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Score `model` on each seed's fixed list (the first `eval.episodes`); one score dict per seed.

    `id_offset` shifts the lists' class ids (target lists count classes from 0, meters from 1); `names`
    labels per-class IoUs by class name instead of id.
    """
    scores = []
    for seed, path in paths.items():
        episodes = load_episode_list(path)["episodes"]
        episodes = episodes[: cfg.eval.episodes] if cfg.eval.episodes else episodes
        if id_offset:
            episodes = [{**ep, "class_id": ep["class_id"] + id_offset} for ep in episodes]
        loader = episode_loader(EpisodeDataset(episodes, source, transform), batch_size=cfg.eval.batch_size,
                                num_workers=cfg.eval.num_workers)
        meter = evaluate(model, loader, n_classes, amp=cfg.train.amp, progress=progress, desc=f"{desc} seed {seed}")
        per_class = {(names[c - 1] if names else str(c)): v for c, v in meter.per_class_iou().items()}
        scores.append({"seed": seed, "miou": meter.miou(), "fb_iou": meter.fb_iou(), "episodes": len(episodes),
                       "per_class": per_class})
    return scores


def evaluation_model(cfg: Config, fold: int, shot: int, method: str, device: torch.device) -> torch.nn.Module:
    """The model `fssmeta evaluate` scores: the best meta checkpoint, or the non-learned baseline."""
    if method == "baseline":
        lists = load_fold(cfg.data.prepared, fold)
        pspnet = build_pspnet(cfg.model, 1 + len(lists["base"]))
        base = base_dir(cfg, fold) / "last.pt"
        if not base.is_file():
            raise DataError(f"{base}: the baseline uses the fold's stage-1 backbone; run `fssmeta train-base` first")
        pspnet.load_state_dict(read_checkpoint(base)["model"])
        return PrototypeBaseline(backbone=pspnet.backbone, threshold=cfg.eval.baseline_threshold).to(device).eval()
    best = meta_dir(cfg, fold, shot, method) / "best.pt"
    if not best.is_file():
        raise DataError(f"{best}: no trained {method} for fold {fold}, {shot}-shot; run "
                        f"`fssmeta train --set train.fold={fold} --set train.shot={shot}` first")
    payload = read_checkpoint(best)
    # The model as it was trained (tuned values included), not as params.yaml describes it now.
    stored = payload["config"].get("model") if payload["config"] else None
    model_cfg = ModelConfig.model_validate(stored) if stored else cfg.model
    model = build_model(model_cfg.model_copy(update={"method": method, "shot": shot}),
                        base_classes=load_fold(cfg.data.prepared, fold)["base"])
    restore(payload, model=model, restore_rng=False, source=best)
    return model.to(device).eval()


def evaluate_method(cfg: Config, method: str | None = None, *, progress: bool = True,
                    device: torch.device | None = None) -> dict[str, Any]:
    """Score every (fold, shot) in `eval.folds` x `eval.shots` on every test seed's fixed list; write JSON."""
    device = device or default_device()
    method = method or cfg.model.method
    index = load_index(cfg.data.prepared)
    source = IndexSource(index)
    transform = TestTransform(cfg.eval.resolution, _test_size(cfg))
    n_classes = folds.num_classes(cfg.data.dataset)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for fold in cfg.eval.folds:
        for shot in cfg.eval.shots:
            model = evaluation_model(cfg, fold, shot, method, device)
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
    report = {"method": method, "protocol": {**index["protocol"], "resolution": cfg.eval.resolution,
                                             "test_size": _test_size(cfg), "episode_order": cfg.eval.episode_order,
                                             "test_seeds": list(cfg.episodes.test_seeds),
                                             "episodes_per_list": cfg.eval.episodes or "all",
                                             "checkpoint_selection": "validation list" if method != "baseline" else "none"},
              "results": results, "mean": mean, "seconds": time.perf_counter() - start}
    write_json_atomic(Path(cfg.eval.out) / f"{method}.json", report)
    return report


def evaluate_targets(cfg: Config, method: str | None = None, *, fold: int = 0, shot: int | None = None,
                     progress: bool = True, device: torch.device | None = None) -> dict[str, Any]:
    """Cross-domain evaluation (PATNet protocol): the model trained on the source (fold `fold`, selected on
    source-side validation episodes) scores every configured target's fixed 1-way lists, images and masks
    at `eval.resized_size` (400). Per target: mIoU over its classes, mean and std over test seeds; and the
    mean over targets. Written to `<eval.out>/targets/<method>-fold<k>.json`."""
    device = device or default_device()
    method = method or cfg.model.method
    if not cfg.data.targets:
        raise DataError("data.targets is empty: configure at least one cross-domain target")
    shots = (shot,) if shot is not None else cfg.eval.shots
    results: dict[str, Any] = {}
    for s in shots:
        model = evaluation_model(cfg, fold, s, method, device)
        for name in sorted(cfg.data.targets):
            scores = _target_scores(cfg, model, name, s, progress, f"{method} -> {name} {s}-shot")
            results.setdefault(name, {})[f"{s}shot"] = _summarise(scores)
    mean = {f"{s}shot": statistics.fmean(results[n][f"{s}shot"]["miou_mean"] for n in results) for s in shots}
    report = {"method": method, "source_fold": fold, "protocol": {"resolution": "resized",
              "size": cfg.eval.resized_size, "test_seeds": list(cfg.episodes.test_seeds),
              "episodes_per_list": cfg.eval.episodes or "all", "checkpoint_selection": "source validation list"},
              "results": results, "mean_over_targets": mean}
    write_json_atomic(Path(cfg.eval.out) / "targets" / f"{method}-fold{fold}.json", report)
    return report


def _target_scores(cfg: Config, model: torch.nn.Module, name: str, shot: int, progress: bool,
                   desc: str) -> list[dict[str, Any]]:
    """One score dict per test seed of `model` on target `name`'s fixed 1-way lists (PATNet protocol)."""
    from fssmeta.data.dataset import TargetSource
    from fssmeta.data.episode_lists import target_list_path
    from fssmeta.data.targets import read_target

    target = cfg.data.targets[name]
    target_set = read_target(name, target.layout, target.root)
    paths = {seed: target_list_path(cfg.episodes.out, name, shot, seed) for seed in cfg.episodes.test_seeds}
    return _score_lists(cfg, model, paths, TargetSource(target_set), TestTransform("resized", cfg.eval.resized_size),
                        len(target_set.classes), progress, desc, id_offset=1, names=target_set.classes)


def domains(cfg: Config) -> list[str]:
    """The domains a model is scored and promoted on: `source` and every data.targets name."""
    return ["source", *sorted(cfg.data.targets)]


def score_domain(cfg: Config, model: torch.nn.Module, domain: str, *, fold: int, shot: int,
                 progress: bool = False) -> float:
    """Mean mIoU over seeds of `model` on one domain's fixed episodes, for comparing models on the SAME
    episodes (promotion): `source` = the fold's validation list(s), never the test lists; a `data.targets`
    name = its 1-way target lists (PATNet protocol, `eval.resized_size`)."""
    if domain == "source":
        paths = {seed: list_path(cfg.episodes.out, fold, "val", shot, cfg.eval.episode_order, seed)
                 for seed in cfg.episodes.val_seeds}
        source, transform = IndexSource(load_index(cfg.data.prepared)), TestTransform(cfg.eval.resolution, _test_size(cfg))
        scores = _score_lists(cfg, model, paths, source, transform, folds.num_classes(cfg.data.dataset), progress,
                              f"source fold {fold}")
    elif domain in cfg.data.targets:
        scores = _target_scores(cfg, model, domain, shot, progress, domain)
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


def format_target_report(report: dict[str, Any]) -> str:
    """Cross-domain table: per target and shot, mIoU mean +- std over seeds; the mean over targets."""
    shots = list(report["mean_over_targets"])
    lines = [f"{report['method']} (source fold {report['source_fold']}) on the targets, "
             f"{report['protocol']['resolution']} {report['protocol']['size']}",
             "target    " + "".join(f"{s:>18}" for s in shots)]
    for name, per_shot in report["results"].items():
        lines.append(f"{name:<10}" + "".join(f"{100 * r['miou_mean']:>10.1f} +- {100 * r['miou_std']:4.1f}"
                                              for r in per_shot.values()))
    lines.append("mean      " + "".join(f"{100 * v:>18.1f}" for v in report["mean_over_targets"].values()))
    return "\n".join(lines)
