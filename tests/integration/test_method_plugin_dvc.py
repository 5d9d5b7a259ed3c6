"""Integration: the stub method of tests/stub_method.py dropped into a copy of the repository as
fssmeta/models/stub.py, with its one METHODS line and its `model.stub` options section, runs the project's
real `dvc repro` end to end: trained once at 1 shot, the 5-shot stage pointing at that checkpoint, evaluated at
1 and 5 shots, reported and registered. Nothing else in the copy changes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

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

