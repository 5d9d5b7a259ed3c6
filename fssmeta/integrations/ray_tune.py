"""Hyperparameter sweeps with Ray Tune before meta-training: Optuna proposes values from `tune.search_space`,
ASHA stops weak trials early, every trial runs episodic training on `tune.fold` / `tune.shot` and is scored on
VALIDATION episodes, never test lists: the fold's (`tune.domain: source`, metric `val_miou`) or one target's
selection lists (`tune.domain: <target>`, metric `target_selection_miou`, each epoch's checkpoint scored in the
trial). The best trial's values go to `<tune.out>/best.yaml`, which the train_meta stage applies on top of
params.yaml; `tune.trials: 0` writes no values (pass-through).

A trial with `tune.num_workers: 1` is a function trainable; with more, a driver that fits a TorchTrainer
(the same `train_loop_per_worker` as `fssmeta train --ray`) and forwards its reports to Tune. Every trial is
an MLflow run nested under the sweep's run, ended FINISHED also when ASHA stops it (FAILED when it raised).
An interrupted sweep resumes with `Tuner.restore` when the same sweep is started again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from fssmeta.checkpoint import read_checkpoint
from fssmeta.config import Config, config_to_dict
from fssmeta.data.episode_lists import target_list_path
from fssmeta.data.io import write_json_atomic
from fssmeta.data.prepare import load_fold
from fssmeta.integrations.ray_train import build_trainer, start_ray
from fssmeta.integrations.sweep_tracking import (
    SweepMLflowCallback,
    SweepResult,
    close_sweep_run,
    finish_sweep_run,
    open_sweep_run,
)
from fssmeta.params import config_from_dict, with_overrides
from fssmeta.runs import default_device, model_from_checkpoint, require_stage1
from fssmeta.stages import train_meta
from fssmeta.tracking import protocol_tags, selection_source
from fssmeta.train import Reporter

METRIC, MODE = "val_miou", "max"
TARGET_METRIC = "target_selection_miou"  # a trial's score on `tune.domain`'s selection episodes
SWEEP_FILE = "fssmeta_sweep.json"  # in the sweep's folder: its MLflow run and whether it finished
DRIVER_CPU = 0.01  # what a multi-worker trial's driver reserves (Tune rejects 0); its workers need the rest


class SweepError(RuntimeError):
    """A sweep that cannot run or produced no usable trial; names the sweep's folder."""


class SweepInterrupted(SweepError):
    """The sweep stopped before every trial ended (Ctrl-C, a lost driver): start it again to resume."""


def search_space(cfg: Config) -> dict[str, Any]:
    """`tune.search_space` (plain data, validated at load) as Ray Tune domains, keyed by dotted setting."""
    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    space = {}
    for key, (kind, *args) in cfg.tune.search_space.items():
        space[key] = tune.choice(list(args)) if kind == "choice" else kinds[kind](*args)
    return space


def trial_metric(cfg: Config) -> str:
    """What Tune (ASHA, the best trial) reads: `val_miou` (source validation) or, when `tune.domain` names a
    target, `target_selection_miou`."""
    return METRIC if cfg.tune.domain == "source" else TARGET_METRIC


def trial_base(cfg: Config) -> Config:
    """What every trial starts from: params with fold / shot from `tune`, the trials' short schedule
    (`tune.trial_overrides`) and `tune.num_workers` workers; tracking is the sweep's callback's."""
    tc = cfg.tune
    cfg = with_overrides(cfg, dict(tc.trial_overrides), "tune.trial_overrides")
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"fold": tc.fold, "shot": tc.shot}),
        "ray": cfg.ray.model_copy(update={"num_workers": tc.num_workers}),
        "mlflow": cfg.mlflow.model_copy(update={"enabled": False})})


def sweep_prefix(cfg: Config) -> str:
    """The sweep's name without its start time: the same params give the same prefix, so a second start
    of an unfinished sweep finds it and resumes."""
    data = config_to_dict(cfg)
    digest = hashlib.sha256(json.dumps({k: data[k] for k in ("data", "model", "transform", "train", "tune")},
                                       sort_keys=True).encode()).hexdigest()[:10]
    return f"tune-{cfg.model.method}-fold{cfg.tune.fold}-{cfg.tune.shot}shot-{digest}"


