"""CRNet on the synthetic benchmark (docs/results.md, "CRNet"): trained 1-shot on one source fold, scored at 1
and 5 shots in-domain and cross-domain (the fold's model on every `data.targets` list), under regime `none`
and under `finetune` (its k-shot inference, fssmeta/adaptation.py), with the non-learned baseline beside and
the seconds per episode of each; the fine-tuning's cost per 5-shot episode is finetune's minus none's.

Run after the data stages: `.venv/bin/python benchmarks/crnet.py [--fold 0] [--base runs/<x>/base/fold0/base]
[--set KEY=VALUE]`. `--base` copies a stage-1 fold folder; without it stage 1 is trained first. The JSON
(`benchmarks/results/crnet.json`) is rewritten after every row, so a stopped run keeps what it measured;
`--resume` keeps those rows (and a trained checkpoint) and measures only the missing ones. Set
`eval.finetune.steps` beside any other `eval.finetune` key: a partly set section takes `TTAConfig`'s 20 steps,
not the regime's 10. docs/results.md ("CRNet") has the command of the recorded rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fssmeta.config import Config
from fssmeta.cross_domain import evaluate_targets
from fssmeta.data.io import write_json_atomic
from fssmeta.evaluation import evaluate_method
from fssmeta.params import load_config
from fssmeta.runs import base_dir, meta_dir
from fssmeta.stages import train_base, train_meta

RESULTS = Path(__file__).parent / "results" / "crnet.json"
# (method, regime, episodes per list: "eval" = eval.episodes, "finetune" = eval.finetune.episodes) in the order
# measured, the cheap rows first so that a stopped run has them; the last two score regime none on the
# finetune rows' (fewer) episodes, so that the regimes are compared on the same episodes.
ROWS = (("crnet", "none", "eval"), ("baseline", "none", "eval"), ("crnet", "finetune", "finetune"),
        ("crnet", "none", "finetune"), ("baseline", "none", "finetune"))


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def episodes_per_list(cfg: Config, budget: str) -> int:
    """Episodes scored per list under a row's budget ("eval" or "finetune"); 0 = the whole list."""
    return (cfg.eval.finetune.episodes or cfg.eval.episodes) if budget == "finetune" else cfg.eval.episodes


def measure(cfg: Config, method: str, regime: str, shot: int, fold: int, episodes: int) -> dict[str, Any]:
    """One row: `method` under `regime` at `shot` on the first `episodes` of every list (0 = all), in-domain
    (fold `fold`'s novel classes) and cross-domain."""
    scored = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"shots": (shot,), "episodes": episodes})})
    report, in_secs = timed(evaluate_method, scored, method, progress=False, regime=regime)
    cross, out_secs = timed(evaluate_targets, scored, method, fold=fold, shot=shot, progress=False, regime=regime)
    per_list = report["protocol"]["episodes_per_list"]
    in_episodes = per_list * len(cfg.episodes.test_seeds)
    out_episodes = sum(s["episodes"] for r in cross["results"].values() for s in r[f"{shot}shot"]["seeds"])
    return {"method": method, "regime": regime, "shot": shot, "episodes_per_list": per_list,
            "in_domain": report["mean"][f"{shot}shot"]["miou"],
            "targets": {n: r[f"{shot}shot"]["miou_mean"] for n, r in cross["results"].items()},
            "cross_domain_mean": cross["mean_over_targets"][f"{shot}shot"],
            "seconds_per_episode": {"in_domain": in_secs / in_episodes, "cross_domain": out_secs / out_episodes}}


def finetune_cost(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Seconds the fine-tuning adds per 5-shot episode: crnet's finetune row minus its none row on the same
    episodes."""
    tuned = [r for r in rows if r["method"] == "crnet" and r["shot"] == 5 and r["regime"] == "finetune"]
    same = [r for r in rows if r["method"] == "crnet" and r["shot"] == 5 and r["regime"] == "none"
            and tuned and r["episodes_per_list"] == tuned[0]["episodes_per_list"]]
    if not same:
        return None
    by_regime = {"finetune": tuned[0], "none": same[0]}
    return {d: by_regime["finetune"]["seconds_per_episode"][d] - by_regime["none"]["seconds_per_episode"][d]
            for d in ("in_domain", "cross_domain")}


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':10}{'regime':10}{'shot':>5}{'eps/list':>9}{'in-domain':>11}{'targets':>9}{'s/ep in':>9}"
          f"{'s/ep out':>9}")
    for row in rows:
        print(f"{row['method']:10}{row['regime']:10}{row['shot']:>5}{row['episodes_per_list']:>9}"
              f"{100 * row['in_domain']:>11.1f}{100 * row['cross_domain_mean']:>9.1f}"
              f"{row['seconds_per_episode']['in_domain']:>9.3f}{row['seconds_per_episode']['cross_domain']:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--workdir", default="runs/crnet-benchmark")
    parser.add_argument("--base", help="a stage-1 fold folder to copy (e.g. runs/ablation14/base/fold0/base)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true", help="keep --out's rows and the workdir's checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    args = parser.parse_args()
    workdir, out = Path(args.workdir), Path(args.out)
    overrides = ["model.method=crnet", "model.memory.enabled=false", "model.mining.enabled=false",
                 "mlflow.enabled=false", f"train.out={workdir / 'runs'}", f"train_base.out={workdir / 'runs'}",
                 f"eval.out={workdir / 'results'}",
                 f"eval.folds=[{args.fold}]", f"train.fold={args.fold}", "train.shot=1", *args.set]
    cfg = load_config(args.params, overrides)
    previous = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    results: dict[str, Any] = {
        "machine": (f"{platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
                    f"torch {torch.__version__}"),
        "fold": args.fold, "overrides": overrides, "seconds": previous.get("seconds", {}),
        "finetune": cfg.eval.finetune.model_dump(mode="json"), "test_seeds": list(cfg.episodes.test_seeds),
        "train": {"epochs": cfg.train.epochs, "episodes_per_epoch": cfg.train.episodes_per_epoch,
                  "batch_size": cfg.train.batch_size},
        "rows": previous.get("rows", [])}
    base = base_dir(cfg, args.fold)
    if args.base and not (base / "last.pt").is_file():
        shutil.copytree(args.base, base, dirs_exist_ok=True)
    if not (base / "last.pt").is_file():
        _, results["seconds"]["train_base"] = timed(train_base, cfg, args.fold, progress=False, resume_run=False)
    run = meta_dir(cfg, args.fold, 1)
    if not (args.resume and (run / "best.pt").is_file()):
        _, results["seconds"]["train_1shot"] = timed(train_meta, cfg, args.fold, progress=False, resume_run=False)
    results["validation_miou"] = [h.get("val_miou") for h in json.loads((run / "history.json").read_text())["history"]]
    write_json_atomic(out, results)

    done = {(r["method"], r["regime"], r["shot"], r["episodes_per_list"]) for r in results["rows"]}
    for method, regime, budget in ROWS:
        episodes = episodes_per_list(cfg, budget)
        for shot in args.shots:
            if (method, regime, shot, episodes or "all") in done:
                continue
            done.add((method, regime, shot, episodes or "all"))
            results["rows"].append(measure(cfg, method, regime, shot, args.fold, episodes))
            results["finetune_seconds_per_5shot_episode"] = finetune_cost(results["rows"])
            write_json_atomic(out, results)  # after every row: a stopped run keeps what it measured
            print(results["rows"][-1], flush=True)
    print_rows(results["rows"])
    print(f"fine-tuning cost per 5-shot episode (s): {results['finetune_seconds_per_5shot_episode']}")


if __name__ == "__main__":
    main()
