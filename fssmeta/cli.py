"""`fssmeta ...` subcommands: show-config, folds, synthesize, prepare, episodes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from fssmeta.config import Config, ConfigError, config_to_dict, load_config
from fssmeta.data.io import DataError


def _config(args: argparse.Namespace) -> Config:
    # `--params none` (or no params.yaml in the working folder) runs on the embedded defaults
    default_missing = args.params == "params.yaml" and not Path(args.params).is_file()
    params = None if args.params.lower() in ("", "none") or default_missing else args.params
    return load_config(params, args.set)


def cmd_show_config(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(config_to_dict(_config(args)), sort_keys=False), end="")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    from fssmeta.data.folds import class_names, fold_classes

    split = fold_classes(args.dataset, args.fold, args.coco_split)
    if args.json:
        print(json.dumps(split))
        return 0
    names = class_names(args.dataset)
    for part in ("novel", "base"):
        print(f"{part} ({len(split[part])}): " + ", ".join(f"{c} {names[c - 1]}" for c in split[part]))
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from fssmeta.data.synthetic import synthesize

    cfg = _config(args).synthesize
    if args.seed is not None:
        cfg = cfg.model_copy(update={"seed": args.seed})
    out = args.out or cfg.out
    start = time.perf_counter()
    summary = synthesize(cfg, out=out, progress=not args.quiet)
    print(f"synthetic dataset at {out} ({time.perf_counter() - start:.1f} s): "
          + json.dumps(summary.get("counts", {}), sort_keys=True))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from fssmeta.data.prepare import prepare

    cfg = _config(args).data
    start = time.perf_counter()
    summary = prepare(cfg, out=args.out, progress=not args.quiet)
    print(f"indexed {cfg.dataset} ({cfg.root}) into {args.out or cfg.prepared} in {time.perf_counter() - start:.1f} s")
    print("  pools: " + ", ".join(f"{k} {v}" for k, v in summary["pools"].items()))
    for fold, counts in summary["folds"].items():
        print(f"  fold {fold}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_episodes(args: argparse.Namespace) -> int:
    from fssmeta.data.episode_lists import write_episode_lists

    cfg = _config(args)
    manifest = write_episode_lists(cfg.data, cfg.episodes, out=args.out, progress=not args.quiet)
    files = manifest["files"]
    total = sum(f["episodes"] for f in files)
    print(f"wrote {len(files)} episode lists ({total} episodes) to {args.out or cfg.episodes.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fssmeta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml if present; `none` = embedded defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.root=/x")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    add("show-config", cmd_show_config, "print the resolved configuration")
    p = add("folds", cmd_folds, "print a fold's novel and base class ids")
    p.add_argument("--dataset", required=True, choices=["pascal", "coco", "synthetic"])
    p.add_argument("--coco-split", default="interleaved", choices=["interleaved", "consecutive"])
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--json", action="store_true")
    p = add("synthesize", cmd_synthesize, "generate the synthetic few-shot dataset (VOC + COCO + targets)")
    p.add_argument("--out", help="output folder (default: synthesize.out)")
    p.add_argument("--seed", type=int, help="seed (default: synthesize.seed)")
    p = add("prepare", cmd_prepare, "validate and index the configured dataset into per-fold lists")
    p.add_argument("--out", help="output folder (default: data.prepared)")
    p = add("episodes", cmd_episodes, "write the fixed test and validation episode lists")
    p.add_argument("--out", help="output folder (default: episodes.out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"fssmeta {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
