"""Core trackers and run metadata (the MLflow tracker is tested in test_mlflow.py)."""

from __future__ import annotations

import json

import pytest

from fssmeta.config import ConfigError
from fssmeta.params import load_config
from fssmeta.tracking import JsonTracker, NullTracker, flatten, params_hash, protocol_tags, selection_source


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
    # the training episodes' rule is recorded as trained: `same` resolves to the test lists' rule
    assert tags["query_class"] == tags["train_query_class"] == "present"
    apart = protocol_tags(load_config(None, ["data.train_query_class=qualifying"]), fold=0, shot=1)
    assert (apart["query_class"], apart["train_query_class"]) == ("present", "qualifying")


TARGETS = {"data.targets": {"gray": {"layout": "deepglobe", "root": "g"}, "hazy": {"layout": "fss1000", "root": "h"}}}


def test_selection_source_names_the_episodes_that_chose_the_values():
    assert selection_source(load_config(None)) == "source-validation"
    hazy = load_config(None, {**TARGETS, "tune.domain": "hazy", "tune.trials": 2,
                              "tune.search_space": {"train.optim.lr": ["choice", 0.1]}})
    assert selection_source(hazy) == "target-validation:hazy"
    assert protocol_tags(hazy, fold=0, shot=1)["selection"] == "target-validation:hazy"
    # no sweep ran: nothing was chosen on the target, whatever tune.domain says
    assert selection_source(load_config(None, {**TARGETS, "tune.domain": "hazy"})) == "source-validation"


def test_tune_domain_errors_name_the_key():
    # checked when the params load, before any stage runs
    with pytest.raises(ConfigError, match=r"tune.domain: 'mars' is not `source` nor a data.targets name "
                                          r"\(known: source, gray, hazy\)"):
        load_config(None, {**TARGETS, "tune.domain": "mars"})
    with pytest.raises(ConfigError, match="tune.domain: 'gray' is not `source`"):  # a target of other params
        load_config(None, {"tune.domain": "gray"})
    with pytest.raises(ConfigError, match=r"tune: domain 'hazy': a sweep scored on a target runs single-worker "
                                          r"trials; set num_workers: 1 \(got 2\)"):
        load_config(None, {**TARGETS, "tune.domain": "hazy", "tune.num_workers": 2})
    with pytest.raises(ConfigError, match="tune: domain: empty"):
        load_config(None, {"tune.domain": ""})
    with pytest.raises(ConfigError, match="episodes.target_val_fraction"):
        load_config(None, {"episodes.target_val_fraction": 1.0})  # nothing left for the test lists
