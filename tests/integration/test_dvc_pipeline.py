"""Integration: the real `dvc repro` of the project's dvc.yaml, in a temporary copy of the repository with tiny
params — end to end, a no-op second run, a partial rerun after an evaluation change, metrics, the registry,
and a failing stage that keeps earlier outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    # 6 target images per class: ceil(0.2 x 6) = 2 held out for selection (episodes.target_val_fraction), 4 test
    "synthesize": {"image_size": 96, "train_images": 240, "test_images": 60, "val_images": 30,
                   "target_images_per_class": 6},
    "data": {"min_object_pixels": 600, "targets": {"hazy": {"layout": "fss1000", "root": "data/synthetic/targets/hazy"}}},
    "episodes": {"folds": [0], "shots": [1], "orders": ["image"], "test_episodes": 20, "test_seeds": [0, 1],
                 "val_episodes": 10},
    "transform": {"crop_size": 65},
    "eval": {"test_size": 65, "resized_size": 97, "folds": [0], "shots": [1], "episodes": 20,
             "target_regimes": ["none", "tta"], "tta": {"steps": 3, "episodes": 5}},
    "model": {"pspnet": {"ppm_dim": 16}, "bam": {"reduce_dim": 16, "aspp_dilations": [1, 2, 3]}},
    "train_base": {"epochs": 1, "episodes_per_epoch": 32, "val_episodes": 10, "transform": {"crop_size": 65}},
    "train": {"epochs": 1, "episodes_per_epoch": 16, "batch_size": 4, "val_episodes": 10},
    "ray": {"num_workers": 1, "num_cpus": 2},
    "tune": {"trials": 2, "max_concurrent_trials": 1,
             "trial_overrides": {"train.epochs": 1, "train.episodes_per_epoch": 8, "train.val_episodes": 5}},
    "report": {"qualitative_episodes": 2},
}


def merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) and value else value
    return base


def run(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    # Its own process group: on a timeout the whole group goes (the stages dvc started, their Ray workers),
    # not only dvc, so nothing outlives the test and competes with the tests after it.
    with subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def repo_copy(repo: Path, edit: Callable[[Path], None]) -> tuple[Path, dict[str, str]]:
    """A git repository holding the project's tracked files (as they are in the working tree), changed by
    `edit`, committed; and the environment to run DVC in it."""
    repo.mkdir(parents=True, exist_ok=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    edit(repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(repo / ".dvc-site-cache"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    git = ["git", "-c", "user.name=fssmeta-test", "-c", "user.email=test@fssmeta.invalid"]
    run(["git", "init", "-q"], repo, env)
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "tiny"], repo, env)
    return repo, env


def tiny_params(repo: Path) -> None:
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    params["data"]["targets"] = TINY["data"]["targets"]  # replaced, not merged: one small target only
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The project with tiny params, after a first `dvc repro`."""
    repo, env = repo_copy(tmp_path_factory.mktemp("repo"), edit=tiny_params)
    first = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    return repo, env, first


def test_repro_end_to_end(repo):
    path, env, first = repo
    assert "Running stage 'register'" in first.stdout
    for name in ("report/report.md", "report/metrics.json", "report/plots/training_curves.png",
                 "report/plots/per_class_iou.png", "report/plots/qualitative.png", "report/registered.json",
                 "runs/fold0/bam-1shot/best.pt", "results/fold0/bam.json", "results/fold0/baseline.json",
                 "runs/all/base/last.pt", "runs/all/bam-1shot/best.pt",  # the all-classes source stages
                 "results/targets/bam-all.json", "results/targets/baseline-all.json",
                 "results/targets/bam-all-tta.json"):
        assert (path / name).is_file(), name
    # PATNet's source model: every source class (20) trained, selected on the all/ validation lists, and it
    # (not fold 0's model, which holds 5 classes out) is what scored the targets
    source = torch.load(path / "runs/all/bam-1shot/best.pt", weights_only=True)
    assert source["config"]["train"]["fold"] == "all" and len(source["model"]["base_classes"]) == 20
    assert "Running stage 'train_meta_all@1'" in first.stdout and (path / "data/episodes/all").is_dir()
    scored = json.loads((path / "results/targets/bam-all.json").read_text())
    assert scored["source_fold"] == "all" and not (path / "results/fold0/targets").exists()
    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], path, env).stdout
    assert "report/metrics.json" in shown and "bam.1shot.miou" in shown
    assert "cross_domain.bam.1shot.hazy" in shown and "cross_domain.baseline.1shot.mean" in shown
    report = (path / "report/report.md").read_text()
    assert "## Cross-domain (PATNet protocol)" in report and "## Hyperparameter sweep (tune stage)" in report
    assert "| bam+tta | 1 |" in report and "cross_domain.bam+tta.1shot.hazy" in shown  # its own row
    adapted = json.loads((path / "results/targets/bam-all-tta.json").read_text())
    assert adapted["protocol"]["regime"]["tta"]["steps"] == 3 and adapted["protocol"]["episodes_per_list"] == 5
    # the sweep ran before training, and training used its best values
    best = yaml.safe_load((path / "runs/tune/best.yaml").read_text())
    assert set(best["overrides"]) == {"train.optim.lr", "model.memory.alpha"} and best["trials"] == 2
    trained = torch.load(path / "runs/fold0/bam-1shot/best.pt", weights_only=True)["config"]
    assert trained["train"]["optim"]["lr"] == best["overrides"]["train.optim.lr"]
    assert trained["model"]["memory"]["alpha"] == best["overrides"]["model.memory.alpha"]
    assert trained["train"]["epochs"] == TINY["train"]["epochs"]  # not the trials' short schedule


