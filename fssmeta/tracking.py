"""Experiment tracking behind a `Tracker` protocol: a null tracker, a JSON tracker for DVC metrics, and the
run metadata every tracker records. The MLflow tracker lives in `fssmeta/integrations/mlflow.py`."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Protocol

from fssmeta.config import Config, ConfigError, config_to_dict
from fssmeta.data.io import write_json_atomic
from fssmeta.models import get_method


class Tracker(Protocol):
    """What the loop and the stages log. Implementations do their own rank-0 check."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Logs nothing (tests, or `mlflow.enabled: false`)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class JsonTracker(NullTracker):
    """Keeps the latest metrics in a JSON file (a DVC `metrics:` output) and the history beside it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.history: list[dict[str, Any]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append({"step": step, **metrics})
        write_json_atomic(self.path, {"step": step, **metrics})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
    return out


def params_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def episodes_for(domain: str) -> str:
    """The selection episodes of `domain`, as tags and records name them: `source-validation` (the source fold's
    validation lists) or `target-validation:<name>` (target <name>'s selection lists, never its test lists)."""
    return "source-validation" if domain == "source" else f"target-validation:{domain}"


def selection_source(cfg: Config) -> str:
    """Which labelled episodes chose what a run trains with, beyond its own checkpoint selection (always the source
    validation list): `episodes_for(tune.domain)` when a sweep ran (`tune.trials` > 0), else `source-validation`.
    A `tune.domain` that is neither `source` nor a data.targets name is a ConfigError naming the key."""
    domain = cfg.tune.domain
    if domain != "source" and domain not in cfg.data.targets:
        known = ", ".join(["source", *sorted(cfg.data.targets)])
        raise ConfigError(f"tune.domain: {domain!r} is not `source` nor a data.targets name (known: {known})")
    return episodes_for(domain if cfg.tune.trials > 0 else "source")


def protocol_tags(cfg: Config, *, fold: int, shot: int, selection: str = "validation list") -> dict[str, str]:
    """The protocol a run used, recorded as tags beside its numbers (docs/protocol.md): `selection` (the
    argument) is how its checkpoint was chosen; the `selection` tag is `selection_source(cfg)`."""
    d, e = cfg.data, cfg.episodes
    tags = {
        "dataset": d.dataset, "fold": fold, "shot": shot, "train_pool": d.train_pool,
        "exclude_novel_images": d.exclude_novel_images, "coco_split": d.coco_split,
        "min_object_pixels": d.min_object_pixels, "query_class": d.query_class,
        "train_query_class": d.training_query_class,
        "resolution": cfg.eval.resolution,
        "test_size": cfg.eval.size, "canvas": get_method(cfg.model.method).test_canvas(cfg.eval.canvas),
        "episode_order": cfg.eval.episode_order, "test_episodes": e.test_episodes,
        "test_seeds": list(e.test_seeds), "val_seeds": list(e.val_seeds), "checkpoint_selection": selection,
        "selection": selection_source(cfg), "target_val_fraction": e.target_val_fraction,
        "method": cfg.model.method, "backbone": cfg.model.backbone,
        "ways": e.ways, "train_task": cfg.train.task, "supervision": cfg.train.supervision,  # iFSL's FS-CS
        "git_commit": git_commit(), "params_hash": params_hash(cfg),
    }
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in tags.items()}
