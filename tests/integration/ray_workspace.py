"""The Ray tests' shared set-up: a private Ray environment and a tiny trained-from-nothing workspace
(synthetic data, fold-0 lists and episodes, a one-epoch base learner). conftest.py exposes the fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray

from fssmeta.cli import main
from fssmeta.config import Config
from fssmeta.params import load_config


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """Ray's session files and the workers' temp folders inside the test's tmp dir (a short path: Ray's
    socket paths must stay under 108 characters), fast report polling, no auth for the private instances."""
    tmp = tmp_path_factory.mktemp("r")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp), "RAY_AUTH_MODE": "disabled",
                           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            yield tmp
        finally:
            if ray.is_initialized():
                ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A tiny synthetic dataset, its fold-0 lists and episodes, and a one-epoch base learner."""
    root = tmp_path_factory.mktemp("ws")
    sets: dict[str, Any] = {
        "synthesize.out": str(root / "syn"), "synthesize.image_size": 96, "synthesize.train_images": 160,
        "synthesize.test_images": 40, "synthesize.val_images": 30, "synthesize.target_images_per_class": 1,
        # no 255 band: every pixel carries loss, so a rank's mean loss is exactly its share of the global one
        "synthesize.boundary_width": 0,
        "data.root": str(root / "syn"), "data.prepared": str(root / "prepared"), "data.cache_dir": str(root / "cache"),
        "data.targets": {}, "data.min_object_pixels": 400,
        "episodes.out": str(root / "episodes"), "episodes.folds": [0], "episodes.shots": [1],
        "episodes.orders": ["image"], "episodes.test_episodes": 10, "episodes.test_seeds": [0],
        "episodes.val_episodes": 8,
        "transform.crop_size": 65, "eval.test_size": 65, "eval.folds": [0], "eval.shots": [1],
        "model.backbone": "small", "model.bam.reduce_dim": 16, "model.pspnet.ppm_dim": 16,
        "model.bam.aspp_dilations": [1, 2, 3],
        "train_base.out": str(root / "runs"), "train_base.epochs": 1, "train_base.episodes_per_epoch": 32,
        "train_base.transform.crop_size": 65, "train_base.val_episodes": 8,
        "train.out": str(root / "runs"), "train.epochs": 2, "train.episodes_per_epoch": 8, "train.batch_size": 2,
        "train.val_episodes": 4, "ray.num_workers": 2, "ray.resources_per_worker": {"CPU": 1.0},
        "ray.num_cpus": 2, "ray.max_failures": 0, "mlflow.enabled": False,
    }
    args = ["--params", "none", "--quiet"]
    for stage in ("synthesize", "prepare", "episodes", "train-base"):
        cfg_args = [a for key, value in sets.items() if key.split(".")[0] not in ("ray", "mlflow")
                    for a in ("--set", f"{key}={_yaml(value)}")]
        assert main([stage, *args, *cfg_args]) == 0, stage
    return root, sets


def _yaml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def make_config(workspace, tmp_path: Path, mlflow: bool = False, **overrides: Any) -> Config:
    """The workspace's config with this test's own outputs: runs (sharing the base learner), Ray storage, MLflow."""
    root, sets = workspace
    runs = tmp_path / "runs"
    (runs / "fold0").mkdir(parents=True, exist_ok=True)
    if not (runs / "fold0" / "base").exists():
        (runs / "fold0" / "base").symlink_to(root / "runs" / "fold0" / "base")
    values = {**sets, "train.out": str(runs), "ray.storage_path": str(tmp_path / "ray_results")}
    if mlflow:
        values |= {"mlflow.enabled": True, "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "mlflow.artifact_location": str(tmp_path / "mlartifacts"), "mlflow.experiment": "ray-test"}
    return load_config(None, {**values, **overrides})
