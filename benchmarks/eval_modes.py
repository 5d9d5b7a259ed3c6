"""Evaluation modes on trained models: fp32 without the feature cache, fp32 with it (`eval.feature_cache_mib`),
and bf16 autocast (`eval.amp: all`, with the cache): seconds per mode and, per fixed list, the mIoU and its
change from fp32, so the cache's exactness and bf16's effect are read off the real lists.

Run after the models exist (`make pipeline`, or `benchmarks/synthetic.py`, which trains into runs/):
`.venv/bin/python benchmarks/eval_modes.py [--methods bam baseline] [--folds 0] [--shots 1 5] [--set key=value]`.
Results go to a temporary `eval.out`; nothing of the pipeline's is overwritten.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch

from fssmeta.evaluation import evaluate_method
from fssmeta.params import load_config
from fssmeta.train import cpu_computes_bf16

MODES = {  # name -> eval overrides
    "fp32, no cache": {"amp": "off", "feature_cache_mib": 0},
    "fp32, cache": {"amp": "off"},
    "bf16 (all), cache": {"amp": "all"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--methods", nargs="+", default=["bam", "baseline"])
    parser.add_argument("--folds", nargs="+", type=int, default=[0])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device}, CPU bf16: {cpu_computes_bf16()}")
    out = tempfile.mkdtemp(prefix="fssmeta-eval-modes-")
    cfg = load_config(args.params, [*args.set, f"eval.folds={args.folds}", f"eval.shots={args.shots}",
                                    f"eval.out={out}"])
    print(f"{'method':9} {'mode':18} {'seconds':>8}  " + "  ".join(f"{s}-shot mIoU per list (delta vs fp32)"
                                                              for s in args.shots))
    for method in args.methods:
        reference = None
        for mode, overrides in MODES.items():
            run = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=overrides)})
            report = evaluate_method(run, method, progress=False)
            lists = {(f, s): [r["miou"] for r in report["results"][f"fold{f}"][f"{s}shot"]["seeds"]]
                     for f in args.folds for s in args.shots}
            reference = reference or lists
            cells = []
            for s in args.shots:
                values = [v for f in args.folds for v in lists[(f, s)]]
                deltas = [v - r for f in args.folds for v, r in zip(lists[(f, s)], reference[(f, s)])]
                cells.append(" ".join(f"{100 * v:.2f}" for v in values)
                             + f" (max |delta| {100 * max(map(abs, deltas)):.3f})")
            print(f"{method:9} {mode:18} {report['seconds']:>8.1f}  " + "  ".join(cells), flush=True)
    print("mIoU in %, one value per fixed list (fold x test seed); delta = this mode minus fp32 without the cache")


if __name__ == "__main__":
    main()
