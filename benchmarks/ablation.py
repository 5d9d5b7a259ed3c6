"""The flagship ablation on the synthetic benchmark: BAM, BAM + memory, BAM + mining, the flagship (both) and
NTRENet, each trained on one source fold at 1 and 5 shots with the params' CPU budget, then scored in-domain
(the fold's novel classes, fixed test lists) and cross-domain (every `data.targets` list, PATNet protocol).

Run after the data stages (`dvc repro episodes`, or `fssmeta synthesize && fssmeta prepare && fssmeta
episodes`): `.venv/bin/python benchmarks/ablation.py [--fold 0] [--shots 1 5] [--variants bam flagship]`.
Writes `benchmarks/results/ablation.json` after every variant (an interrupted run keeps what it finished)
and prints the table; the report stage renders that file into report.md.
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

from fssmeta.config import Config
from fssmeta.data.io import read_json, write_json_atomic
from fssmeta.evaluation import evaluate_method, evaluate_targets
from fssmeta.params import load_config
from fssmeta.report import ABLATION_VARIANTS, ablation_markdown
from fssmeta.runs import base_dir
from fssmeta.stages import train_base, train_meta

RESULTS = Path(__file__).parent / "results" / "ablation.json"


def variant_config(cfg: Config, variant: str, workdir: Path) -> Config:
    """The params of one ablation row, with its own run and result folders."""
    model = cfg.model.model_copy(update=ABLATION_VARIANTS[variant](cfg.model))
    return cfg.model_copy(update={
        "model": model,
        "train": cfg.train.model_copy(update={"out": str(workdir / variant / "runs")}),
        "eval": cfg.eval.model_copy(update={"out": str(workdir / variant / "results")}),
    })


def run_variant(cfg: Config, fold: int, shots: list[int], base: Path) -> dict[str, Any]:
    """Train the variant at every shot (from the shared stage-1 base learner) and score it."""
    target = base_dir(cfg, fold)
    if not (target / "last.pt").is_file():
        shutil.copytree(base, target, dirs_exist_ok=True)
    seconds: dict[str, float] = {}
    for shot in shots:
        run = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fold": fold, "shot": shot})})
        start = time.perf_counter()
        train_meta(run, fold, progress=False, resume_run=False)
        seconds[f"train_{shot}shot"] = time.perf_counter() - start
    scored = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"folds": (fold,), "shots": tuple(shots)})})
    start = time.perf_counter()
    in_domain = evaluate_method(scored, progress=False)
    seconds["eval_in_domain"] = time.perf_counter() - start
    entry: dict[str, Any] = {
        "in_domain": {f"{s}shot": {"miou": in_domain["results"][f"fold{fold}"][f"{s}shot"]["miou_mean"],
                                   "std": in_domain["results"][f"fold{fold}"][f"{s}shot"]["miou_std"]}
                      for s in shots},
        "seconds": seconds,
    }
    if cfg.data.targets:
        start = time.perf_counter()
        cross = evaluate_targets(scored, fold=fold, progress=False)
        seconds["eval_targets"] = time.perf_counter() - start
        entry["targets"] = {name: {shot: {"miou": r["miou_mean"], "std": r["miou_std"]} for shot, r in per.items()}
                            for name, per in cross["results"].items()}
        entry["targets_mean"] = cross["mean_over_targets"]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS))
    parser.add_argument("--workdir", default="runs/ablation", help="checkpoints and per-variant results")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--variant-set", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                        help="params override for one variant (recorded in the results), e.g. ntrenet:train.epochs=15")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"machine: {machine}")
    cfg = load_config(args.params, args.set)
    workdir = Path(args.workdir)
    out = Path(args.out)
    results = read_json(out, "ablation results") if out.is_file() else {}
    results.update({"machine": machine, "source_fold": args.fold, "shots": args.shots,
                    "test_seeds": list(cfg.episodes.test_seeds), "episodes_per_list": cfg.eval.episodes,
                    "train": {"epochs": cfg.train.epochs, "episodes_per_epoch": cfg.train.episodes_per_epoch,
                              "batch_size": cfg.train.batch_size}})
    results.setdefault("variants", {})

    # One stage-1 base learner for every variant (base_dir follows train.out).
    base_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"out": str(workdir / "base")})})
    base = base_dir(base_cfg, args.fold)
    if not (base / "last.pt").is_file():
        start = time.perf_counter()
        train_base(base_cfg, args.fold, progress=False, resume_run=False)
        print(f"base learner fold {args.fold}: {time.perf_counter() - start:.0f} s")
    overrides: dict[str, list[str]] = {}
    for item in args.variant_set:
        variant, _, assignment = item.partition(":")
        if variant not in ABLATION_VARIANTS or "=" not in assignment:
            parser.error(f"--variant-set {item!r}: expected VARIANT:KEY=VALUE with VARIANT in {list(ABLATION_VARIANTS)}")
        overrides.setdefault(variant, []).append(assignment)
    for variant in args.variants:
        start = time.perf_counter()
        variant_cfg = load_config(args.params, [*args.set, *overrides.get(variant, [])])
        entry = run_variant(variant_config(variant_cfg, variant, workdir), args.fold, args.shots, base)
        results["variants"][variant] = {**entry, "overrides": overrides.get(variant, [])}
        write_json_atomic(out, results)
        print(f"{variant}: done in {time.perf_counter() - start:.0f} s")
    print(ablation_markdown(results))


if __name__ == "__main__":
    main()
