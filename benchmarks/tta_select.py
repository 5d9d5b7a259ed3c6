"""Choose the `tta` regime's settings on the targets' SELECTION lists, never their test lists.

Scores trained models (the ablation's checkpoints: `<workdir>/<variant>/seed<k>/runs`) on every
`data.targets` selection list (`targets/<name>/val_<shot>shot_seed<s>.json`, drawn from images the test lists
never use; docs/protocol.md section 5) under each candidate `eval.tta` setting, and regime none beside them.
The setting with the best mean over targets, shots and training seeds is the one to put in params.yaml; the
test lists then score it once (`benchmarks/ablation.py --regimes tta`).

`.venv/bin/python benchmarks/tta_select.py --workdir runs/ablation_s4/flag --variant flagship --seeds 0 1 2
--episodes 40 --candidate steps=20,lr=1e-3 --candidate steps=5,lr=1e-3 ... --out tta_select.json`
A candidate is `key=value,...` over `eval.tta` (steps, lr, optimizer, modules as a+b+c, blend), and
`regime=finetune` for the finetune regime's views with those settings. Results are
written after every (seed, shot, candidate), and a rerun skips what the file already has.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from ablation import variant_config  # benchmarks/ is the script's folder, so on sys.path

from fssmeta.adaptation import with_regime
from fssmeta.cross_domain import target_selection_scores
from fssmeta.data.io import read_json, write_json_atomic
from fssmeta.params import load_config, parse_value, with_overrides
from fssmeta.runs import evaluation_model


def parse_candidate(text: str) -> dict[str, Any]:
    """`steps=20,lr=1e-3,modules=a+b` -> the settings it names, parsed as params.yaml values would be;
    `none` = regime none."""
    if text == "none":
        return {}
    update: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--candidate {text!r}: {item!r} is not key=value")
        update[key] = [m for m in value.split("+") if m] if key == "modules" else parse_value(value)
    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workdir", required=True, help="the ablation's --workdir holding <variant>/seed<k>/runs")
    parser.add_argument("--variant", default="flagship")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--episodes", type=int, default=40, help="episodes per selection list")
    parser.add_argument("--candidate", action="append", default=[], help="eval.tta settings, key=value,...; `none`")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="tta_select.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.params, args.set)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"episodes": args.episodes})})
    out = Path(args.out)
    results: dict[str, Any] = read_json(out, "tta selection") if out.is_file() else {"runs": {}}
    results.update({"fold": args.fold, "episodes_per_list": args.episodes, "val_seeds": list(cfg.episodes.val_seeds),
                    "variant": args.variant, "overrides": args.set})
    for seed in args.seeds:
        run_cfg = variant_config(cfg, args.variant, Path(args.workdir), seed)
        for shot in args.shots:
            model = evaluation_model(run_cfg, args.fold, shot, run_cfg.model.method, torch.device("cpu"))
            for text in args.candidate:
                key = f"{text}|seed{seed}|{shot}shot"
                if key in results["runs"]:
                    continue
                update = parse_candidate(text)
                regime = update.pop("regime", "tta" if update else "none")
                settings = with_overrides(run_cfg, {f"eval.tta.{k}": v for k, v in update.items()},
                                          f"--candidate {text}").eval.tta  # checked: a typo is an error
                scored = with_regime(model, regime, settings)
                start = time.perf_counter()
                per_target = {name: statistics.fmean(s["miou"] for s in target_selection_scores(
                    run_cfg, scored, name, shot, False, name, fold=args.fold)) for name in sorted(cfg.data.targets)}
                results["runs"][key] = {"candidate": text, "seed": seed, "shot": shot, "targets": per_target,
                                        "mean": statistics.fmean(per_target.values()),
                                        "seconds": time.perf_counter() - start}
                write_json_atomic(out, results)
                print(f"{key}: " + " ".join(f"{n} {100 * v:.1f}" for n, v in per_target.items())
                      + f" mean {100 * results['runs'][key]['mean']:.1f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    print("\ncandidate: mean over targets, per shot (mean over seeds), and over both")
    for text in args.candidate:
        rows = [r for r in results["runs"].values() if r["candidate"] == text]
        per_shot = {s: statistics.fmean(r["mean"] for r in rows if r["shot"] == s) for s in args.shots
                    if any(r["shot"] == s for r in rows)}
        print(f"{text:<40}" + "".join(f" {s}-shot {100 * v:5.1f}" for s, v in per_shot.items())
              + f"  both {100 * statistics.fmean(per_shot.values()):5.1f}")


if __name__ == "__main__":
    main()