def _unfinished_sweep(storage: Path, prefix: str) -> Path | None:
    """The latest folder of this sweep that did not finish and that Tune can restore, if any."""
    from ray.tune import Tuner

    for path in sorted(storage.glob(f"{prefix}-*"), reverse=True):
        state = _read_state(path)
        if not state.get("done") and Tuner.can_restore(str(path)):
            return path
    return None


def _read_state(path: Path) -> dict[str, Any]:
    file = path / SWEEP_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / SWEEP_FILE, state)


def run_sweep(cfg: Config, *, progress: bool = True) -> SweepResult:
    """Run (or resume) the sweep `cfg.tune` describes; write `<tune.out>/best.yaml` and `trials.json`.

    Runs on `ray.address` when set, else on a local Ray it starts and stops. Raises `SweepInterrupted` when
    trials were left unfinished (nothing written; start again to resume), `SweepError` when no trial
    produced a score, `DataError` when the fold's base learner is missing.
    """
    tc = cfg.tune
    out = Path(tc.out)
    selection = selection_source(cfg)  # an unknown tune.domain stops here (ConfigError), before any trial
    if tc.trials == 0:
        result = SweepResult(overrides={}, score=None, trial=None, path=None,
                             note="tune.trials is 0: params pass through unchanged", selection=selection)
        write_outputs(out, cfg, result)
        return result
    base = trial_base(cfg)
    if base.train.val_episodes <= 0:
        raise SweepError("trials are scored on validation episodes: train.val_episodes (after "
                         "tune.trial_overrides) must be > 0")
    if tc.domain != "source":
        _check_selection_list(base)
    if not cfg.ray.address:
        require_stage1(base, tc.fold)
    storage = Path(cfg.ray.storage_path).expanduser().resolve()
    prefix = sweep_prefix(cfg)
    # Tune snapshots its state after every trial checkpoint, as asked; its advice to do it less is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = start_ray(base, progress, dashboard=base.ray.num_workers > 1)
    try:
        if started and not cfg.ray.address:
            _check_trial_fits(base)
        path = _unfinished_sweep(storage, prefix)
        restored = path is not None
        path = path or storage / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        state = _read_state(path)
        parent = open_sweep_run(cfg, path.name, state.get("mlflow_run_id"))
        _write_state(path, {"done": False, "mlflow_run_id": parent, "prefix": prefix})
        if progress:
            verb = "resuming" if restored else "starting"
            print(f"tune: {verb} sweep {path.name}: {tc.trials} trials, {tc.max_concurrent_trials} at a time, "
                  f"{base.train.epochs} epochs each at most (ASHA), {tc.num_workers} worker(s) per trial", flush=True)
        tuner = _tuner(cfg, base, path, parent, restored, progress)
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            close_sweep_run(cfg, parent, "KILLED")
            raise
    finally:
        if started:
            ray.shutdown()
    trials = _trial_rows(grid, trial_metric(cfg))
    unfinished = tc.trials - sum(t["status"] in ("terminated", "error") for t in trials)
    if unfinished > 0:
        close_sweep_run(cfg, parent, "KILLED")
        raise SweepInterrupted(f"sweep {path} stopped with {unfinished} of {tc.trials} trial(s) unfinished; run "
                               "the same command again to resume it (Tuner.restore)")
    scored = [t for t in trials if t["score"] is not None and math.isfinite(t["score"])]
    if not scored:
        close_sweep_run(cfg, parent, "FAILED")
        errors = "; ".join(f"{t['trial']}: {t['error']}" for t in trials if t["error"])
        raise SweepError(f"sweep {path}: no trial produced a validation score ({errors or 'no reports'})")
    best = max(scored, key=lambda t: t["score"])
    result = SweepResult(overrides=best["config"], score=best["score"], trial=best["trial"], path=str(path),
                         trials=trials, restored=restored, mlflow_run_id=parent, metric=trial_metric(cfg),
                         selection=selection)
    write_outputs(out, cfg, result)
    finish_sweep_run(cfg, parent, result, out)
    _write_state(path, {"done": True, "mlflow_run_id": parent, "prefix": prefix, "best": best})
    return result


