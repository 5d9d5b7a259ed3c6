"""The logged model: the MLflow pyfunc class `mlflow models serve` runs (it rebuilds the network from the
checkpoint artifact; no pickled weights or code), its signature and pinned requirements, and loading a logged
model back from any URI MLflow resolves (`fssmeta predict`, promotion scoring)."""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from fssmeta.checkpoint import CheckpointError, file_sha256
from fssmeta.config import Config, MlflowConfig
from fssmeta.decoding import RequestError
from fssmeta.integrations.mlflow import _mlflow, _tracking_uri, resolve_tracking_uri
from fssmeta.predict import load_checkpoint_model
from fssmeta.served import OPTIONAL_COLUMNS, PYFUNC_INPUT, REQUEST_COLUMNS, check_limits, segment_records

# The pyfunc model is "models from code": MLflow keeps this file and runs it to load the model, so nothing
# is pickled (weights travel as the checkpoint artifact).
MODEL_CODE = """# A fssmeta few-shot segmentation model; needs the fssmeta package installed where it is loaded.
import mlflow

from fssmeta.integrations.mlflow_model import FssmetaPyfunc

mlflow.models.set_model(FssmetaPyfunc())
"""


def pip_requirements() -> list[str]:
    """Pinned from this environment; fssmeta itself is not on a package index: serve with `--env-manager
    local` in an environment where fssmeta is installed."""
    pins = []
    for name in ("mlflow", "torch", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "albumentations",
                 "opencv-python-headless"):
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")  # a local tag (+cpu) is no pin
        except metadata.PackageNotFoundError:  # e.g. opencv-python instead of the headless build
            continue
    return pins


@functools.cache
def pyfunc_class() -> type:
    mlflow = _mlflow()
    # Recorded and dropped: MLflow's advice to add type hints to `predict` (declined there). A plain
    # "ignore" filter does not work: MLflow installs its own "once" filter around the check.
    with warnings.catch_warnings(record=True):
        return _define_pyfunc_class(mlflow.pyfunc.PythonModel)


def _define_pyfunc_class(base: type) -> type:
    class FssmetaPyfunc(base):
        __doc__ = "A fssmeta few-shot segmentation model.\n\n" + PYFUNC_INPUT

        def load_context(self, context: Any) -> None:
            import torch

            check_limits()  # a bad FSSMETA_MAX_* value stops the server at start, not every request
            info = json.loads(Path(context.artifacts["info"]).read_text())
            self.shot = info["shot"]
            self.checkpoint_path = Path(context.artifacts["checkpoint"])
            self.checkpoint_sha256 = verified_sha256(self.checkpoint_path, info)
            self.model, self.cfg = load_checkpoint_model(self.checkpoint_path, info)
            if torch.cuda.is_available():
                self.model.to("cuda")

        # Deliberately without type hints: MLflow would derive an input schema from them, and its schema check
        # drops unknown columns silently; PYFUNC_INPUT (the class docstring) describes the input, `_records`
        # checks it.
        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            # A bad request is the client's error: MlflowException(INVALID_PARAMETER_VALUE) makes the scoring
            # server answer 400 with this message (any other exception: 400 with a generic message).
            try:
                return segment_records(self.model, self.cfg, self.shot, _records(model_input))
            except (RequestError, KeyError) as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    FssmetaPyfunc.__module__, FssmetaPyfunc.__qualname__ = __name__, "FssmetaPyfunc"
    return FssmetaPyfunc


def verified_sha256(checkpoint: Path, info: dict[str, Any]) -> str:
    """The checkpoint file's sha256, refused (CheckpointError naming both hashes) unless it is the
    `checkpoint_sha256` registration recorded in the model's info artifact."""
    expected = info.get("checkpoint_sha256")
    if not expected:
        raise CheckpointError(f"{checkpoint}: the model's info artifact records no checkpoint_sha256; refusing to "
                              "load a checkpoint that cannot be verified")
    actual = file_sha256(checkpoint)
    if actual != expected:
        raise CheckpointError(f"{checkpoint}: checkpoint sha256 {actual} does not match {expected} recorded at "
                              "registration (the model's info artifact); refusing to load it")
    return actual


