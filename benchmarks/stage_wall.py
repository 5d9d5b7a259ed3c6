"""Wall time of one pipeline stage, end to end as `dvc repro` runs it (Python start-up, imports, Ray start-up
and shut-down, MLflow, the work itself), for one or more checkouts of the project, alternating between them.

Run: `.venv/bin/python benchmarks/stage_wall.py --roots /tmp/old /work/main --repeats 3 [--stage train_meta]
[--fold 0] [--shot 1] [--base runs/fold0/base]`. Each root is a checkout (a `git worktree` of another
commit); each run is that root's `python -m pipelines.<stage> --params params.yaml` with the outputs (runs,
Ray storage, an MLflow sqlite store, the stage records) in a fresh temporary folder, the given base learner
linked in. Prints each run's seconds and, per root, the median. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run_once(root: Path, args: argparse.Namespace, base: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="stage-wall-") as tmp:
        out = Path(tmp)
        (out / "runs" / f"fold{args.fold}").mkdir(parents=True)
        (out / "runs" / f"fold{args.fold}" / "base").symlink_to(base)
        sets = {"train.out": out / "runs", "train_base.out": out / "runs", "ray.storage_path": out / "ray",
                "mlflow.tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "mlflow.artifact_location": out / "art",
                "report.out": out / "report"}
        cmd = [sys.executable, "-m", f"pipelines.{args.stage}", "--params", "params.yaml",
               "--fold", str(args.fold), "--shot", str(args.shot)]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the stage imports its own root's code
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{root}: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roots", nargs="+", type=Path, required=True, help="checkouts to time, alternately")
    p.add_argument("--stage", default="train_meta", help="a module of pipelines/ taking --fold and --shot")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--base", type=Path, default=Path("runs/fold0/base"), help="the fold's trained base learner")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    base = args.base.resolve()
    if not (base / "last.pt").is_file():
        sys.exit(f"{base / 'last.pt'}: no base learner (--base); run `fssmeta train-base --fold {args.fold}` first")
    roots = [r.resolve() for r in args.roots]
    for root in roots:
        if not (root / "pipelines" / f"{args.stage}.py").is_file():
            sys.exit(f"{root}: no pipelines/{args.stage}.py (--roots takes project checkouts)")
    print(f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"pipelines.{args.stage} --fold {args.fold} --shot {args.shot}")
    times: dict[Path, list[float]] = {r: [] for r in roots}
    for i in range(args.repeats):
        for root in roots:
            seconds = run_once(root, args, base)
            times[root].append(seconds)
            print(f"run {i + 1}: {root}: {seconds:.1f} s", flush=True)
    print("\n| checkout | median s | runs |\n|---|---|---|")
    for root, ts in times.items():
        print(f"| {root} | {statistics.median(ts):.1f} | {' / '.join(f'{t:.1f}' for t in ts)} |")


if __name__ == "__main__":
    main()
