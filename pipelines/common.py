"""What every stage entry point shares: `--params FILE` and `--set key=value` into a typed Config, and `run`,
which times the stage into `<report.out>/stages/` for the report's "Where `dvc repro` spent its time"."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from fssmeta.config import Config
from fssmeta.data.folds import ALL, Split
from fssmeta.data.io import write_json_atomic
from fssmeta.params import load_config


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


def config(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.set)


def skip_unused_all(cfg: Config, fold: Split, out: Path) -> bool:
    """The all-classes source stages train only under `eval.target_source: all`; otherwise they write
    `skipped.json` into their output folder `out` (DVC wants it to exist) and the stage does nothing."""
    if fold != ALL or cfg.eval.target_source == ALL:
        return False
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "skipped.json", {"reason": f"eval.target_source is {cfg.eval.target_source}, not all: "
                                                       "no all-classes source model is needed"})
    print(f"{out}: skipped (eval.target_source {cfg.eval.target_source}; the fold models are the cross-domain source)")
    return True


def stage_name(path: str, argv: list[str]) -> str:
    """pipelines/train_meta.py with `--fold 0 --shot 1` -> "train_meta fold 0 shot 1" (DVC's foreach and
    matrix stages differ only in these arguments)."""
    parts, i = [Path(path).stem], 0
    while i < len(argv):
        if argv[i] in ("--fold", "--shot") and i + 1 < len(argv):
            parts += [argv[i].lstrip("-"), argv[i + 1]]
            i += 1
        i += 1
    return " ".join(parts)


def run(main: Callable[[], None], path: str) -> None:
    """Run the stage `main` of file `path` and record how long it took (a stage that fails records nothing)."""
    start = time.perf_counter()
    main()
    cfg = config(parser(None).parse_known_args()[0])  # the stage's own --params / --set: where report.out is
    name = stage_name(path, sys.argv[1:])
    write_json_atomic(Path(cfg.report.out) / "stages" / f"{name.replace(' ', '_')}.json",
                      {"stage": name, "seconds": round(time.perf_counter() - start, 1),
                       "finished": datetime.now(UTC).isoformat(timespec="seconds")})
