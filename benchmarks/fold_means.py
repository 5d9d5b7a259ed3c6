"""Means over source folds of `benchmarks/ablation.py` results: one table row per (variant, regime, shot) with
the in-domain and cross-domain mIoU of every fold and their mean, and each target's mean over the folds.

    .venv/bin/python benchmarks/fold_means.py benchmarks/results/methods17.json \\
        benchmarks/results/methods17_fold{1,2,3}.json benchmarks/results/methods17_tta_*_fold*.json \\
        benchmarks/results/ablation.json --variants hdmnet sccan baseline

Each file is one fold's `ablation.py --out` (its `source_fold`). A (variant, fold) may come from several files
(e.g. `--score-only --regimes tta` into a file of its own): their regimes are merged, a later file's replacing
an earlier one's, and the in-domain score is the first file's. A regime's scores are the mean over the
variant's training seeds in that file. A row whose regime was scored under different `tta` settings on
different folds is refused (the settings are printed), so a mean never mixes protocols. The non-learned
baseline is a row of its own when the files hold it. `--fscs` prints the FS-CS table instead (the runs scored
on N-way lists, `episodes.ways` > 1): ER and mIoU per fold and their means; with `--lists DIR` (the runs'
`episodes.out`) also the all-background reference, whose ER is the share of scored episodes with no way present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fssmeta.data.episode_lists import load_episode_list
from fssmeta.data.ways import way_list_path


def fold_entries(paths: list[Path]) -> dict[tuple[str, int], dict[str, Any]]:
    """(variant, fold) -> {"in_domain": {shot: score}, "targets": {regime: {target: {shot: score}}},
    "tta": {regime: settings}}, each score the mean over the file's training seeds."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        fold = int(results["source_fold"])
        variants = {name: (v.get("runs", {}), v.get("tta") or results.get("tta"))
                    for name, v in results.get("variants", {}).items()}
        if results.get("baseline"):
            variants["baseline"] = ({"-": results["baseline"]}, None)
        for name, (runs, tta) in variants.items():
            if not runs:
                continue
            entry = merged.setdefault((name, fold), {"in_domain": {}, "targets": {}, "tta": {}, "fscs": {}})
            shots = {shot for run in runs.values() for shot in run.get("in_domain", {})}
            for shot in shots:
                entry["in_domain"].setdefault(shot, statistics.fmean(run["in_domain"][shot] for run in runs.values()))
            for shot in {shot for run in runs.values() for shot in run.get("fscs", {})}:
                scored = [run["fscs"][shot] for run in runs.values() if shot in run.get("fscs", {})]
                entry["fscs"].setdefault(shot, {"ways": scored[0]["ways"],
                                                "er": statistics.fmean(s["er_mean"] for s in scored),
                                                "miou": statistics.fmean(s["miou_mean"] for s in scored)})
            regimes = {regime for run in runs.values() for regime in run.get("targets", {})}
            for regime in regimes:
                per_target: dict[str, dict[str, float]] = {}
                for target in {t for run in runs.values() for t in run["targets"].get(regime, {})}:
                    scores = [run["targets"][regime][target] for run in runs.values()]
                    per_target[target] = {shot: statistics.fmean(s[shot] for s in scores) for shot in scores[0]}
                entry["targets"][regime] = per_target
                entry["tta"][regime] = tta if regime == "tta" else None
    return merged


