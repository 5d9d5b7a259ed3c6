"""The sweep's MLflow tracking (fssmeta/integrations/ray_tune.py): the sweep's run, and a Tune callback that
gives every trial a run nested under it, FINISHED also when ASHA stops the trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback

from fssmeta.config import Config, MlflowConfig, config_to_dict
from fssmeta.integrations.mlflow import MLflowTracker, _mlflow, resolve_tracking_uri
from fssmeta.tracking import selection_source

LOGGED_METRICS = ("train_", "val_", "target_", "lr", "epoch", "step")  # trial results that go to MLflow


@dataclass
class SweepResult:
    overrides: dict[str, Any]  # the best trial's values (dotted keys); {} = params pass through
    score: float | None  # its best `metric`
    trial: str | None
    path: str | None  # the sweep's folder (Ray Tune's experiment)
    trials: list[dict[str, Any]] = field(default_factory=list)
    restored: bool = False
    mlflow_run_id: str | None = None
    note: str = ""
    metric: str = "val_miou"  # what scored the trials: val_miou (source) or target_selection_miou (tune.domain)
    selection: str = "source-validation"  # `tracking.selection_source`: the episodes that chose the values


def open_sweep_run(cfg: Config, name: str, run_id: str | None) -> str | None:
    """The sweep's MLflow run (the trials' parent): continued when resuming, else created."""
    if not cfg.mlflow.enabled:
        return None
    tags = {"fssmeta.sweep": name, "stage": "tune", "selection": selection_source(cfg)}
    tracker = MLflowTracker(cfg.mlflow, run_name=name, tags=tags, run_id=run_id)
    if run_id is None:
        tracker.log_params({"tune": config_to_dict(cfg.tune)})
    return tracker.run_id


def close_sweep_run(cfg: Config, run_id: str | None, status: str) -> None:
    if run_id is None:
        return
    MLflowTracker(cfg.mlflow, run_name="", run_id=run_id).close(status)


def finish_sweep_run(cfg: Config, run_id: str | None, result: SweepResult, out: Path) -> None:
    if run_id is None:
        return
    with MLflowTracker(cfg.mlflow, run_name="", run_id=run_id) as tracker:
        tracker.log_metrics({f"best_{result.metric}": float(result.score or 0.0), "trials": float(len(result.trials))},
                            step=0)
        tracker.set_tags({f"best.{k}": str(v) for k, v in result.overrides.items()} | {"best_trial": str(result.trial)})
        tracker.log_artifact(out / "best.yaml", artifact_path="sweep")
        tracker.log_artifact(out / "trials.json", artifact_path="sweep")


class SweepMLflowCallback(LoggerCallback):
    """Driver side: one MLflow run per trial, nested under the sweep's run (`mlflow.parentRunId`), with the
    trial's values as params and its per-epoch results as metrics; FINISHED when the trial ends (ASHA's
    early stop included), FAILED when it raised. A trial resumed after an interruption continues its run.
    Its saved state is plain data (open trackers are left out), so Tune can keep it with the sweep. Every trial
    run is tagged with the sweep's `selection` (`tracking.selection_source`)."""

    selection = "source-validation"  # the state of a sweep saved before the tag existed has none

    def __init__(self, mlflow_cfg: dict[str, Any], parent_run_id: str, sweep: str,
                 selection: str = "source-validation") -> None:
        self.mlflow_cfg, self.parent_run_id, self.sweep = mlflow_cfg, parent_run_id, sweep
        self.selection = selection
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id
        self._open: dict[str, MLflowTracker] = {}  # trial id -> its open tracker (not saved with the sweep)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _open={})

    def _tracker(self, trial: Any) -> MLflowTracker:
        if trial.trial_id in self._open:
            return self._open[trial.trial_id]
        cfg = MlflowConfig.model_validate(self.mlflow_cfg)
        run_id = self.runs.get(trial.trial_id) or self._existing_run(cfg, trial.trial_id)
        if run_id is None:
            tags = {"mlflow.parentRunId": self.parent_run_id, "fssmeta.sweep": self.sweep,
                    "fssmeta.trial_id": trial.trial_id, "stage": "tune", "selection": self.selection}
            tracker = MLflowTracker(cfg, run_name=f"{self.sweep}-{trial.trial_id}", tags=tags)
            self.runs[trial.trial_id] = str(tracker.run_id)
            tracker.log_params({f"config.{k}": v for k, v in trial.config.items()})
        else:  # a trial resumed after an interruption continues its run
            tracker = MLflowTracker(cfg, run_name="", run_id=run_id)
        self._open[trial.trial_id] = tracker
        return tracker

    def _existing_run(self, cfg: Any, trial_id: str) -> str | None:
        """The run a trial got before an interruption (the callback's own state may predate it)."""
        client = _mlflow().MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
        experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        runs = client.search_runs([experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`fssmeta.trial_id` = '{trial_id}'"))
        if runs:
            self.runs[trial_id] = runs[0].info.run_id
        return self.runs.get(trial_id)

    def log_trial_start(self, trial: Any) -> None:
        self._tracker(trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        metrics = {k: float(v) for k, v in result.items()
                   if k.startswith(LOGGED_METRICS) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._tracker(trial).log_metrics(metrics, step=int(result.get("training_iteration", iteration)))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._tracker(trial).close("FAILED" if failed else "FINISHED")
        del self._open[trial.trial_id]