def test_registry_holds_a_tagged_version(repo):
    path, env, _ = repo
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    versions = {v.tags["fold"]: v for v in client.search_model_versions("name = 'fssmeta'")}
    assert set(versions) == {"0", "all"}  # fold 0's model, and the all-classes cross-domain source model
    for fold, version in versions.items():
        tags = version.tags
        assert tags["status"] == "candidate" and tags["shot"] == "1" and tags["dataset"] == "synthetic"
        assert ("metric.miou" in tags) is (fold == "0")  # no in-domain test for a model that saw every class
        assert ("metric.target_hazy_miou" in tags) is (fold == "all")
    assert 0.0 <= float(versions["all"].tags["metric.target_hazy_miou"]) <= 1.0
    registered = json.loads((path / "report/registered.json").read_text())
    assert registered["selection"] == registered["versions"][0]["selection"] == "source-validation"
    # Each domain's decision is recorded with the version's score and the non-learned baseline's on the same
    # selection episodes (hazy: its val lists, never its test lists). The first version becomes a domain's
    # champion only where it beats that baseline (the floor applies to the first champion too): whether a
    # one-epoch tiny BAM does is the scores' business, so the rule is checked against the recorded scores.
    promotions = registered["promotions"]
    assert [(p["domain"], p["episodes"]) for p in promotions] == [
        ("source", "source-validation"), ("hazy", "target-validation:hazy")]
    for p in promotions:  # on source fold 0's version challenges, on the target the all-classes model's
        domain, above = p["domain"], p["challenger_score"] > p["baseline_score"]
        version = versions["0" if domain == "source" else "all"]
        tags = version.tags
        assert p["challenger"] == str(version.version)
        assert 0.0 <= p["challenger_score"] <= 1.0 and 0.0 <= p["baseline_score"] <= 1.0
        assert float(tags[f"promotion.{domain}.score"]) == p["challenger_score"]
        assert float(tags[f"promotion.{domain}.baseline_score"]) == p["baseline_score"]
        assert p["promoted"] is above and tags[f"promotion.{domain}.decision"] == ("promoted" if above else "rejected")
        assert p["reason"] == "no champion yet" if above else "below the non-learned baseline" in p["reason"]
        aliases = client.get_registered_model("fssmeta").aliases
        assert aliases.get(f"champion-{domain}") == (version.version if above else None)


def test_second_repro_reruns_nothing(repo):
    path, env, _ = repo
    second = run([sys.executable, "-m", "dvc", "repro"], path, env)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in run([sys.executable, "-m", "dvc", "status"], path, env).stdout


def test_eval_change_reruns_only_downstream(repo):
    path, env, _ = repo
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    champions = set(client.get_registered_model("fssmeta").aliases)  # before the rerun
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["eval"]["baseline_threshold"] = 0.6
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "dvc", "repro"], path, env).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate@0", "evaluate_targets", "report", "register"}
    registered = json.loads((path / "report/registered.json").read_text())
    assert not any(v["created"] for v in registered["versions"])  # the same checkpoints: no duplicates
    # where the version is champion it stays so; where it was below the baseline it is decided again (the
    # baseline's threshold changed, so its score did), by the same rule
    for p in registered["promotions"]:
        if f"champion-{p['domain']}" in champions:
            assert p["reason"] == "already the champion"
        else:
            above = p["challenger_score"] > p["baseline_score"]
            assert p["promoted"] is above
            assert p["reason"] == "no champion yet" if above else "below the non-learned baseline" in p["reason"]


def test_failing_stage_keeps_earlier_outputs_and_names_the_problem(repo):
    path, env, _ = repo
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["data"]["root"] = "data/missing-dataset"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run([sys.executable, "-m", "dvc", "repro"], path, env, check=False)
    assert result.returncode != 0
    assert "data/missing-dataset" in result.stdout + result.stderr
    assert (path / "data/synthetic/VOC2012/JPEGImages").is_dir()
    assert (path / "runs/fold0/bam-1shot/best.pt").is_file()
