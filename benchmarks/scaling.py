"""Ray Train scaling: meta-training episodes/s of `train_meta` with 1 and 2 CPU workers at the same global
batch, against the same loop in one plain process, and the fixed cost of starting a Ray run (ray.init, the
worker group, DDP set-up and data loading, up to the first training step).

Run: `.venv/bin/python benchmarks/scaling.py [--params params.yaml] [--workers 1 2] [--epochs 3]`. Needs the
prepared synthetic data and fold 0's base learner; when `data/prepared/index.json` or `runs/fold0/base/last.pt`
is missing it makes them first with small settings (a 300-image dataset with fold 0's 1-shot lists, a
1-epoch base learner). The meta runs write only to a temporary folder (the base learner is linked in), never
to the project's `runs/`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fssmeta.cli import main as fssmeta
from fssmeta.config import Config
from fssmeta.integrations.ray_train import train_with_ray
from fssmeta.params import load_config
from fssmeta.runs import base_dir
from fssmeta.stages import train_meta

# Enough for fold 0, 1-shot (what the runs use); fewer images cannot fill every fold's 5-shot lists.
SMALL_DATA = ["synthesize.train_images=300", "synthesize.test_images=60", "synthesize.val_images=40",
              "synthesize.target_images_per_class=5", "episodes.folds=[0]", "episodes.shots=[1]",
              "episodes.test_episodes=100", "episodes.val_episodes=40",
              "episodes.target_val_fraction=0"]  # 5 images per class cannot hold a selection pool too


def ensure_inputs(params: str) -> None:
    """Make the data and the base learner the runs need, if they are not there yet."""
    cfg = load_config(params)
    common = ["--params", params, "--quiet"]
    if not (Path(cfg.data.prepared) / "index.json").is_file():
        print("no prepared data: synthesize, prepare, episodes (small settings)")
        for stage in ("synthesize", "prepare", "episodes"):
            if fssmeta([stage, *common, *(a for s in SMALL_DATA for a in ("--set", s))]) != 0:
                raise SystemExit(f"scaling: `fssmeta {stage}` failed (above)")
    if not (base_dir(cfg, 0) / "last.pt").is_file():
        print("no fold-0 base learner: train-base (1 epoch)")
        if fssmeta(["train-base", "--fold", "0", *common, "--set", "train_base.epochs=1",
                    "--set", "train_base.episodes_per_epoch=128"]) != 0:
            raise SystemExit("scaling: `fssmeta train-base` failed (above)")


def workspace_config(params: str, out: Path, *, workers: int, global_batch: int, steps: int, epochs: int) -> Config:
    """params.yaml, except: outputs under `out`, no validation and no MLflow (pure training throughput)."""
    base = load_config(params)
    runs = out / "runs"
    (runs / "fold0").mkdir(parents=True, exist_ok=True)
    if not (runs / "fold0" / "base").exists():
        (runs / "fold0" / "base").symlink_to(base_dir(base, 0).resolve())
    batch = global_batch // workers
    return load_config(params, {"train.fold": 0, "train.out": str(runs), "train_base.out": str(runs), "train.epochs": epochs,
                                "train.batch_size": batch, "train.episodes_per_epoch": steps * batch,
                                "train.val_episodes": 0, "ray.num_workers": workers,
                                "ray.resources_per_worker": {"CPU": 1.0}, "ray.max_failures": 0,
                                "ray.fail_at_step": 0, "ray.storage_path": str(out / "ray_results"),
                                "mlflow.enabled": False})


def plain_run(cfg: Config) -> dict[str, float]:
    """The same loop in this process, one thread (as a 1-CPU Ray worker gets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: list[float] = []
    start = time.perf_counter()
    try:
        train_meta(cfg, 0, progress=False, resume_run=False, device=torch.device("cpu"),
                   reporter=lambda metrics, checkpoint: times.append(time.perf_counter()))
    finally:
        torch.set_num_threads(threads)
    return {"epoch_s": times[-1] - times[-2], "total_s": times[-1] - start, "startup_s": float("nan")}


def ray_run(cfg: Config) -> dict[str, float]:
    start_wall, start = time.time(), time.perf_counter()
    result = train_with_ray(cfg, progress=False)
    return {"epoch_s": result.metrics["time_this_epoch_s"], "total_s": time.perf_counter() - start,
            "startup_s": result.metrics["first_step_time"] - start_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the last one is timed (the first warms up)")
    parser.add_argument("--no-plain", action="store_true", help="skip the one-process reference")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    ensure_inputs(args.params)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fssmeta-scaling-") as tmp:
        setups = ([("plain, 1 process", 1, plain_run)] if not args.no_plain else [])
        setups += [(f"ray, {w} worker{'s' if w > 1 else ''}", w, ray_run) for w in args.workers]
        for label, workers, run in setups:
            cfg = workspace_config(args.params, Path(tmp) / label.replace(", ", "-").replace(" ", ""),
                                   workers=workers, global_batch=args.global_batch, steps=args.steps,
                                   epochs=args.epochs)
            figures = run(cfg)
            rows.append((label, args.steps * args.global_batch / figures["epoch_s"], figures))
            print(f"  {label}: done in {figures['total_s']:.1f} s", flush=True)
    cfg = load_config(args.params)
    print(f"\n{cfg.model.method}, {cfg.model.backbone} backbone, crop {cfg.transform.crop_size}, "
          f"{cfg.train.shot}-shot, global batch {args.global_batch}, {args.steps} steps/epoch, "
          f"epoch {args.epochs} of {args.epochs} timed")
    print(f"{'setup':<18}{'episodes/s':>12}{'speed-up':>10}{'start-up s':>12}{'total s':>10}")
    reference = next((eps for label, eps, _ in rows if label.startswith("ray, 1 ")), rows[0][1])
    for label, eps, figures in rows:
        startup = "-" if math.isnan(figures["startup_s"]) else f"{figures['startup_s']:.1f}"
        print(f"{label:<18}{eps:>12.2f}{eps / reference:>10.2f}{startup:>12}{figures['total_s']:>10.1f}")
    print("start-up: from the train_with_ray call (ray.init included) to the first training step")


if __name__ == "__main__":
    main()