def _tuner(cfg: Config, base: Config, path: Path, parent: str | None, restored: bool, progress: bool) -> Any:
    from ray.tune import CheckpointConfig, RunConfig, Tuner
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    tc = cfg.tune
    trainable = _trainable(base, path)
    if restored:  # the search state, scheduler and callbacks come back from the sweep's folder
        return Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    callbacks = [SweepMLflowCallback(config_to_dict(cfg.mlflow), parent, path.name, selection_source(cfg))] if parent else []
    return Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=trial_metric(cfg), mode=MODE, num_samples=tc.trials, max_concurrent_trials=tc.max_concurrent_trials,
            search_alg=OptunaSearch(seed=tc.seed),
            # a grace period longer than the trials themselves just means no early stop
            scheduler=ASHAScheduler(max_t=base.train.epochs, grace_period=min(tc.grace_period, base.train.epochs),
                                    reduction_factor=tc.reduction_factor)),
        run_config=RunConfig(name=path.name, storage_path=str(path.parent), callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=1), verbose=1 if progress else 0))


def _trainable(base: Config, path: Path) -> Any:
    """The per-trial function with its fixed inputs bound, and the resources it reserves."""
    context = {"base": config_to_dict(base), "cwd": os.getcwd(), "storage": str(path / "train")}
    if base.ray.num_workers == 1:
        resources = {"cpu": base.tune.cpus_per_trial, "gpu": 1 if base.ray.use_gpu else 0}
        return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    # The driver only waits on its TorchTrainer, whose workers reserve ray.resources_per_worker each.
    return tune.with_resources(tune.with_parameters(drive_trial, context=context), {"cpu": DRIVER_CPU})


def _check_selection_list(base: Config) -> None:
    """A sweep scored on a target needs its selection list (the first validation seed's, at `tune.shot`): say
    so in the driver, not in every trial."""
    episodes, tc = base.episodes, base.tune
    path = target_list_path(episodes.out, tc.domain, tc.shot, episodes.val_seeds[0], "val")
    if episodes.target_val_fraction == 0 or not path.is_file():
        raise SweepError(f"tune.domain {tc.domain}: trials are scored on its selection list {path}, which does not "
                         f"exist (episodes.target_val_fraction {episodes.target_val_fraction}, episodes.shots "
                         f"{list(episodes.shots)}); set episodes.target_val_fraction > 0 and run the episodes stage")


def _check_trial_fits(base: Config) -> None:
    """A trial bigger than the local Ray would wait forever: say so instead."""
    need = _trial_cpus(base)
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        raise SweepError(f"one trial needs {need:g} CPU ({base.ray.num_workers} worker(s); tune.cpus_per_trial / "
                         f"ray.resources_per_worker) but the local Ray has {have:g} (ray.num_cpus); lower them")


def _trial_cpus(base: Config) -> float:
    if base.ray.num_workers == 1:
        return base.tune.cpus_per_trial
    per_worker = dict(base.ray.resources_per_worker).get("CPU", 1.0)
    return DRIVER_CPU + per_worker * base.ray.num_workers


