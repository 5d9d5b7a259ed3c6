"""Core trackers and run metadata (the MLflow tracker is tested in test_mlflow.py)."""

from __future__ import annotations

import json

from fssmeta.params import load_config
from fssmeta.tracking import JsonTracker, NullTracker, flatten, params_hash, protocol_tags


def test_json_tracker_keeps_the_latest_metrics(tmp_path):
    tracker = JsonTracker(tmp_path / "m.json")
    tracker.log_metrics({"val_miou": 0.25}, step=1)
    tracker.log_metrics({"val_miou": 0.5}, step=2)
    assert json.loads((tmp_path / "m.json").read_text()) == {"step": 2, "val_miou": 0.5}
    assert [h["step"] for h in tracker.history] == [1, 2]
    NullTracker().log_metrics({"x": 1.0}, step=0)  # accepts and ignores


def test_flatten_and_protocol_tags():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": "[1, 2]", "d": "{}"}
    cfg = load_config(None)
    tags = protocol_tags(cfg, fold=2, shot=5)
    assert tags["fold"] == "2" and tags["shot"] == "5" and tags["exclude_novel_images"] == "True"
    assert tags["params_hash"] == params_hash(cfg) != params_hash(load_config(None, ["eval.episodes=7"]))
