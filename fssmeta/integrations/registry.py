"""The MLflow model registry the `register` stage writes to: each best checkpoint logged as the pyfunc model
of mlflow_model.py (weights as an artifact, nothing pickled) and registered as a version, tagged with its
metrics, protocol and checkpoint hash; a checkpoint registered before is not registered again."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from fssmeta import distributed
from fssmeta.checkpoint import CheckpointError, file_sha256, read_checkpoint
from fssmeta.config import Config
from fssmeta.data.folds import split_name
from fssmeta.integrations.mlflow import (
    MLflowTracker,
    _metric_entities,
    _mlflow,
    _tracking_uri,
    resolve_tracking_uri,
    valid_name,
)
from fssmeta.integrations.mlflow_model import MODEL_CODE, model_signature, pip_requirements
from fssmeta.predict import load_checkpoint_model
from fssmeta.runs import fold_base_classes, stored_config
from fssmeta.tracking import protocol_tags, selection_source


def _base_classes(cfg: Config, checkpoint: Path, fold: int, base_classes: list[int] | None) -> list[int]:
    if base_classes is not None:
        return [int(c) for c in base_classes]
    from fssmeta.data.prepare import load_fold

    fold_file = Path(cfg.data.prepared) / f"{split_name(fold)}.json"
    if not fold_file.is_file():
        raise ValueError(f"register_model: {checkpoint}: pass base_classes=... (the fold's base class ids) or "
                         f"run `fssmeta prepare` so that {fold_file} exists")
    return [int(c) for c in load_fold(cfg.data.prepared, fold)["base"]]


def register_model(cfg: Config, *, checkpoint: str | Path, metrics: dict[str, float], tags: dict[str, str],
                   fold: int, shot: int, base_classes: list[int] | None = None,
                   run_id: str | None = None) -> dict[str, Any]:
    """Log `checkpoint` as a pyfunc model and register it as a new version of `mlflow.registered_model`,
    tagged with `metrics` (`metric.<name>`), `tags` (the protocol), fold, shot, `checkpoint_sha256`,
    `status=candidate` and `selection` (`tracking.selection_source`, from `cfg` unless `tags` has it); aliases
    are left alone (promotion moves them).

    Idempotent: a version whose `checkpoint_sha256` equals this checkpoint's is returned, not duplicated.
    The model goes into run `run_id` (its status is left as it is), or into a new run of
    `mlflow.experiment` holding `metrics` and `tags`. `base_classes` default to the prepared fold list.
    Returns {"name", "version", "run_id", "model_uri", "created"}. Call it from one process.
    """
    if not distributed.is_main_process():
        raise RuntimeError("register_model: call it from one process (rank 0), not from every rank")
    checkpoint = Path(checkpoint)
    name, uri = cfg.mlflow.registered_model, resolve_tracking_uri(cfg.mlflow)
    client = _mlflow().MlflowClient(tracking_uri=uri)
    sha256 = file_sha256(checkpoint)
    existing = _versions_with_checkpoint(client, name, sha256)
    if existing:
        return _version_info(existing[0], created=False)

    tags = {"selection": selection_source(cfg), **tags}
    info = {"fold": fold, "shot": shot, "base_classes": _base_classes(cfg, checkpoint, fold, base_classes),
            "checkpoint_sha256": sha256}
    _, model_cfg = load_checkpoint_model(checkpoint, info)  # a checkpoint that does not load fails here
    info["method"] = model_cfg.model.method
    version_tags = {**{valid_name(k): str(v) for k, v in tags.items()},
                    **{valid_name(f"metric.{k}"): repr(float(v)) for k, v in metrics.items()},
                    "method": info["method"], "fold": str(fold), "shot": str(shot),
                    "checkpoint_sha256": sha256, "status": "candidate"}
    if run_id is not None:
        client.log_batch(run_id, metrics=_metric_entities(metrics, step=0), synchronous=True)
        return _log_and_register(client, uri, name, checkpoint, info, version_tags, run_id)
    with MLflowTracker(cfg.mlflow, run_name=f"register-{info['method']}-{split_name(fold)}-{shot}shot", tags=tags) as run:
        run.log_metrics(metrics, step=0)
        return _log_and_register(client, uri, name, checkpoint, info, version_tags, run.run_id)


def register_checkpoint(cfg: Config, checkpoint: str | Path, *, metrics: dict[str, float]) -> dict[str, Any]:
    """`fssmeta register`: `register_model` for one training checkpoint, its fold, shot, base classes and
    protocol tags taken from the config stored in it (the `register` stage passes those of its params)."""
    trained = stored_config(read_checkpoint(checkpoint), checkpoint)  # a corrupt file fails here, before MLflow
    fold, shot = trained.train.fold, trained.train.shot
    return register_model(cfg, checkpoint=checkpoint, metrics=metrics, tags=protocol_tags(trained, fold=fold, shot=shot),
                          fold=fold, shot=shot, base_classes=fold_base_classes(trained, fold))


def _log_and_register(client: Any, uri: str, name: str, checkpoint: Path, info: dict[str, Any],
                      version_tags: dict[str, str], run_id: str) -> dict[str, Any]:
    mlflow = _mlflow()
    # Created here, in the run's experiment: left to MLflow, a LoggedModel goes to the process's current
    # experiment (the Default one, artifacts in ./mlruns) whatever run it comes from.
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="model",
                                       source_run_id=run_id, tags={"checkpoint_sha256": info["checkpoint_sha256"]})
    with tempfile.TemporaryDirectory() as tmp, _tracking_uri(uri), warnings.catch_warnings():
        # Declined: with an input example MLflow loads and runs the model at every registration; PYFUNC_INPUT
        # (the class docstring) describes the request instead.
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        (Path(tmp) / "fssmeta_model.json").write_text(json.dumps(info, indent=2))
        (Path(tmp) / "fssmeta_model.py").write_text(MODEL_CODE)
        # What `mlflow.pyfunc.log_model` calls, with an explicit run and model instead of the process's active
        # ones; the run's metrics at step 0 (the scores above) become the LoggedModel's metrics too.
        logged = mlflow.models.Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
            step=0, python_model=str(Path(tmp) / "fssmeta_model.py"), pip_requirements=pip_requirements(),
            signature=model_signature(),
            artifacts={"checkpoint": str(checkpoint), "info": str(Path(tmp) / "fssmeta_model.json")})
    if _registered_model_missing(client, name):
        client.create_registered_model(name, description="fssmeta few-shot segmentation models")
    # A sqlite registry looks the LoggedModel up through the process-wide tracking URI, not the client's.
    with _tracking_uri(uri):
        version = client.create_model_version(name, source=logged.model_uri, run_id=run_id, tags=version_tags,
                                              model_id=logged.model_id)
    return _version_info(version, created=True)


def _version_info(version: Any, *, created: bool) -> dict[str, Any]:
    return {"name": version.name, "version": str(version.version), "run_id": version.run_id,
            "model_uri": f"models:/{version.name}/{version.version}", "created": created}


def _versions_with_checkpoint(client: Any, name: str, sha256: str) -> list[Any]:
    versions = client.search_model_versions(f"name = '{name}' and tags.checkpoint_sha256 = '{sha256}'")
    return sorted(versions, key=lambda v: int(v.version))


def _registered_model_missing(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return True
    return False


def load_registered(cfg: Config, version_or_alias: str) -> Any:
    """The registered pyfunc model: a version number ("3") or an alias ("champion", "@champion").

    Its checkpoint artifact must hash to the version's `checkpoint_sha256` tag (a CheckpointError otherwise);
    the model's own load checks it against the hash in its info artifact as well."""
    mlflow = _mlflow()
    name, ref, uri = cfg.mlflow.registered_model, str(version_or_alias), resolve_tracking_uri(cfg.mlflow)
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = (client.get_model_version(name, ref) if ref.isdigit()
               else client.get_model_version_by_alias(name, ref.removeprefix("@")))
    expected = version.tags.get("checkpoint_sha256")
    where = f"the `checkpoint_sha256` tag of {name} version {version.version}"
    if not expected:
        raise CheckpointError(f"{name} version {version.version}: no `checkpoint_sha256` tag (not registered by "
                              "register_model); refusing to load a checkpoint that cannot be verified")
    with _tracking_uri(uri):  # the version itself, not the alias: it could move between the two reads
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    loaded = model.unwrap_python_model()
    if loaded.checkpoint_sha256 != expected:
        raise CheckpointError(f"{loaded.checkpoint_path}: checkpoint sha256 {loaded.checkpoint_sha256} does not "
                              f"match {expected} recorded in {where}; refusing to load it")
    return model