def table(merged: dict[tuple[str, int], dict[str, Any]], regimes: list[str], variants: list[str] | None = None) -> str:
    """The markdown table; in-domain is scored under `none` only (shown on its rows)."""
    folds = sorted({fold for _, fold in merged})
    variants = variants or list(dict.fromkeys(name for name, _ in merged))
    lines = ["| method | regime | shot | in-domain " + " / ".join(f"f{f}" for f in folds) + " | **mean** | "
             "cross-domain " + " / ".join(f"f{f}" for f in folds) + " | **mean** | per target (fold mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in variants:
        for regime in regimes:
            entries = {f: merged.get((name, f)) for f in folds}
            if not any(e and regime in e["targets"] for e in entries.values()):
                continue
            settings = {json.dumps(e["tta"][regime], sort_keys=True) for e in entries.values() if e and regime in e["tta"]}
            if len(settings) > 1:
                sys.exit(f"{name} {regime}: scored under different settings on different folds: {sorted(settings)}")
            shots = sorted({s for e in entries.values() if e for s in e["in_domain"]}, key=lambda s: int(s[:-4]))
            for shot in shots:
                ind = [e["in_domain"].get(shot) if e and regime == "none" else None for e in entries.values()]
                cross, per_target = [], {}
                for e in entries.values():
                    scored = (e or {}).get("targets", {}).get(regime, {})
                    values = [scored[t][shot] for t in sorted(scored) if shot in scored[t]]
                    cross.append(statistics.fmean(values) if values else None)
                    for t in scored:
                        per_target.setdefault(t, []).append(scored[t][shot])
                complete = all(v is not None for v in cross)
                lines.append(
                    f"| {name} | {regime} | {shot[:-4]} | " + " / ".join(_pct(v) for v in ind)
                    + f" | **{_pct(_mean(ind)) if all(v is not None for v in ind) and regime == 'none' else '—'}** | "
                    + " / ".join(_pct(v) for v in cross) + f" | **{_pct(_mean(cross)) if complete else '—'}** | "
                    + ", ".join(f"{t} {_pct(statistics.fmean(v))}" + ("" if len(v) == len(folds) else f" ({len(v)} of {len(folds)} folds)")
                                for t, v in sorted(per_target.items())) + " |")
    return "\n".join(lines) + "\n"


def fscs_table(merged: dict[tuple[str, int], dict[str, Any]], variants: list[str] | None = None) -> str:
    """The FS-CS markdown table: per (variant, ways, shot) the ER and the FS-CS mIoU of every fold, their means."""
    folds = sorted({fold for _, fold in merged})
    variants = variants or list(dict.fromkeys(name for name, _ in merged))
    per_fold = " / ".join(f"f{f}" for f in folds)
    lines = [f"| method | ways | shot | ER {per_fold} | **mean** | mIoU {per_fold} | **mean** |",
             "|---|---|---|---|---|---|---|"]
    for name in variants:
        entries = [(merged.get((name, f)) or {}).get("fscs", {}) for f in folds]
        for shot in sorted({s for e in entries for s in e}, key=lambda s: int(s[:-4])):
            scored = [e.get(shot) for e in entries]
            ways = {s["ways"] for s in scored if s}
            if len(ways) > 1:
                sys.exit(f"{name} {shot}: scored at different ways on different folds: {sorted(ways)}")
            cells = []
            for key in ("er", "miou"):
                values = [s[key] if s else None for s in scored]
                cells.append(" / ".join(_pct(v) for v in values) + " | **"
                             + (_pct(_mean(values)) if all(v is not None for v in values) else "—") + "**")
            lines.append(f"| {name} | {ways.pop()} | {shot[:-4]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def all_background(paths: list[Path], lists: Path, order: str = "image") -> dict[tuple[str, int], dict[str, Any]]:
    """The FS-CS reference every trained row should beat, as `fold_entries` rows named "all background": per
    fold and (ways, shot) scored there, the ER of predicting background everywhere = the share of the scored
    episodes (the first `episodes_per_list` of each test seed's N-way list under `lists`, an `episodes.out`
    folder) in which no way's class is in the query; its FS-CS mIoU is 0 (no foreground class is hit)."""
    reference: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        fold, count = int(results["source_fold"]), results["episodes_per_list"] or None
        scored = {(shot, run["fscs"][shot]["ways"]) for v in results.get("variants", {}).values()
                  for run in v.get("runs", {}).values() for shot in run.get("fscs", {})}
        entry = reference.setdefault(("all background", fold), {"fscs": {}})
        for shot, ways in scored:
            shares = []
            for seed in results["test_seeds"]:
                listed = way_list_path(lists, fold, "test", ways, int(shot[:-4]), order, seed)
                if not listed.is_file():
                    sys.exit(f"{listed}: no such N-way list (--lists is the runs' episodes.out folder)")
                episodes = load_episode_list(listed)["episodes"][:count]
                shares.append(statistics.fmean(not any(ep["presence"]) for ep in episodes))
            entry["fscs"][shot] = {"ways": ways, "er": statistics.fmean(shares), "miou": 0.0}
    return reference


def _mean(values: list[float | None]) -> float:
    return statistics.fmean(v for v in values if v is not None)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="ablation.py results files, one fold each")
    parser.add_argument("--regimes", nargs="+", default=["none", "tta"])
    parser.add_argument("--variants", nargs="+", help="these rows only, in this order (default: all, as found)")
    parser.add_argument("--fscs", action="store_true", help="the FS-CS table (ER and mIoU on the N-way lists)")
    parser.add_argument("--lists", type=Path, help="with --fscs: the runs' episodes.out folder; adds the "
                        "all-background reference row (its ER: the share of scored episodes with no way present)")
    parser.add_argument("--order", default="image", choices=["image", "class"],
                        help="with --lists: the runs' eval.episode_order (which lists they scored)")
    args = parser.parse_args()
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        sys.exit(f"no such results file: {', '.join(missing)}")
    merged = fold_entries(args.files)
    if args.fscs and args.lists:
        merged.update(all_background(args.files, args.lists, args.order))
    print(fscs_table(merged, args.variants) if args.fscs else table(merged, args.regimes, args.variants), end="")


if __name__ == "__main__":
    main()
