"""Integration: the stub method of tests/stub_method.py dropped into a copy of the repository as
fssmeta/models/stub.py, with its one METHODS line and its `model.stub` options section, runs the project's
real `dvc repro` end to end: trained once at 1 shot, the 5-shot stage pointing at that checkpoint, evaluated at
1 and 5 shots, reported and registered. Nothing else in the copy changes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from tests.integration.test_dvc_pipeline import TINY, merge, repo_copy, run

STUB = Path(__file__).resolve().parents[1] / "stub_method.py"


def test_a_method_file_one_line_and_its_options_run_in_dvc_repro(tmp_path):
    repo, env = repo_copy(tmp_path / "repo", edit=_add_stub)
    result = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage 'register'" in result.stdout
    one, five = repo / "runs/fold0/stub-1shot", repo / "runs/fold0/stub-5shot"
    assert (one / "best.pt").is_file() and not (five / "best.pt").exists()
    pointer = json.loads((five / "trained_shot.json").read_text())
    assert pointer["trained_shot"] == 1 and Path(pointer["checkpoint_dir"]) == Path("runs/fold0/stub-1shot")
    evaluated = json.loads((repo / "results/fold0/stub.json").read_text())["results"]["fold0"]
    assert set(evaluated) == {"1shot", "5shot"}
    metrics = json.loads((repo / "report/metrics.json").read_text())
    assert {"1shot", "5shot"} <= set(metrics["stub"])
    assert "| stub | 5 |" in (repo / "report/report.md").read_text()


def _add_stub(repo: Path) -> None:
    shutil.copy(STUB, repo / "fssmeta/models/stub.py")  # the method's file
    init = repo / "fssmeta/models/__init__.py"
    text = init.read_text()
    assert text.count('    "baseline",\n') == 1
    init.write_text(text.replace('    "baseline",\n', '    "baseline",\n    "stub",\n'))  # its METHODS line
    params = yaml.safe_load((repo / "params.yaml").read_text())
    merge(params, TINY)
    params["data"]["targets"] = TINY["data"]["targets"]
    params["model"]["method"] = "stub"
    params["model"]["stub"] = {"hidden": 4, "support_masking": "hybrid"}  # its options section
    params["synthesize"] |= {"test_images": 150, "val_images": 100, "target_images_per_class": 8}  # 5-shot lists
    params["episodes"]["shots"] = [1, 5]
    params["eval"]["shots"] = [1, 5]
    params["tune"]["trials"] = 0
    params["train"]["optim"] = {}  # the method's own recipe
    params["model"]["memory"]["enabled"] = False  # family parts the stub does not have
    params["model"]["mining"]["enabled"] = False
    params["registry"]["promote"] = False
    # no promotion, so no target selection pool: 8 hazy images per class cannot hold 6 + 6 for 5-shot pools
    params["episodes"]["target_val_fraction"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))



def test_hsnet_runs_the_whole_pipeline(tmp_path):
    """A built method of the HSNet family through the real `dvc repro`: Adam from its own record (params.yaml
    as shipped: train.method_optim names only the SGD methods), the sweep on its learning rate, both source models (fold 0 and the all-classes one)
    registered and each challenging on its domains; none of the PFENet-family parts switched on."""
    repo, env = repo_copy(tmp_path / "repo", edit=_hsnet_params)
    result = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage 'train_meta_all@1'" in result.stdout and "Running stage 'register'" in result.stdout
    trained = torch.load(repo / "runs/fold0/hsnet-1shot/best.pt", weights_only=True)
    assert trained["config"]["model"]["method"] == "hsnet"
    assert all("betas" in group for group in trained["optimizer"]["param_groups"])  # Adam, its record's recipe
    best = yaml.safe_load((repo / "runs/tune/best.yaml").read_text())
    assert 3.0e-4 <= best["overrides"]["train.optim.lr"] <= 3.0e-3
    assert set(json.loads((repo / "report/metrics.json").read_text())["hsnet"]) == {"1shot"}
    registered = json.loads((repo / "report/registered.json").read_text())
    assert [v["fold"] for v in registered["versions"]] == [0, "all"]
    assert [p["domain"] for p in registered["promotions"]] == ["source", "hazy"]


def _hsnet_params(repo: Path) -> None:
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    params["data"]["targets"] = TINY["data"]["targets"]
    params["model"]["method"] = "hsnet"
    params["model"]["memory"]["enabled"] = False  # PFENet-family parts hsnet does not take
    params["model"]["mining"]["enabled"] = False
    params["tune"]["search_space"] = {"train.optim.lr": ["loguniform", 3.0e-4, 3.0e-3]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