def _records(model_input: Any) -> list[dict[str, Any]]:
    """The request rows of a DataFrame (or a list of dicts / a dict of columns): the request columns, and
    optionally the per-row mask options and `ways` (`OPTIONAL_COLUMNS`), nothing else.

    Checked here, not by MLflow: the logged signature declares no inputs because MLflow's schema check drops
    unknown columns silently, and a misspelt optional-looking column should be the client's error."""
    import pandas as pd

    if not isinstance(model_input, pd.DataFrame):
        try:
            model_input = pd.DataFrame(model_input)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"model input: expected a table with columns {', '.join(REQUEST_COLUMNS)} "
                               f"({exc})") from None
    missing = [c for c in REQUEST_COLUMNS if c not in model_input.columns]
    unknown = [str(c) for c in model_input.columns if c not in (*REQUEST_COLUMNS, *OPTIONAL_COLUMNS)]
    if missing or unknown:
        problems = [f"{what} column(s) {', '.join(names)}" for what, names in (("missing", missing),
                                                                              ("unknown", unknown)) if names]
        raise RequestError(f"model input: {'; '.join(problems)} (expected {', '.join(REQUEST_COLUMNS)}, "
                           f"optionally {', '.join(OPTIONAL_COLUMNS)})")
    return model_input.to_dict("records")


def model_signature() -> Any:
    """The logged signature: the output dict's fields. No inputs: MLflow would drop unknown request columns
    before `predict` sees them; `_records` and `segment_record` check the columns and their types instead."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    outputs = Schema([ColSpec("string", "mask"), ColSpec("string", "foreground_probability"),
                      ColSpec("double", "foreground_fraction"), ColSpec("long", "height"), ColSpec("long", "width"),
                      # N-way rows (`ways` > 1) only
                      ColSpec("string", "labels", required=False), ColSpec(Array("boolean"), "presence", required=False),
                      ColSpec(Array("double"), "class_fractions", required=False)])
    return ModelSignature(outputs=outputs)


def __getattr__(name: str) -> Any:
    # `from fssmeta.integrations.mlflow_model import FssmetaPyfunc` (MODEL_CODE) builds the class on first use,
    # so importing this module does not import MLflow.
    if name == "FssmetaPyfunc":
        return pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def download_model(cfg: MlflowConfig, model_uri: str, dst: str | Path) -> tuple[Path, dict[str, Any]]:
    """Download a logged fssmeta model (any URI MLflow resolves: `models:/name@alias`, `models:/name/3`,
    `runs:/...`) into `dst`; returns its checkpoint file and its info (fold, shot, base_classes, ...).
    A URI MLflow cannot resolve is a ValueError naming it."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(cfg)
    with _tracking_uri(uri):
        try:
            local = Path(_mlflow().artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        except MlflowException as exc:
            raise ValueError(f"{model_uri}: {exc.message} (tracking URI {uri})") from None
    import yaml

    # The pyfunc flavour in MLmodel names both artifacts (the checkpoint keeps its training file name).
    spec = next(local.rglob("MLmodel"), None)
    flavor = yaml.safe_load(spec.read_text()).get("flavors", {}).get("python_function", {}) if spec else {}
    artifacts = flavor.get("artifacts") or {}
    if not {"checkpoint", "info"} <= artifacts.keys():
        raise ValueError(f"{model_uri}: not a fssmeta model (no MLmodel naming `checkpoint` and `info` artifacts)")
    info = json.loads((spec.parent / artifacts["info"]["path"]).read_text())
    return spec.parent / artifacts["checkpoint"]["path"], info


def load_logged_model(cfg: MlflowConfig, model_uri: str) -> tuple[Any, Config, dict[str, Any]]:
    """The model behind `model_uri` (eval mode, CPU), its training config and its info, loaded from its
    checkpoint artifact with `load_checkpoint_model` (no pickled code runs) once its sha256 is verified."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, info = download_model(cfg, model_uri, tmp)
        verified_sha256(checkpoint, info)
        model, model_cfg = load_checkpoint_model(checkpoint, info)
    return model, model_cfg, info
