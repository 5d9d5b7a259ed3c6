"""Integration: benchmarks/gpu_checks.sh, the one script a session lent a GPU runs, runs every step at toy sizes
on the CPU (SMOKE=1), so a flag renamed in a benchmark fails here, not in scarce device time; a failing step is
named in its summary and the script's exit status says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"


def run_checks(out: Path, python: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "wheels").mkdir(exist_ok=True)  # none: this environment has the imports (a staged .whl/ is not read)
    env = {**os.environ, "SMOKE": "1", "PYTHON": python, "WHEELS": str(tmp_path / "wheels")}
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_step_runs_at_toy_sizes(tmp_path):
    out = tmp_path / "out"
    done = run_checks(out, sys.executable, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[:3] == ["tests: ok", "model: ok", "eval_cache: ok"]
    assert summary[3] in ("compare: ok", "compare: skipped (no .official/BAM or .official/PFENet: "
                                         "benchmarks/gpu_prepare.sh stages them)")
    assert summary[4:] == ["memory: ok"]
    assert "eval ep/s" in (out / "model.txt").read_text()
    assert "scores identical (mIoU, FB-IoU, per-class IoU of every list): True" in (out / "eval_cache.txt").read_text()
    assert "reference" in (out / "memory.txt").read_text()  # the torch row the FAISS rows are checked against


def test_a_failing_step_is_named_and_fails_the_script(tmp_path):
    out = tmp_path / "out"
    done = run_checks(out, "false", tmp_path)  # a "python" that fails every command
    assert done.returncode == 1
    summary = (out / "summary.txt").read_text().splitlines()
    assert "tests: failed (exit 1)" in summary and "memory: failed (exit 1)" in summary
