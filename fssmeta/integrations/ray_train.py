"""Episodic meta-training under Ray Train: `train_with_ray` runs `train_meta` on N workers (DDP over gloo or
nccl), checkpoints every epoch into Ray's storage, resumes after a worker or node failure, tracks in MLflow,
and publishes the best checkpoint where `fssmeta evaluate` looks for it (`meta_dir(cfg, fold, shot)`)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from fssmeta.checkpoint import read_checkpoint
from fssmeta.config import Config, config_to_dict
from fssmeta.data.folds import split_name
from fssmeta.params import config_from_dict
from fssmeta.runs import meta_dir, require_stage1
from fssmeta.stages import selection_key, train_meta, training_config
from fssmeta.tracking import NullTracker, Tracker, protocol_tags
from fssmeta.train import LossFn

MLFLOW_RUN_FILE = "mlflow_run_id.txt"  # in the run's storage folder: every attempt continues one MLflow run
FAULT_MARKER = "fault_injected"  # in the run's storage folder: the injected failure fires once per run
OBJECT_STORE_BYTES = 128 * 1024**2
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the fssmeta package  # checkpoints travel through storage, not the object store


class RayTrainingError(RuntimeError):
    """A Ray Train run that failed for good (`ray.max_failures` exhausted); names the run and its storage."""


@dataclass
class RayRunResult:
    name: str  # the Ray run name: <method>-fold<k>-<shot>shot-<time>-<random>
    storage_path: str  # the run's folder, <ray.storage_path>/<name>: Ray's checkpoints and state
    best_checkpoint: str | None  # Ray checkpoint folder (holds last.pt) with the best score
    best_val_miou: float | None  # None when validation is off (train.val_episodes: 0)
    metrics: dict[str, Any]  # the final epoch's reported metrics
    mlflow_run_id: str | None
    meta_dir: str  # where best.pt, last.pt and history.json were published
    restored_epoch: int = 0  # epoch the final attempt resumed from; 0 = it started from scratch


def run_name(cfg: Config, fold: int, shot: int) -> str:
    """Unique, so a new run never silently resumes an old one stored under the same name."""
    return f"{cfg.model.method}-{split_name(fold)}-{shot}shot-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def train_with_ray(cfg: Config, *, fold: int | None = None, shot: int | None = None,
                   progress: bool = True) -> RayRunResult:
    """Meta-train `cfg.model.method` on `fold` / `shot` (default: `train.fold` / `train.shot`) with
    `ray.num_workers` workers; `train.batch_size` and `train.episodes_per_epoch` are per worker.

    Starts a local Ray (and shuts it down) when `ray.address` is empty and Ray is not running; otherwise
    connects to `ray.address`. Raises `RayTrainingError` when the run fails after `ray.max_failures` restarts,
    `DataError` when the fold's base learner is missing.
    """
    fold = cfg.train.fold if fold is None else fold
    shot = cfg.train.shot if shot is None else shot
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fold": fold, "shot": shot})})
    cfg = training_config(cfg)  # a method trained 1-shot for every k trains (and is named) at 1 shot
    shot = cfg.train.shot
    rc = cfg.ray
    name = run_name(cfg, fold, shot)
    storage = Path(rc.storage_path).expanduser().resolve()  # Ray requires an absolute path
    run_dir = storage / name
    tags = protocol_tags(cfg, fold=fold, shot=shot) | {"trainer": "ray_train", "ray_run": name,
                                                        "ray_workers": str(rc.num_workers)}
    score, order = selection(cfg)
    if not rc.address:  # say it here, not once per worker and restart
        require_stage1(cfg, fold)
    started = start_ray(cfg, progress)
    try:
        trainer = build_trainer(cfg, fold=fold, name=name, storage=storage, tags=tags, progress=progress)
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            raise _failure(cfg, name, run_dir, tags, exc) from exc
        except KeyboardInterrupt:
            _finish_tracking(cfg, name, run_dir, tags, "KILLED")
            raise
        if result.error is not None:
            raise _failure(cfg, name, run_dir, tags, result.error) from result.error
    finally:
        if started:
            ray.shutdown()
    if result.checkpoint is None:
        raise RayTrainingError(f"Ray Train run {name} ({run_dir}) finished without a checkpoint "
                               "(train.epochs: 0?); nothing to publish")
    best = result.get_best_checkpoint(score, order) or result.checkpoint
    best_metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    out = meta_dir(cfg, fold, shot)
    _publish(best, result.checkpoint, out)
    mlflow_run_id = _finish_tracking(cfg, name, run_dir, tags, "FINISHED", best=out / "best.pt")
    return RayRunResult(name=name, storage_path=str(run_dir), best_checkpoint=best.path,
                        best_val_miou=best_metrics.get("val_miou"), metrics=dict(result.metrics),
                        mlflow_run_id=mlflow_run_id, meta_dir=str(out),
                        restored_epoch=(result.return_value or {}).get("restored_epoch", 0))


def selection(cfg: Config) -> tuple[str, str]:
    """The checkpoint-selection metric and order: the validation metric (`stages.selection_key`: mIoU, ER
    for weak labels), or (no validation) the training loss, as `fit` keeps its best.pt."""
    return (selection_key(cfg), "max") if cfg.train.val_episodes > 0 else ("train_loss", "min")


def build_trainer(cfg: Config, *, fold: int, name: str, storage: Path, tags: dict[str, str], progress: bool,
                  callbacks: tuple[Any, ...] = ()) -> TorchTrainer:
    """The TorchTrainer of one run `name` under `storage` (absolute): `ray.num_workers` workers running
    `train_loop_per_worker` on `cfg.train` (fold and shot already set). A name that exists resumes that run."""
    rc = cfg.ray
    score, order = selection(cfg)
    loop_config = {"config": config_to_dict(cfg), "fold": fold, "name": name, "run_dir": str(storage / name),
                   "cwd": os.getcwd(), "tags": tags, "progress": progress}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu,
                                     resources_per_worker=dict(rc.resources_per_worker) or None),
        torch_config=TorchConfig(backend="nccl" if rc.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=list(callbacks),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=score,
                                                                checkpoint_score_order=order),
                             failure_config=FailureConfig(max_failures=rc.max_failures),
                             # Ray's per-report INFO lines repeat every metric; the epoch lines say it once
                             logging_config=LoggingConfig(log_level="WARNING")))


def start_ray(cfg: Config, progress: bool, *, dashboard: bool = False) -> bool:
    """Connect to or start Ray; True when this call initialised it (and so must shut it down).

    A local Ray runs its dashboard when `dashboard` or `progress`: the State API it serves is what lets Train
    V2 clean up the placement group of a run whose driver was stopped (a Tune trial ASHA ends), and without it
    Train's placement-group cleaner warns every second on the console (~0.8 s more start-up; quiet runs skip
    it). A local Ray is never preempted, so Train's preemption watcher (one more actor) is off there."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Each report waits for the controller's next poll (2 s by default); Ray passes this on to its workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    if ray.is_initialized():
        return False
    # No runtime_env: a job-wide worker_process_setup_hook (which once quietened the logs) cost ~6 s of start-up
    # per run on the 2-core machine, every actor of the run starting through the runtime-env agent.
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=progress)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance; token auth is the default
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The local Ray's workers inherit this environment: they import the fssmeta this driver runs (a
        # checkout's own, with its own method files), not whichever one the environment has installed.
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if paths[0] != PROJECT_ROOT:
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, *paths]))
        ray.init(num_cpus=cfg.ray.num_cpus or None, include_dashboard=dashboard or progress, log_to_driver=progress,
                 object_store_memory=OBJECT_STORE_BYTES)
        _check_resources(cfg)
    return True


