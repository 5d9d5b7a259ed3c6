"""Model throughput: training and evaluation episodes/s and peak memory for each method, backbone size and shot.

Run: `.venv/bin/python benchmarks/model.py [--steps N] [--sizes small resnet50]`. Each configuration runs in
its own subprocess so its peak memory (max RSS on CPU, max allocated on CUDA) is its own. bf16 autocast
and channels_last on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from fssmeta.config import ModelConfig, OptimConfig
from fssmeta.data.folds import base_classes
from fssmeta.episode import Episode
from fssmeta.models import METHODS, build_model, count_learnable
from fssmeta.train import autocast, build_optimization, train_step

CONFIGS = {  # size -> (model params, input side)
    "small": (dict(backbone="small", pspnet={"ppm_dim": 128}, bam={"reduce_dim": 64, "aspp_dilations": (2, 4, 6)},
                   pfenet={"reduce_dim": 64, "pyramid_bins": (21, 11, 6, 3)},
                   ntrenet={"reduce_dim": 64, "pyramid_bins": (21, 11, 6, 3)},
                   sccan={"reduce_dim": 64, "feature_size": 24, "num_heads": 4, "window_size": 4,
                          "aspp_dilations": (2, 4, 6), "dilation": "pspnet"}), 161),
    "resnet50": (dict(backbone="resnet50"), 473),
    "resnet50_400": (dict(backbone="resnet50"), 400),  # the HSNet family's official protocol (resized to 400)
}


def episode(batch: int, shot: int, side: int, device: torch.device) -> Episode:
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(batch, shot + 1, side, side, generator=g) > 0.5).long()
    return Episode(torch.randn(batch, shot, 3, side, side, generator=g).to(device), masks[:, 1:].to(device),
                   torch.randn(batch, 3, side, side, generator=g).to(device), masks[:, 0].to(device),
                   torch.full((batch,), 6, dtype=torch.long).to(device))


def run_one(method: str, size: str, shot: int, steps: int, batch: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params, side = CONFIGS[size]
    record = METHODS[method]
    model = build_model(ModelConfig(method=method, **params), shot=shot, base_classes=base_classes("pascal", 0)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    # The method's own optimisers (SCCAN: two; HDMNet: two LR groups), as `train_meta` builds them.
    optimizer, _ = build_optimization(record.optimizers(model, record.training_recipe(OptimConfig())), steps + 1)
    ep = episode(batch, shot, side, device)
    train_step(model, ep, record.loss, optimizer, amp=cuda)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, ep, record.loss, optimizer, amp=cuda)
    if cuda:
        torch.cuda.synchronize()
    train_eps = steps * batch / (time.perf_counter() - start)
    model.eval()
    with torch.no_grad(), autocast(device, cuda):
        model(ep)
        start = time.perf_counter()
        for _ in range(steps):
            model(ep)
        if cuda:
            torch.cuda.synchronize()
    eval_eps = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "size": size, "side": side, "shot": shot, "batch": batch, "device": str(device),
            "train_eps": train_eps, "eval_eps": eval_eps, "peak_mib": peak, "learnable": count_learnable(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=[k for k, m in METHODS.items() if m.learned])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, size, shot = args.one.split(",")
        print(json.dumps(run_one(method, size, int(shot), args.steps, args.batch)))
        return
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}")
    print(f"{'method':8} {'size':9} {'side':>4} {'shot':>4} {'train ep/s':>10} {'eval ep/s':>10} {'peak MiB':>9} {'learnable':>10}")
    for size in args.sizes:
        for method in args.methods:
            for shot in (1, 5):
                out = subprocess.run([sys.executable, __file__, "--one", f"{method},{size},{shot}", "--steps",
                                      str(args.steps), "--batch", str(args.batch)], capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{method:8} {size:9} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{method:8} {size:9} {r['side']:>4} {shot:>4} {r['train_eps']:>10.2f} {r['eval_eps']:>10.2f} "
                      f"{r['peak_mib']:>9.0f} {r['learnable']:>10,}")


if __name__ == "__main__":
    main()
