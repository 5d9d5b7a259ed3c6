"""Helpers shared by the MLflow, serving and `fssmeta predict` tests: a tiny model config, checkpoints of it,
and images encoded the way requests carry them."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fssmeta.checkpoint import save_checkpoint
from fssmeta.config import Config, EvalConfig, MlflowConfig, ModelConfig, config_to_dict
from fssmeta.models import build_model

BASE_CLASSES = list(range(6, 21))  # fold 0 of the synthetic / PASCAL classes
SIZE = 65
TINY_MODEL = ModelConfig(backbone="small", pspnet={"ppm_dim": 16}, bam={"reduce_dim": 16, "aspp_dilations": (1, 2, 3)})


def tiny_config(**sections: object) -> Config:
    """The default config with the tiny model and a 65-pixel test size; `sections` replace whole sections."""
    return Config(**{"model": TINY_MODEL, "eval": EvalConfig(test_size=SIZE), **sections})


def local_mlflow(tmp_path: Path, monkeypatch: Any, registered_model: str) -> MlflowConfig:
    """Work in `tmp_path` against a sqlite store there (no MLFLOW_TRACKING_URI from the environment, no
    telemetry); the config naming it and `registered_model`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "artifacts"),
                        registered_model=registered_model)


def save_model(cfg: Config, path: Path, seed: int) -> Path:
    """A randomly initialised model of `cfg` (seeded) saved as a training checkpoint with its config."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, shot=cfg.train.shot, base_classes=BASE_CLASSES)
    return save_checkpoint(path, model=model, config=config_to_dict(cfg), epoch=3)


def encode(array: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format=format)
    return buffer.getvalue()


def png_base64(array: np.ndarray) -> str:
    return base64.b64encode(encode(array)).decode()


def decode_png(value: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(value)))
    assert image.format == "PNG"
    return image


def episode_arrays(seed: int, query_shape: tuple[int, int] = (50, 70),
                   support_shape: tuple[int, int] = (40, 60)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random query and support image (other sizes) and a 0/255 support mask with a box of foreground."""
    rng = np.random.default_rng(seed)
    query = rng.integers(0, 256, (*query_shape, 3), dtype=np.uint8)
    support = rng.integers(0, 256, (*support_shape, 3), dtype=np.uint8)
    mask = np.zeros(support_shape, np.uint8)
    mask[5 : support_shape[0] - 5, 10 : support_shape[1] - 10] = 255
    return query, support, mask


def request_row(seed: int, **shapes: tuple[int, int]) -> dict[str, object]:
    """One request row (base64 PNGs) built from `episode_arrays`."""
    query, support, mask = episode_arrays(seed, **shapes)
    return {"query_img": png_base64(query), "support_imgs": [png_base64(support)], "support_masks": [png_base64(mask)]}
