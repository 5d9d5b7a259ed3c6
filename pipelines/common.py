"""What every stage entry point shares: `--params FILE` and `--set key=value` into a typed Config."""

from __future__ import annotations

import argparse

from fssmeta.config import Config
from fssmeta.params import load_config


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


def config(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.set)