def quiet_report_logs() -> None:
    """Run in each training worker, to keep the console to the epoch lines: every rank's report logs every
    metric at INFO on a logger named after its file, which `LoggingConfig` does not reach."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _check_resources(cfg: Config) -> None:
    """A local Ray too small for the workers would make Ray wait for them forever: say so instead."""
    rc = cfg.ray
    per_worker = dict(rc.resources_per_worker) or {"CPU": 1.0}
    if rc.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    available = ray.cluster_resources()
    for resource, amount in per_worker.items():
        if available.get(resource, 0.0) < amount * rc.num_workers:
            ray.shutdown()
            raise RayTrainingError(
                f"ray.num_workers={rc.num_workers} workers x {amount:g} {resource} need {amount * rc.num_workers:g} "
                f"{resource}, but the local Ray has {available.get(resource, 0.0):g} (ray.num_cpus={rc.num_cpus}, "
                f"ray.resources_per_worker={per_worker}); lower ray.num_workers or the per-worker resources")


def _failure(cfg: Config, name: str, run_dir: Path, tags: dict[str, str], error: BaseException) -> RayTrainingError:
    note = ""
    try:
        _finish_tracking(cfg, name, run_dir, tags, "FAILED")
    except Exception as exc:  # the training error is the one to show; say what else went wrong
        note = f" (marking its MLflow run FAILED failed too: {type(exc).__name__}: {exc})"
    return RayTrainingError(
        f"Ray Train run {name} failed after ray.max_failures={cfg.ray.max_failures} restart(s); its checkpoints "
        f"and logs are in {run_dir}. Original error: {type(error).__name__}: {error}{note}")


def _publish(best: Checkpoint, latest: Checkpoint, out: Path) -> None:
    """Copy the Ray checkpoints to where single-process training writes: best.pt, last.pt, history.json."""
    out.mkdir(parents=True, exist_ok=True)
    for checkpoint, files in ((best, {"last.pt": "best.pt"}),
                              (latest, {"last.pt": "last.pt", "history.json": "history.json"})):
        with checkpoint.as_directory() as folder:
            for source, target in files.items():
                if (Path(folder) / source).is_file():
                    shutil.copyfile(Path(folder) / source, out / f"{target}.tmp")
                    (out / f"{target}.tmp").replace(out / target)


def _finish_tracking(cfg: Config, name: str, run_dir: Path, tags: dict[str, str], status: str,
                     best: Path | None = None) -> str | None:
    """Driver side: attach the best checkpoint to the run the workers logged to and close it with `status`."""
    id_file = run_dir / MLFLOW_RUN_FILE
    if not cfg.mlflow.enabled or not id_file.is_file():
        return None
    from fssmeta.integrations.mlflow import tracker_from_config

    run_id = id_file.read_text().strip()
    tracker = tracker_from_config(cfg, run_name=name, tags=tags, run_id=run_id)
    if best is not None and best.is_file():
        tracker.log_artifact(best, artifact_path="checkpoint")
    tracker.close(status)
    return run_id


# ---------------------------------------------------------------------------------------------- workers


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What every worker runs: `train_meta` resumed from Ray's latest checkpoint, wrapped by `prepare_model`
    (DDP when there is more than one worker), reporting once per epoch. Rank 0's return value reaches the driver."""
    # The params' relative paths (data, runs, mlflow.db) resolve as on the driver; on a cluster the project
    # folder must sit at the same path on every node (a shared filesystem, as Ray's storage path needs).
    if Path(loop_config["cwd"]).is_dir():
        os.chdir(loop_config["cwd"])
    cfg = config_from_dict(loop_config["config"], source="ray train_loop_config")
    quiet_report_logs()
    rank = ray.train.get_context().get_world_rank()
    run_dir = Path(loop_config["run_dir"])
    start = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = read_checkpoint(Path(folder) / "last.pt")
    tracker: Tracker = NullTracker()
    if rank == 0 and cfg.mlflow.enabled:
        tracker = _open_tracker(cfg, loop_config["name"], loop_config["tags"], run_dir)
    marker = run_dir / FAULT_MARKER if rank == 0 and cfg.ray.fail_at_step > 0 else None
    steps = StepWatch(first_step=(start or {}).get("step", 0), fail_at_step=cfg.ray.fail_at_step,
                      marker=marker)
    reporter = RayReporter(tracker, steps, epochs=cfg.train.epochs, progress=loop_config["progress"] and rank == 0)
    with tempfile.TemporaryDirectory(prefix=f"fssmeta-rank{rank}-") as local:
        # fit writes last.pt / best.pt / history.json on rank 0 only; each rank gets its own folder anyway.
        train_meta(cfg, loop_config["fold"], progress=False, resume_run=False, device=ray.train.torch.get_device(),
                   forward_wrapper=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
                   reporter=reporter, start=start, checkpoint_dir=Path(local), observe=steps.wrap)
    return {"restored_epoch": (start or {}).get("epoch", 0), "mlflow_run_id": getattr(tracker, "run_id", None)}


