"""CRNet on the synthetic benchmark (docs/results.md, "CRNet"): trained 1-shot on one source fold, scored at 1
and 5 shots in-domain and cross-domain (the fold's model on every `data.targets` list), under regime `none`
and under `finetune` (its k-shot inference, fssmeta/adaptation.py), with the seconds per episode of each.

Run after the data stages: `.venv/bin/python benchmarks/crnet.py [--fold 0] [--base runs/<x>/base]
[--set KEY=VALUE]`. `--base` reuses a stage-1 folder (`<train.out>/fold<k>/base`'s parent's parent layout);
without it stage 1 is trained first. Writes `benchmarks/results/crnet.json` and prints the rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fssmeta.data.io import write_json_atomic
from fssmeta.evaluation import evaluate_method, evaluate_targets
from fssmeta.params import load_config
from fssmeta.runs import base_dir
from fssmeta.stages import train_base, train_meta

RESULTS = Path(__file__).parent / "results" / "crnet.json"


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--workdir", default="runs/crnet-benchmark")
    parser.add_argument("--base", help="a stage-1 fold folder to copy (e.g. runs/ablation/base/fold0/base)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    overrides = ["model.method=crnet", "model.memory.enabled=false", "model.mining.enabled=false",
                 f"train.out={workdir / 'runs'}", f"eval.out={workdir / 'results'}", f"eval.folds=[{args.fold}]",
                 f"train.fold={args.fold}", "train.shot=1", *args.set]
    cfg = load_config(args.params, overrides)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
               f"torch {torch.__version__}")
    seconds: dict[str, float] = {}
    base = base_dir(cfg, args.fold)
    if args.base and not (base / "last.pt").is_file():
        shutil.copytree(args.base, base, dirs_exist_ok=True)
    if not (base / "last.pt").is_file():
        _, seconds["train_base"] = timed(train_base, cfg, args.fold, progress=False, resume_run=False)
    _, seconds["train_1shot"] = timed(train_meta, cfg, args.fold, progress=False, resume_run=False)

    rows: list[dict[str, Any]] = []
    for regime in ("none", "finetune"):
        for shot in args.shots:
            scored = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"shots": (shot,)})})
            report, in_secs = timed(evaluate_method, scored, "crnet", progress=False, regime=regime)
            cross, out_secs = timed(evaluate_targets, scored, "crnet", fold=args.fold, shot=shot, progress=False,
                                    regime=regime)
            per_list = report["protocol"]["episodes_per_list"]
            in_episodes = per_list * len(cfg.episodes.test_seeds)
            out_episodes = sum(s["episodes"] for r in cross["results"].values() for s in r[f"{shot}shot"]["seeds"])
            rows.append({"regime": regime, "shot": shot, "episodes_per_list": per_list,
                         "in_domain": report["mean"][f"{shot}shot"]["miou"],
                         "targets": {n: r[f"{shot}shot"]["miou_mean"] for n, r in cross["results"].items()},
                         "cross_domain_mean": cross["mean_over_targets"][f"{shot}shot"],
                         "seconds_per_episode": {"in_domain": in_secs / in_episodes,
                                                 "cross_domain": out_secs / out_episodes}})
            print(rows[-1], flush=True)
    results = {"machine": machine, "fold": args.fold, "overrides": overrides, "seconds": seconds,
               "finetune": cfg.eval.finetune.model_dump(mode="json"), "test_seeds": list(cfg.episodes.test_seeds),
               "train": {"epochs": cfg.train.epochs, "episodes_per_epoch": cfg.train.episodes_per_epoch,
                         "batch_size": cfg.train.batch_size}, "rows": rows}
    write_json_atomic(Path(args.out), results)
    print(f"{'regime':10}{'shot':>5}{'eps/list':>9}{'in-domain':>11}{'targets':>9}{'s/ep in':>9}{'s/ep out':>9}")
    for row in rows:
        print(f"{row['regime']:10}{row['shot']:>5}{row['episodes_per_list']:>9}{100 * row['in_domain']:>11.1f}"
              f"{100 * row['cross_domain_mean']:>9.1f}{row['seconds_per_episode']['in_domain']:>9.3f}"
              f"{row['seconds_per_episode']['cross_domain']:>9.3f}")


if __name__ == "__main__":
    main()
