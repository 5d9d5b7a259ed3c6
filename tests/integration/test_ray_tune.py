"""Integration: hyperparameter sweeps under real Ray Tune (Optuna search, ASHA) on a tiny synthetic fold —
a best config written for train_meta, every trial a FINISHED MLflow run nested under the sweep's run, a
pass-through when no trials are asked for, multi-worker trials driving a TorchTrainer, and an interrupted
sweep resumed with Tuner.restore."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fssmeta.config import Config, ConfigError, config_to_dict
from fssmeta.params import load_config, load_tuned, with_overrides
from tests.integration.ray_workspace import make_config

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

SPACE = {"train.optim.lr": ["loguniform", 0.001, 0.1], "model.bam.dropout": ["choice", 0.0, 0.2]}


def tune_config(workspace: Any, tmp_path: Path, ray: dict[str, Any] | None = None, **tune: Any) -> Config:
    values = {"trials": 4, "search_space": SPACE, "trial_overrides": {"train.epochs": 3},
              "max_concurrent_trials": 2, "cpus_per_trial": 1.0, "out": str(tmp_path / "tune"), **tune}
    return make_config(workspace, tmp_path, mlflow=True, **{f"tune.{k}": v for k, v in values.items()},
                       **{f"ray.{k}": v for k, v in (ray or {}).items()})


def runs_of(cfg: Config) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune'")


def check_tracking(cfg: Config, result: Any, trials: int) -> None:
    runs = runs_of(cfg)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_id == result.mlflow_run_id and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_miou"] == pytest.approx(result.score)
    assert len(children) == len(runs) - 1 == trials  # one run per trial, none duplicated by a resume
    assert {r.info.status for r in children} == {"FINISHED"}  # also the trials ASHA stopped early
    assert {r.data.tags["fssmeta.trial_id"] for r in children} == {t["trial"] for t in result.trials}
    for run in children:
        assert 0.0 <= run.data.metrics["val_miou"] <= 1.0 and "config.train.optim.lr" in run.data.params


@pytest.mark.integration
def test_sweep_writes_the_best_config_and_tracks_every_trial(workspace, ray_env, tmp_path):
    from fssmeta.integrations.ray_tune import run_sweep

    cfg = tune_config(workspace, tmp_path)
    result = run_sweep(cfg, progress=False)
    assert len(result.trials) == 4 and {t["status"] for t in result.trials} == {"terminated"}
    scores = [t["score"] for t in result.trials]
    assert all(0.0 <= s <= 1.0 for s in scores) and result.score == max(scores)
    epochs = [t["epochs"] for t in result.trials]
    assert max(epochs) == 3 and min(epochs) >= 1  # ASHA: grace period 1, at most train.epochs
    for trial in result.trials:
        lr, dropout = trial["config"]["train.optim.lr"], trial["config"]["model.bam.dropout"]
        assert 0.001 <= lr <= 0.1 and dropout in (0.0, 0.2)

    best = yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())
    assert best["overrides"] == result.overrides == next(t["config"] for t in result.trials if t["score"] == result.score)
    assert best["score"] == result.score and best["metric"] == "val_miou" and best["trials"] == 4
    assert json.loads((tmp_path / "tune" / "trials.json").read_text())["trials"] == result.trials
    check_tracking(cfg, result, trials=4)

    # What train_meta trains with: params plus the tuned values, the trials' short schedule left out.
    tuned = with_overrides(cfg, load_tuned(tmp_path / "tune" / "best.yaml"), "best.yaml")
    assert tuned.train.optim.lr == result.overrides["train.optim.lr"]
    assert tuned.model.options("bam")["dropout"] == result.overrides["model.bam.dropout"]
    assert tuned.train.epochs == cfg.train.epochs != 3


@pytest.mark.integration
def test_zero_trials_pass_params_through(workspace, tmp_path):
    from fssmeta.integrations.ray_tune import run_sweep

    cfg = tune_config(workspace, tmp_path, trials=0)
    result = run_sweep(cfg, progress=False)
    assert result.overrides == {} and result.path is None and "pass through" in result.note
    assert load_tuned(tmp_path / "tune" / "best.yaml") == {}
    assert not (tmp_path / "ray_results").exists()  # no Ray, no trials
    assert with_overrides(cfg, {}, "best.yaml") == cfg


@pytest.mark.integration
def test_multi_worker_trials_drive_a_torch_trainer(workspace, ray_env, tmp_path):
    from fssmeta.integrations.ray_tune import run_sweep

    # 2 workers x 0.5 CPU + the driver's 0.01 fit the 2-CPU local Ray
    cfg = tune_config(workspace, tmp_path, ray={"resources_per_worker": {"CPU": 0.5}}, trials=2,
                      max_concurrent_trials=1, num_workers=2, trial_overrides={"train.epochs": 2})
    result = run_sweep(cfg, progress=False)
    assert {t["status"] for t in result.trials} == {"terminated"}
    assert all(t["score"] is not None and t["epochs"] >= 1 for t in result.trials)
    # each trial's DDP run lives in the sweep's folder, named after the trial (what a restore resumes)
    runs = sorted(p.name for p in (Path(result.path) / "train").iterdir())
    assert runs == sorted(f"trial-{t['trial']}" for t in result.trials)
    check_tracking(cfg, result, trials=2)


SWEEP_SCRIPT = """
import sys, yaml
from fssmeta.params import config_from_dict
from fssmeta.integrations.ray_tune import run_sweep
run_sweep(config_from_dict(yaml.safe_load(open(sys.argv[1]))), progress=True)
"""


@pytest.mark.integration
def test_an_interrupted_sweep_resumes(workspace, ray_env, tmp_path):
    from fssmeta.integrations.ray_tune import SWEEP_FILE, run_sweep, sweep_prefix

    cfg = tune_config(workspace, tmp_path, trials=3, max_concurrent_trials=1, trial_overrides={"train.epochs": 4})
    params = tmp_path / "config.yaml"
    params.write_text(yaml.safe_dump(config_to_dict(cfg)))
    process = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(params)], cwd=os.getcwd(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    storage = tmp_path / "ray_results"
    deadline = time.time() + 180
    try:  # interrupt once the first trial has reported an epoch, as Ctrl-C would
        while time.time() < deadline and not any(p.stat().st_size for p in storage.glob("tune-*/*/result.json")):
            assert process.poll() is None, process.communicate()[0][-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and "run the same command again to resume" in output, output[-3000:]
    (sweep,) = storage.glob(f"{sweep_prefix(cfg)}-*")
    assert json.loads((sweep / SWEEP_FILE).read_text())["done"] is False
    assert not (tmp_path / "tune" / "best.yaml").exists()  # nothing written for a partial sweep
    started = {p.name for p in sweep.iterdir() if p.is_dir()}

    result = run_sweep(cfg, progress=False)
    assert result.restored and Path(result.path) == sweep  # the same sweep, not a new one
    assert len(result.trials) == 3 and {t["status"] for t in result.trials} == {"terminated"}
    assert started <= {p.name for p in sweep.iterdir() if p.is_dir()}  # the first attempt's trials kept
    assert json.loads((sweep / SWEEP_FILE).read_text())["done"] is True
    assert load_tuned(tmp_path / "tune" / "best.yaml") == result.overrides
    check_tracking(cfg, result, trials=3)


def test_search_space_is_checked_at_load():
    def error(**tune: Any) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(None, {f"tune.{k}": v for k, v in tune.items()})
        return str(info.value)

    assert "tune.search_space.train.optim.lrx: no such setting" in error(search_space={"train.optim.lrx": ["choice", 1]})
    assert "only keys of train, model, transform" in error(search_space={"ray.num_workers": ["choice", 1, 2]})
    assert "loguniform needs lo > 0" in error(search_space={"train.optim.lr": ["loguniform", 0, 1]})
    assert "lo < hi" in error(search_space={"train.optim.lr": ["uniform", 0.1, 0.01]})
    assert "kind one of" in error(search_space={"train.optim.lr": ["normal", 0, 1]})
    assert "is a section" in error(trial_overrides={"train.optim": 1})
    assert "search_space is empty" in error(trials=2)
    space = load_config(None, {"tune.search_space": SPACE, "tune.trials": 2}).tune.search_space
    assert space["train.optim.lr"] == ("loguniform", 0.001, 0.1)
    assert math.isclose(with_overrides(load_config(None), {"train.optim.lr": 1}, "x").train.optim.lr, 1.0)


@pytest.mark.integration
def test_a_sweep_scored_on_a_targets_selection_episodes(workspace, ray_env, tmp_path):
    """`tune.domain: hazy`: every trial is scored each epoch on hazy's selection lists (its test lists never),
    Tune keeps the best by that score, and the sweep's and trials' MLflow runs say which episodes chose."""
    from fssmeta.cli import main
    from fssmeta.integrations.ray_tune import TARGET_METRIC, SweepError, run_sweep

    syn = tmp_path / "syn"  # a target with enough images for both pools: 2 of 6 per class for selection
    assert main(["synthesize", "--params", "none", "--quiet", "--set", f"synthesize.out={syn}",
                 "--set", "synthesize.image_size=96", "--set", "synthesize.train_images=8",
                 "--set", "synthesize.test_images=4", "--set", "synthesize.val_images=4",
                 "--set", "synthesize.target_images_per_class=6"]) == 0
    targets = {"data.targets": {"hazy": {"layout": "fss1000", "root": str(syn / "targets" / "hazy")}},
               "episodes.out": str(tmp_path / "episodes"), "eval.resized_size": 65}
    _, sets = workspace
    episode_sets = {**{k: v for k, v in sets.items() if k.split(".")[0] not in ("ray", "mlflow")}, **targets}
    assert main(["episodes", "--params", "none", "--quiet",
                 *[a for k, v in episode_sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]]) == 0
    for path in (tmp_path / "episodes" / "targets" / "hazy").glob("test_*.json"):
        path.write_text("not an episode list")  # a trial that read a test list would fail

    with pytest.raises(ConfigError, match=r"tune.domain: 'mars' is not `source` nor a data.targets name \(known: "
                                          r"source, hazy\)"):
        run_sweep(with_overrides(tune_config(workspace, tmp_path), {**targets, "tune.domain": "mars"}, "test"),
                  progress=False)
    off = with_overrides(tune_config(workspace, tmp_path), {**targets, "tune.domain": "hazy",
                                                            "episodes.target_val_fraction": 0.0}, "test")
    with pytest.raises(SweepError, match="tune.domain hazy: trials are scored on its selection list"):
        run_sweep(off, progress=False)

    cfg = with_overrides(tune_config(workspace, tmp_path, trials=2, trial_overrides={"train.epochs": 2}),
                         {**targets, "tune.domain": "hazy"}, "test")
    result = run_sweep(cfg, progress=False)
    assert {t["status"] for t in result.trials} == {"terminated"}
    assert all(0.0 <= t["score"] <= 1.0 for t in result.trials) and result.score == max(t["score"] for t in result.trials)
    assert (result.metric, result.selection) == (TARGET_METRIC, "target-validation:hazy")
    best = yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())
    assert (best["metric"], best["domain"], best["selection"]) == (TARGET_METRIC, "hazy", "target-validation:hazy")
    trials = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert trials["metric"] == TARGET_METRIC and trials["trials"] == result.trials

    runs = runs_of(cfg)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics[f"best_{TARGET_METRIC}"] == pytest.approx(result.score)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and {r.data.tags["selection"] for r in [parent, *children]} == {"target-validation:hazy"}
    for run in children:  # both scores per epoch: source validation and the target's selection episodes
        assert {"val_miou", TARGET_METRIC} <= set(run.data.metrics)
        history = mlflow_history(cfg, run.info.run_id, TARGET_METRIC)
        trial = next(t for t in result.trials if t["trial"] == run.data.tags["fssmeta.trial_id"])
        assert max(history) == pytest.approx(trial["score"]) and len(history) == trial["epochs"]


def mlflow_history(cfg: Config, run_id: str, key: str) -> list[float]:
    import mlflow

    return [m.value for m in mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(run_id, key)]