def _open_tracker(cfg: Config, name: str, tags: dict[str, str], run_dir: Path) -> Tracker:
    """Rank 0: the run's MLflow run, opened by the first attempt and continued by every restart."""
    from fssmeta.integrations.mlflow import tracker_from_config

    id_file = run_dir / MLFLOW_RUN_FILE
    if id_file.is_file():
        return tracker_from_config(cfg, run_name=name, tags=tags, run_id=id_file.read_text().strip())
    tracker = tracker_from_config(cfg, run_name=name, tags=tags)  # logs the config as params
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{MLFLOW_RUN_FILE}.tmp").write_text(str(tracker.run_id))
    (run_dir / f"{MLFLOW_RUN_FILE}.tmp").replace(id_file)
    return tracker


class StepWatch:
    """The loss function, counting global steps: notes when the first one ran and, for fault-injection tests
    (`ray.fail_at_step`), ends this worker's process at that step once per run, as a crashed node would."""

    def __init__(self, *, first_step: int, fail_at_step: int = 0, marker: Path | None = None) -> None:
        self.step, self.fail_at_step, self.marker = first_step, fail_at_step, marker
        self.loss_fn: LossFn | None = None
        self.first_step_time: float | None = None

    def wrap(self, loss_fn: LossFn) -> StepWatch:
        """Watch `loss_fn` (the method's loss, handed over by `train_meta`)."""
        self.loss_fn = loss_fn
        return self

    def __call__(self, model: Any, batch: Any) -> Any:
        self.step += 1
        if self.first_step_time is None:
            self.first_step_time = time.time()
        if self.marker is not None and self.step == self.fail_at_step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
            os._exit(1)  # no cleanup, no exception: what a killed worker looks like to Ray
        return self.loss_fn(model, batch)


