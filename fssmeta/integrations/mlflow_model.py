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

from fssmeta.config import Config, MlflowConfig
from fssmeta.integrations.mlflow import _mlflow, _tracking_uri, resolve_tracking_uri
from fssmeta.predict import (
    PYFUNC_INPUT,
    REQUEST_COLUMNS,
    RequestError,
    load_checkpoint_model,
    max_image_pixels,
    segment_record,
)

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

            max_image_pixels()  # a bad FSSMETA_MAX_IMAGE_PIXELS stops the server at start, not every request
            info = json.loads(Path(context.artifacts["info"]).read_text())
            self.shot = info["shot"]
            self.model, self.cfg = load_checkpoint_model(context.artifacts["checkpoint"], info)
            if torch.cuda.is_available():
                self.model.to("cuda")

        # Deliberately without type hints: MLflow would derive a schema from them; the logged signature
        # (`model_signature`) describes the input instead.
        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            # A bad request is the client's error: MlflowException(INVALID_PARAMETER_VALUE) makes the scoring
            # server answer 400 with this message (any other exception: 400 with a generic message).
            try:
                return [segment_record(self.model, self.cfg, self.shot, record, f"row {i}")
                        for i, record in enumerate(_records(model_input))]
            except (RequestError, KeyError) as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    FssmetaPyfunc.__module__, FssmetaPyfunc.__qualname__ = __name__, "FssmetaPyfunc"
    return FssmetaPyfunc


def _records(model_input: Any) -> list[dict[str, Any]]:
    """The request rows of a DataFrame (or a list of dicts / a dict of columns), every column present."""
    import pandas as pd

    if not isinstance(model_input, pd.DataFrame):
        try:
            model_input = pd.DataFrame(model_input)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"model input: expected a table with columns {', '.join(REQUEST_COLUMNS)} "
                               f"({exc})") from None
    missing = [c for c in REQUEST_COLUMNS if c not in model_input.columns]
    if missing:
        raise RequestError(f"model input: missing column(s) {', '.join(missing)}")
    return model_input.to_dict("records")


def model_signature() -> Any:
    """The logged signature: base64 strings in (lists of them for the supports), the output dict's fields out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "query_img"), ColSpec(Array("string"), "support_imgs"),
                     ColSpec(Array("string"), "support_masks")])
    outputs = Schema([ColSpec("string", "mask"), ColSpec("string", "foreground_probability"),
                      ColSpec("double", "foreground_fraction"), ColSpec("long", "height"), ColSpec("long", "width")])
    return ModelSignature(inputs=inputs, outputs=outputs)


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
    checkpoint artifact with `load_checkpoint_model` (no pickled code runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, info = download_model(cfg, model_uri, tmp)
        model, model_cfg = load_checkpoint_model(checkpoint, info)
    return model, model_cfg, info
