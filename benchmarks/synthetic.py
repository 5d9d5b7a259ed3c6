"""The synthetic benchmark: novel-class mIoU of BAM, PFENet and the non-learned baseline after the default
CPU budget, every fold, 1-shot and 5-shot, and how long the budget takes.

Run after `make pipeline`'s data stages (`fssmeta synthesize && fssmeta prepare && fssmeta episodes`):
`.venv/bin/python benchmarks/synthetic.py [--methods bam pfenet] [--folds 0 1 2 3] [--set key=value]`. Uses
params.yaml, whose flagship switches (memory + mining) apply to every method listed: with pfenet, add
`--set model.mining.enabled=false`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from fssmeta.evaluation import evaluate_method
from fssmeta.params import load_config
from fssmeta.stages import train_base, train_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--methods", nargs="+", default=["bam", "pfenet"])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override, e.g. model.mining.enabled=false (PFENet takes no mining part)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    cfg = load_config(args.params, [*args.set, f"eval.folds={args.folds}", f"eval.shots={args.shots}"])
    timings: dict[str, float] = {}
    for fold in args.folds:
        start = time.perf_counter()
        train_base(cfg.model_copy(update={"train_base": cfg.train_base.model_copy(update={"fold": fold})}), fold,
                   progress=False, resume_run=False)
        timings[f"base fold{fold}"] = time.perf_counter() - start
    for method in args.methods:
        for fold in args.folds:
            for shot in args.shots:
                run = cfg.model_copy(update={"model": cfg.model.model_copy(update={"method": method}),
                                             "train": cfg.train.model_copy(update={"fold": fold, "shot": shot})})
                start = time.perf_counter()
                train_meta(run, fold, progress=False, resume_run=False)
                timings[f"{method} fold{fold} {shot}shot"] = time.perf_counter() - start
    print(f"{'method':10}" + "".join(f"{f'{s}-shot mIoU':>22}" for s in args.shots) + f"{'eval s':>8}")
    for method in [*args.methods, "baseline"]:
        run = cfg.model_copy(update={"model": cfg.model.model_copy(update={"method": method})})
        report = evaluate_method(run, method, progress=False)
        cells = []
        for shot in args.shots:
            per_seed = [report["results"][f"fold{f}"][f"{shot}shot"]["miou_mean"] for f in args.folds]
            stds = [report["results"][f"fold{f}"][f"{shot}shot"]["miou_std"] for f in args.folds]
            cells.append(f"{100 * sum(per_seed) / len(per_seed):>14.1f} +- {100 * max(stds):4.1f}")
        print(f"{method:10}" + "".join(f"{c:>22}" for c in cells) + f"{report['seconds']:>8.0f}")
    print("mIoU: mean over folds of the per-fold mean over seeds; +- the largest per-fold std over seeds")
    for name, seconds in timings.items():
        print(f"train {name}: {seconds:.0f} s")
    print(f"total training: {sum(timings.values()):.0f} s")


if __name__ == "__main__":
    main()
