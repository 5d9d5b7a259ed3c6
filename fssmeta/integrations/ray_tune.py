"""Hyperparameter sweeps with Ray Tune before meta-training: Optuna proposes values from `tune.search_space`,
ASHA stops weak trials early, every trial runs episodic training on `tune.fold` / `tune.shot` and is scored on
the fold's VALIDATION episodes (never the test lists). The best trial's values go to `<tune.out>/best.yaml`,
which the train_meta stage applies on top of params.yaml; `tune.trials: 0` writes no values (pass-through).

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
from fssmeta.data.io import write_json_atomic
from fssmeta.integrations.ray_train import build_trainer, start_ray
from fssmeta.integrations.sweep_tracking import (
    SweepMLflowCallback,
    SweepResult,
    close_sweep_run,
    finish_sweep_run,
    open_sweep_run,
)
from fssmeta.params import config_from_dict, with_overrides
from fssmeta.runs import default_device, require_stage1
from fssmeta.stages import train_meta
from fssmeta.tracking import protocol_tags

METRIC, MODE = "val_miou", "max"
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
    if tc.trials == 0:
        result = SweepResult(overrides={}, score=None, trial=None, path=None,
                             note="tune.trials is 0: params pass through unchanged")
        write_outputs(out, cfg, result)
        return result
    base = trial_base(cfg)
    if base.train.val_episodes <= 0:
        raise SweepError("trials are scored on validation episodes: train.val_episodes (after "
                         "tune.trial_overrides) must be > 0")
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
    trials = _trial_rows(grid)
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
                         trials=trials, restored=restored, mlflow_run_id=parent)
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
    callbacks = [SweepMLflowCallback(config_to_dict(cfg.mlflow), parent, path.name)] if parent else []
    return Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=tc.trials, max_concurrent_trials=tc.max_concurrent_trials,
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
    with tempfile.TemporaryDirectory(prefix="fssmeta-trial-") as local:
        train_meta(cfg, cfg.train.fold, progress=False, resume_run=False, device=default_device(),
                   reporter=_report_to_tune, start=start, checkpoint_dir=Path(local))


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


def _trial_rows(grid: Any) -> list[dict[str, Any]]:
    """One row per trial, from the sweep's saved state: its values, best validation score, epochs run,
    Tune status (terminated = ended, by itself or by ASHA; error; or unfinished) and error."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(grid.experiment_path, default_metric=METRIC, default_mode=MODE)
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        scores = [] if frame is None or METRIC not in frame else [float(v) for v in frame[METRIC].dropna()]
        status = {"TERMINATED": "terminated", "ERROR": "error"}.get(trial.status, "unfinished")
        error = trial.get_error() if status == "error" else None
        rows.append({"trial": trial.trial_id, "config": dict(trial.config), "score": max(scores) if scores else None,
                     "epochs": len(scores), "status": status,
                     "error": None if error is None else str(error).strip().splitlines()[-1][:500]})
    return sorted(rows, key=lambda r: r["trial"])


def write_outputs(out: Path, cfg: Config, result: SweepResult) -> None:
    """`best.yaml` (what train_meta applies) and `trials.json` (every trial), written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    best = {"overrides": result.overrides, "metric": METRIC, "score": result.score, "trial": result.trial,
            "trials": cfg.tune.trials, "fold": cfg.tune.fold, "shot": cfg.tune.shot, "sweep": result.path,
            "mlflow_run_id": result.mlflow_run_id}
    if result.note:
        best["note"] = result.note
    text = ("# Written by the tune stage (fssmeta/integrations/ray_tune.py): the best trial's values on the\n"
            "# validation episodes; the train_meta stage applies `overrides` on top of params.yaml.\n"
            + yaml.safe_dump(best, sort_keys=False))
    (out / "best.yaml.tmp").write_text(text)
    (out / "best.yaml.tmp").replace(out / "best.yaml")
    write_json_atomic(out / "trials.json", {"metric": METRIC, "mode": MODE, "trials": result.trials})


def main_summary(result: SweepResult) -> str:
    """The lines `fssmeta tune` and the tune stage print."""
    if not result.path:
        return f"tune: {result.note}"
    lines = [f"tune: sweep {result.path}{' (resumed)' if result.restored else ''}: {len(result.trials)} trials"]
    for t in result.trials:
        score = "-" if t["score"] is None else f"{100 * t['score']:.1f}"
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        lines.append(f"  {t['trial']}: {t['status']:<10} {t['epochs']} epoch(s), best val mIoU {score:>5}  {values}")
    lines.append(f"best: {result.trial} (val mIoU {100 * (result.score or 0):.1f}): {result.overrides}")
    if result.mlflow_run_id:
        lines.append(f"MLflow sweep run {result.mlflow_run_id}")
    return "\n".join(lines)
