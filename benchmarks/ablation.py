"""The flagship ablation on the synthetic benchmark: BAM, BAM + memory, BAM + mining, the flagship (both) and
NTRENet, each trained on one source fold at 1 and 5 shots with the params' CPU budget, once per TRAINING seed
(`train.seed`), then scored in-domain (the fold's novel classes, fixed test lists, regime none) and
cross-domain (every `data.targets` list, PATNet protocol) under each regime (`none`, `tta`). The non-learned
baseline on the same stage 1 is scored beside them.

Run after the data stages (`dvc repro episodes`, or `fssmeta synthesize && fssmeta prepare && fssmeta
episodes`):
`.venv/bin/python benchmarks/ablation.py [--fold 0] [--shots 1 5] [--seeds 0 1 2] [--regimes none tta]
[--variants bam flagship] [--set KEY=VALUE]`.
Writes `benchmarks/results/ablation.json` after every (variant, seed) (an interrupted run keeps what it
finished; a rerun skips the runs already there unless `--redo`) and prints the table; the report stage
renders that file (mean ± std over the training seeds, one row per regime) with a per-target bar plot.
One stage-1 base learner serves every variant and seed: the seeds are those of meta-training.
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
from fssmeta.cross_domain import evaluate_targets
from fssmeta.data.io import read_json, write_json_atomic
from fssmeta.evaluation import evaluate_method
from fssmeta.models import get_method
from fssmeta.params import load_config
from fssmeta.report import ABLATION_VARIANTS, ablation_markdown
from fssmeta.runs import base_dir
from fssmeta.stages import train_base, train_meta

RESULTS = Path(__file__).parent / "results" / "ablation.json"


def variant_config(cfg: Config, variant: str, workdir: Path, seed: int) -> Config:
    """The params of one ablation run (variant, training seed), with its own run and result folders."""
    model = cfg.model.model_copy(update=ABLATION_VARIANTS[variant](cfg.model))
    here = workdir / variant / f"seed{seed}"
    return cfg.model_copy(update={
        "model": model,
        "train": cfg.train.model_copy(update={"out": str(here / "runs"), "seed": seed}),
        "train_base": cfg.train_base.model_copy(update={"out": str(here / "runs")}),
        "eval": cfg.eval.model_copy(update={"out": str(here / "results")}),
    })


def scores(cfg: Config, fold: int, shots: list[int], regimes: list[str], method: str | None = None,
           seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """In-domain (regime none) and per-regime cross-domain mIoU (each the mean over test seeds)."""
    seconds = {} if seconds is None else seconds
    scored = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"folds": (fold,), "shots": tuple(shots)})})
    start = time.perf_counter()
    in_domain = evaluate_method(scored, method, progress=False, regime="none")
    seconds["eval_in_domain"] = time.perf_counter() - start
    per_shot = in_domain["results"][f"fold{fold}"]
    entry: dict[str, Any] = {"in_domain": {f"{s}shot": per_shot[f"{s}shot"]["miou_mean"] for s in shots},
                             "targets": {}, "seconds": seconds}
    fscs = {f"{s}shot": {k: per_shot[f"{s}shot"]["fscs"][k] for k in ("ways", "er_mean", "miou_mean")}
            for s in shots if "fscs" in per_shot[f"{s}shot"]}  # N-way lists (episodes.ways > 1): ER and mIoU
    if fscs:
        entry["fscs"] = fscs
    for regime in regimes if cfg.data.targets else []:
        start = time.perf_counter()
        cross = evaluate_targets(scored, method, fold=fold, progress=False, regime=regime)
        seconds[f"eval_targets_{regime}"] = time.perf_counter() - start
        entry["targets"][regime] = {name: {shot: r["miou_mean"] for shot, r in per.items()}
                                    for name, per in cross["results"].items()}
    return entry


def run_variant(cfg: Config, fold: int, shots: list[int], regimes: list[str], base: Path,
                score_only: bool = False) -> dict[str, Any]:
    """Train the variant at every shot (from the shared stage-1 base learner) and score it; `score_only`
    scores the checkpoints an earlier run of the same --workdir trained (e.g. under other test-time settings)."""
    target = base_dir(cfg, fold)
    if not (target / "last.pt").is_file():
        shutil.copytree(base, target, dirs_exist_ok=True)
    seconds: dict[str, float] = {}
    # A method trained 1-shot for every k (HSNet, ASNet) trains once.
    trained = [] if score_only else sorted({get_method(cfg.model.method).training_shot(s) for s in shots})
    for shot in trained:
        run = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fold": fold, "shot": shot})})
        start = time.perf_counter()
        train_meta(run, fold, progress=False, resume_run=False)
        seconds[f"train_{shot}shot"] = time.perf_counter() - start
    return scores(cfg, fold, shots, regimes, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (train.seed)")
    parser.add_argument("--regimes", nargs="+", default=["none", "tta"], choices=["none", "tta"],
                        help="cross-domain regimes (in-domain is scored under none)")
    parser.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS))
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-learned baseline row")
    parser.add_argument("--workdir", default="runs/ablation", help="checkpoints and per-run results")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--redo", action="store_true", help="rerun (variant, seed) runs already in --out")
    parser.add_argument("--score-only", action="store_true",
                        help="score the checkpoints already in --workdir (no training), e.g. under new eval.tta settings")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--variant-set", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                        help="params override for one variant (recorded in the results), e.g. ntrenet:train.epochs=15")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores ({args.threads} torch threads), torch "
               f"{torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"machine: {machine}")
    cfg = load_config(args.params, args.set)
    workdir = Path(args.workdir)
    out = Path(args.out)
    results = read_json(out, "ablation results") if out.is_file() else {}
    if results and "runs" not in next(iter(results.get("variants", {}).values()), {"runs": {}}):
        results = {}  # an earlier single-seed layout: start afresh (git keeps the old file)
    results.update({"machine": machine, "source_fold": args.fold, "shots": args.shots, "seeds": args.seeds,
                    "test_seeds": list(cfg.episodes.test_seeds), "episodes_per_list": cfg.eval.episodes,
                    "tta": cfg.eval.tta.model_dump(mode="json"), "overrides": args.set, "score_only": args.score_only,
                    "train": {"epochs": cfg.train.epochs, "episodes_per_epoch": cfg.train.episodes_per_epoch,
                              "batch_size": cfg.train.batch_size}})
    results.setdefault("variants", {})

    # One stage-1 base learner for every variant and seed (base_dir follows train_base.out).
    base_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"out": str(workdir / "base")}),
                                      "train_base": cfg.train_base.model_copy(update={"out": str(workdir / "base")}),
                                      "eval": cfg.eval.model_copy(update={"out": str(workdir / "base" / "results")})})
    base = base_dir(base_cfg, args.fold)
    if not (base / "last.pt").is_file():
        start = time.perf_counter()
        train_base(base_cfg, args.fold, progress=False, resume_run=False)
        print(f"base learner fold {args.fold}: {time.perf_counter() - start:.0f} s")
    if not args.no_baseline and (args.redo or "baseline" not in results):
        results["baseline"] = scores(base_cfg, args.fold, args.shots, ["none"], method="baseline")
        write_json_atomic(out, results)
    overrides: dict[str, list[str]] = {}
    for item in args.variant_set:
        variant, _, assignment = item.partition(":")
        if variant not in ABLATION_VARIANTS or "=" not in assignment:
            parser.error(f"--variant-set {item!r}: expected VARIANT:KEY=VALUE with VARIANT in {list(ABLATION_VARIANTS)}")
        overrides.setdefault(variant, []).append(assignment)
    for seed in args.seeds:  # seed-major: every variant has its first seed before any has its second
        for variant in args.variants:
            runs = results["variants"].setdefault(variant, {"runs": {}})["runs"]
            if str(seed) in runs and not args.redo:
                continue
            start = time.perf_counter()
            variant_cfg = load_config(args.params, [*args.set, *overrides.get(variant, [])])
            entry = run_variant(variant_config(variant_cfg, variant, workdir, seed), args.fold, args.shots,
                                args.regimes, base, args.score_only)
            runs[str(seed)] = entry
            results["variants"][variant]["overrides"] = overrides.get(variant, [])
            results["variants"][variant]["tta"] = variant_cfg.eval.tta.model_dump(mode="json")  # its tta rows' settings
            write_json_atomic(out, results)
            print(f"{variant} seed {seed}: done in {time.perf_counter() - start:.0f} s", flush=True)
    print(ablation_markdown(results))


if __name__ == "__main__":
    main()
