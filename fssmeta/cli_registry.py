"""`fssmeta register` and `fssmeta promote`: the MLflow registry commands (their parsers are in fssmeta/cli.py)."""

from __future__ import annotations

import argparse
import sys

from fssmeta.params import config_from_args


def cmd_register(args: argparse.Namespace) -> int:
    from fssmeta.data.io import read_json

    if args.name:
        args.set = [*args.set, f"mlflow.registered_model={args.name}"]
    cfg = config_from_args(args)
    metrics = read_json(args.metrics, "metrics file") if args.metrics else {}
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in metrics.values()):
        raise ValueError(f"--metrics {args.metrics}: expected a JSON object of metric names to numbers")
    from fssmeta.integrations.registry import register_checkpoint

    info = register_checkpoint(cfg, args.checkpoint, metrics=metrics)
    state = "registered" if info["created"] else "already registered"
    print(f"{args.checkpoint}: {info['model_uri']} {state} (run {info['run_id']})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from fssmeta.integrations.promotion import PromotionRefused, promote, rollback, score_version

    cfg = config_from_args(args)
    name = args.model or cfg.mlflow.registered_model
    try:
        if args.rollback:
            print(f"{name}@champion-{args.domain} -> version {rollback(cfg, domain=args.domain, name=name)} (rolled back)")
            return 0
        version = args.version
        if version is None:
            from fssmeta.integrations.mlflow import _mlflow, resolve_tracking_uri

            client = _mlflow().MlflowClient(tracking_uri=resolve_tracking_uri(cfg.mlflow))
            version = str(max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
        decision = promote(cfg, domain=args.domain, version=version, name=name,
                           score=lambda v: score_version(cfg, version=v, domain=args.domain, name=name))
    except PromotionRefused as exc:
        print(f"fssmeta promote: refused: {exc}", file=sys.stderr)
        return 3
    verdict = "promoted" if decision.promoted else "not promoted"
    champion = "-" if decision.champion_score is None else f"{decision.champion_score:.4f}"
    print(f"{name} version {decision.challenger} on {args.domain}: {verdict} ({decision.reason}); challenger "
          f"{decision.challenger_score:.4f}, champion version {decision.champion or '-'} {champion}")
    return 0
