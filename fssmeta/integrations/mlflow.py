"""MLflow: the run tracker (explicit `MlflowClient` calls, rank 0 only) and the connection helpers the rest of
integrations/ share. The registry (registering versions) is registry.py; the logged pyfunc model mlflow_model.py."""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fssmeta import distributed
from fssmeta.config import Config, MlflowConfig, config_to_dict
from fssmeta.tracking import NullTracker, Tracker, flatten

# MLflow's own limits (mlflow.utils.validation): 100 params or tags per batch, 1000 metrics per batch.
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
MAX_PARAM_LENGTH, MAX_TAG_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_INVALID_NAME_CHARS = re.compile(r"[^\w./\- ]")  # MLflow allows also ':' but not on Windows


def _mlflow() -> Any:
    """Import MLflow on first use. The project runs offline (clusters, CI): MLflow's usage telemetry is
    off unless the user has set MLFLOW_DISABLE_TELEMETRY themselves (it is read once, at import)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def resolve_tracking_uri(cfg: MlflowConfig) -> str:
    """MLFLOW_TRACKING_URI from the environment wins over `mlflow.tracking_uri`. A relative sqlite file or
    local folder is made absolute against the current directory, so Ray workers (other CWDs) share it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        path, _, query = uri.removeprefix("sqlite:///").partition("?")
        if path and path != ":memory:" and not Path(path).is_absolute():
            return f"sqlite:///{Path.cwd() / path}" + (f"?{query}" if query else "")
        return uri
    if "://" not in uri and not uri.startswith("databricks"):
        local = uri.removeprefix("file:")
        return Path(local).absolute().as_uri() if local else uri
    return uri


def resolve_artifact_location(location: str) -> str | None:
    """A local folder becomes an absolute file URI (else MLflow writes to ./mlruns of whatever CWD runs);
    a store URI (s3://, gs://, mlflow-artifacts:/...) passes unchanged; "" leaves it to the server."""
    if not location:
        return None
    split = urllib.parse.urlsplit(location)
    if split.scheme not in ("", "file") and len(split.scheme) > 1:  # one letter: a Windows drive
        return location
    local = split.path if split.scheme == "file" else location
    return Path(local).absolute().as_uri()


def resolve_config(cfg: MlflowConfig) -> MlflowConfig:
    """`cfg` with the tracking URI (environment applied) and artifact location made absolute here: resolve
    it in the driver before sending it to Ray workers, which may run in other directories or environments."""
    location = resolve_artifact_location(cfg.artifact_location) or ""
    return cfg.model_copy(update={"tracking_uri": resolve_tracking_uri(cfg), "artifact_location": location})


def valid_name(name: str) -> str:
    """A metric, param or tag key MLflow accepts: other characters become '_', and no '//', '.' or '..'
    path segments (MLflow rejects names that a path normalisation would change)."""
    parts = [p for p in _INVALID_NAME_CHARS.sub("_", str(name)).split("/") if p not in ("", ".")]
    return ("/".join("__" if p == ".." else p for p in parts) or "_")[:MAX_KEY_LENGTH]


def ensure_experiment(client: Any, cfg: MlflowConfig) -> str:
    """The id of `cfg.experiment`, created with an explicit artifact location if it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        try:
            return client.create_experiment(cfg.experiment,
                                            artifact_location=resolve_artifact_location(cfg.artifact_location))
        except MlflowException as exc:  # another process created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(f"mlflow.experiment: {cfg.experiment!r} is deleted in {client.tracking_uri}; restore it "
                         f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or rename it")
    return experiment.experiment_id


class MLflowTracker:
    """A `Tracker` writing one MLflow run through an explicit client (no global active run), so it is safe
    in Ray workers and threads. On ranks other than 0 it does nothing and `run_id` is None.

    `run_id` resumes an existing run (a restarted Ray worker): it is set RUNNING again and logging appends.
    As a context manager, an exception marks the run FAILED (KILLED for Ctrl-C) and propagates.
    """

    def __init__(self, cfg: MlflowConfig, *, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None) -> None:
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: Any = None
        if not distributed.is_main_process():
            return
        self._client = _mlflow().MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
        if run_id is None:
            self.experiment_id = ensure_experiment(self._client, cfg)
            run = self._client.create_run(self.experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
        else:
            run = self._client.get_run(run_id)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            self._client.update_run(run_id, status="RUNNING")
        if tags:
            self.set_tags(tags)

    def log_params(self, params: dict[str, Any]) -> None:
        """Nested dicts are flattened (`train.optim.lr`); values are logged as text, at most 6000 chars."""
        if self._client is None:
            return
        from mlflow.entities import Param

        items = [Param(valid_name(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        items = _metric_entities(metrics, step)
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH], synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under the run's artifacts (in `artifact_path` if given)."""
        if self._client is None:
            return
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._client is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(valid_name(k), str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + PARAMS_PER_BATCH], synchronous=True)

    def close(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED; later calls do nothing."""
        if status not in RUN_STATUSES:
            raise ValueError(f"MLflowTracker.close: status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        if self._client is None:
            return
        self._client.set_terminated(self.run_id, status=status)
        self._client = None

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _metric_entities(metrics: dict[str, float], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(valid_name(k), float(v), now, step) for k, v in metrics.items()]


def tracker_from_config(cfg: Config, *, run_name: str, tags: dict[str, str],
                        run_id: str | None = None) -> Tracker:
    """An `MLflowTracker` with the whole config logged as params when `mlflow.enabled`, else a `NullTracker`."""
    if not cfg.mlflow.enabled:
        return NullTracker()
    tracker = MLflowTracker(cfg.mlflow, run_name=run_name, tags=tags, run_id=run_id)
    tracker.log_params(config_to_dict(cfg))
    return tracker


# --------------------------------------------------------------------------------------------- registry

@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide URI at `uri` for `pyfunc.log_model` / `load_model`, which read only that;
    restore it after (MLflow mirrors it into MLFLOW_TRACKING_URI, which `resolve_tracking_uri` reads)."""
    mlflow = _mlflow()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again