class RayReporter:
    """The `Reporter` `fit` calls on every rank after every epoch: every rank reports (Ray's barrier), rank 0
    with a Ray checkpoint holding a copy of the `last.pt` fit just wrote, and logs to the tracker."""

    def __init__(self, tracker: Tracker, steps: StepWatch, *, epochs: int, progress: bool) -> None:
        self.tracker, self.steps, self.epochs, self.progress = tracker, steps, epochs, progress
        self.last_report = time.time()

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        now = time.time()
        metrics = {**metrics, "time_this_epoch_s": now - self.last_report}
        if self.steps.first_step_time is not None:
            metrics["first_step_time"] = self.steps.first_step_time  # unix time; the benchmark's start-up cost
        self.last_report = now
        if checkpoint is None:
            ray.train.report(metrics)
            return
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "first_step_time"}, step=int(metrics["step"]))
        if self.progress:  # written, not printed: Train V2 reroutes print() into its logger (each line twice)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("train_", "val_")))
            sys.stdout.write(f"epoch {int(metrics['epoch'])}/{self.epochs} (step {int(metrics['step'])}): {shown} "
                             f"({metrics['time_this_epoch_s']:.0f} s, ETA {metrics.get('eta_s', 0.0):.0f} s)\n")
            sys.stdout.flush()
        with tempfile.TemporaryDirectory(prefix="fssmeta-checkpoint-") as folder:
            shutil.copyfile(checkpoint, Path(folder) / "last.pt")
            history = checkpoint.parent / "history.json"
            if history.is_file():
                shutil.copyfile(history, Path(folder) / "history.json")
            # the upload is synchronous (Ray's default), so the folder may go once report returns
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