def trial_config(context: dict[str, Any], params: dict[str, Any]) -> Config:
    if Path(context["cwd"]).is_dir():  # relative paths in params resolve as on the driver
        os.chdir(context["cwd"])
    base = config_from_dict(context["base"], source="tune trial base config")
    return with_overrides(base, params, f"tune trial values {params}")


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One single-worker trial: `train_meta` in this process, reporting every epoch (with a checkpoint,
    so a restored sweep continues the trial) to Tune."""
    cfg = trial_config(context, params)
    start = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = read_checkpoint(Path(folder) / "last.pt")
    reporter = _report_to_tune if cfg.tune.domain == "source" else _target_reporter(cfg)
    with tempfile.TemporaryDirectory(prefix="fssmeta-trial-") as local:
        train_meta(cfg, cfg.train.fold, progress=False, resume_run=False, device=default_device(),
                   reporter=reporter, start=start, checkpoint_dir=Path(local))


def _target_reporter(cfg: Config) -> Reporter:
    """`_report_to_tune` with each epoch's `target_selection_miou` added: the epoch's checkpoint (the weights
    `val_miou` was just computed on; a single-worker trial passes one every epoch) scored on `tune.domain`."""

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        if checkpoint is not None:
            metrics = {**metrics, TARGET_METRIC: target_selection_miou(cfg, checkpoint)}
        _report_to_tune(metrics, checkpoint)

    return report


def target_selection_miou(cfg: Config, checkpoint: Path) -> float:
    """A trial checkpoint's mIoU on `tune.domain`'s selection episodes, with source validation's budget: the
    first `train.val_episodes` episodes of the first `episodes.val_seeds` list (`evaluation.score_domain`, as
    promotion scores that target). The model is rebuilt from the checkpoint's stored config (the trial's)."""
    from fssmeta.cross_domain import score_domain

    fold, shot = cfg.train.fold, cfg.train.shot
    model, _ = model_from_checkpoint(read_checkpoint(checkpoint), shot=shot, source=checkpoint,
                                     base_classes=load_fold(cfg.data.prepared, fold)["base"])
    budget = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"episodes": cfg.train.val_episodes}),
                                    "episodes": cfg.episodes.model_copy(update={"val_seeds": cfg.episodes.val_seeds[:1]})})
    return score_domain(budget, model.to(default_device()), cfg.tune.domain, fold=fold, shot=shot)


def _report_to_tune(metrics: dict[str, float], checkpoint: Path | None) -> None:
    if checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="fssmeta-tune-checkpoint-") as folder:
        shutil.copyfile(checkpoint, Path(folder) / "last.pt")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def drive_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One multi-worker trial: fit a TorchTrainer (DDP over `ray.num_workers` workers) whose per-epoch
    reports reach Tune; its run is named after the trial, so a restored sweep resumes it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(context, params)
    name = f"trial-{tune.get_context().get_trial_id()}"
    tags = protocol_tags(cfg, fold=cfg.train.fold, shot=cfg.train.shot) | {"trainer": "ray_tune"}
    trainer = build_trainer(cfg, fold=cfg.train.fold, name=name, storage=Path(context["storage"]), tags=tags,
                            progress=False, callbacks=(TuneReportCallback(),))
    trainer.fit()


def _trial_rows(grid: Any, metric: str) -> list[dict[str, Any]]:
    """One row per trial, from the sweep's saved state: its values, best `metric` (validation) score, epochs
    run, Tune status (terminated = ended, by itself or by ASHA; error; or unfinished) and error."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(grid.experiment_path, default_metric=metric, default_mode=MODE)
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        scores = [] if frame is None or metric not in frame else [float(v) for v in frame[metric].dropna()]
        status = {"TERMINATED": "terminated", "ERROR": "error"}.get(trial.status, "unfinished")
        error = trial.get_error() if status == "error" else None
        rows.append({"trial": trial.trial_id, "config": dict(trial.config), "score": max(scores) if scores else None,
                     "epochs": len(scores), "status": status,
                     "error": None if error is None else str(error).strip().splitlines()[-1][:500]})
    return sorted(rows, key=lambda r: r["trial"])


def write_outputs(out: Path, cfg: Config, result: SweepResult) -> None:
    """`best.yaml` (what train_meta applies) and `trials.json` (every trial), written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    best = {"overrides": result.overrides, "metric": trial_metric(cfg), "score": result.score, "trial": result.trial,
            "trials": cfg.tune.trials, "fold": cfg.tune.fold, "shot": cfg.tune.shot, "domain": cfg.tune.domain,
            "selection": result.selection, "sweep": result.path, "mlflow_run_id": result.mlflow_run_id}
    if result.note:
        best["note"] = result.note
    text = ("# Written by the tune stage (fssmeta/integrations/ray_tune.py): the best trial's values on the\n"
            "# validation episodes (`selection`); the train_meta stage applies `overrides` on top of params.yaml.\n"
            + yaml.safe_dump(best, sort_keys=False))
    (out / "best.yaml.tmp").write_text(text)
    (out / "best.yaml.tmp").replace(out / "best.yaml")
    write_json_atomic(out / "trials.json", {"metric": trial_metric(cfg), "mode": MODE, "selection": result.selection,
                                            "trials": result.trials})


def main_summary(result: SweepResult) -> str:
    """The lines `fssmeta tune` and the tune stage print."""
    if not result.path:
        return f"tune: {result.note}"
    lines = [f"tune: sweep {result.path}{' (resumed)' if result.restored else ''}: {len(result.trials)} trials "
             f"scored on {result.selection} ({result.metric})"]
    label = "val mIoU" if result.metric == METRIC else "target selection mIoU"
    for t in result.trials:
        score = "-" if t["score"] is None else f"{100 * t['score']:.1f}"
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        lines.append(f"  {t['trial']}: {t['status']:<10} {t['epochs']} epoch(s), best {label} {score:>5}  {values}")
    lines.append(f"best: {result.trial} ({label} {100 * (result.score or 0):.1f}): {result.overrides}")
    if result.mlflow_run_id:
        lines.append(f"MLflow sweep run {result.mlflow_run_id}")
    return "\n".join(lines)
