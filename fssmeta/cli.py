"""`fssmeta ...` subcommands: show-config, methods, folds, synthesize, prepare, episodes, train-base, tune, train, evaluate,
register, promote, predict."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from fssmeta.checkpoint import CheckpointError
from fssmeta.cli_registry import cmd_promote, cmd_register
from fssmeta.config import Config, ConfigError, config_to_dict
from fssmeta.data.io import DataError
from fssmeta.params import config_from_args


def cmd_show_config(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(config_to_dict(config_from_args(args)), sort_keys=False), end="")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from fssmeta.models import METHODS

    # The official conventions each record carries (docs/protocol.md section 6): recipe, BN, test canvas.
    print(f"{'method':10} {'stage 1':13} {'optimiser':14} {'BN':6} {'canvas':6} {'transform':9} {'trains':10} summary")
    for key, m in METHODS.items():
        stage1 = m.stage1.part if m.stage1 else "-"
        trains = "-" if not m.learned else ("each shot" if m.trains_each_shot else "1-shot")
        optimiser = f"{m.recipe.optimizer} {m.recipe.lr:g}" if m.learned else "-"
        print(f"{key:10} {stage1:13} {optimiser:14} {m.backbone_bn:6} {m.canvas:6} {m.transform:9} {trains:10} "
              f"{m.summary}")
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

    cfg = config_from_args(args).synthesize
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

    cfg = config_from_args(args).data
    start = time.perf_counter()
    summary = prepare(cfg, out=args.out, progress=not args.quiet)
    print(f"indexed {cfg.dataset} ({cfg.root}) into {args.out or cfg.prepared} in {time.perf_counter() - start:.1f} s")
    print("  pools: " + ", ".join(f"{k} {v}" for k, v in summary["pools"].items()))
    for fold, counts in summary["folds"].items():
        print(f"  fold {fold}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_episodes(args: argparse.Namespace) -> int:
    from fssmeta.data.episode_lists import write_episode_lists

    cfg = config_from_args(args)
    manifest = write_episode_lists(cfg.data, cfg.episodes, out=args.out, progress=not args.quiet)
    files = manifest["files"]
    total = sum(f["episodes"] for f in files)
    print(f"wrote {len(files)} episode lists ({total} episodes) to {args.out or cfg.episodes.out}")
    for warning in manifest["warnings"]:
        print(f"warning: {warning}")
    return 0


def split_arg(text: str) -> int | str:
    """`--fold`: a fold 0..3 or `all`, the all-classes source split (a usage error otherwise)."""
    from fssmeta.data.folds import parse_split

    try:
        return parse_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fold_override(args: argparse.Namespace, section: str) -> None:
    if getattr(args, "fold", None) is not None:
        args.set = [*args.set, f"{section}.fold={args.fold}"]
    if getattr(args, "shot", None) is not None:
        args.set = [*args.set, f"{section}.shot={args.shot}"]


def cmd_train_base(args: argparse.Namespace) -> int:
    from fssmeta.runs import base_dir
    from fssmeta.stages import train_base

    _fold_override(args, "train_base")
    cfg = config_from_args(args)
    fold = cfg.train_base.fold
    start = time.perf_counter()
    result = train_base(cfg, fold, progress=not args.quiet, resume_run=not args.restart)
    last = result.history[-1] if result.history else {}
    print(f"base learner fold {fold}: {len(result.history)} epochs, {result.step} steps in "
          f"{time.perf_counter() - start:.0f} s; final train loss {last.get('train_loss', float('nan')):.4f}; "
          f"checkpoints in {base_dir(cfg, fold)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from fssmeta.integrations.ray_tune import SweepError, main_summary, run_sweep

    try:
        result = run_sweep(config_from_args(args), progress=not args.quiet)
    except SweepError as exc:
        print(f"fssmeta tune: {exc}", file=sys.stderr)
        return 1
    print(main_summary(result))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fssmeta.params import apply_tuned
    from fssmeta.runs import meta_dir
    from fssmeta.stages import train_meta

    _fold_override(args, "train")
    cfg = config_from_args(args)
    if args.tuned:
        cfg, _ = apply_tuned(cfg, args.tuned)
    if args.ray:
        return _train_ray(cfg, progress=not args.quiet)
    tc = cfg.train
    start = time.perf_counter()
    result = train_meta(cfg, tc.fold, progress=not args.quiet, resume_run=not args.restart)
    print(f"{cfg.model.method} fold {tc.fold} {tc.shot}-shot: {len(result.history)} epochs, {result.step} steps in "
          f"{time.perf_counter() - start:.0f} s; best validation mIoU {100 * result.best_score:.1f} at epoch "
          f"{result.best_epoch}; checkpoints in {meta_dir(cfg, tc.fold, tc.shot)}")
    return 0


def _train_ray(cfg: Config, *, progress: bool) -> int:
    from fssmeta.integrations.ray_train import RayTrainingError, train_with_ray

    tc = cfg.train
    start = time.perf_counter()
    try:
        result = train_with_ray(cfg, progress=progress)
    except RayTrainingError as exc:
        print(f"fssmeta train: error: {exc}", file=sys.stderr)
        return 1
    metrics = result.metrics
    best = "n/a (no validation)" if result.best_val_miou is None else f"{100 * result.best_val_miou:.1f}"
    print(f"{cfg.model.method} fold {tc.fold} {tc.shot}-shot on Ray ({cfg.ray.num_workers} workers): "
          f"{int(metrics.get('epoch', 0))} epochs, {int(metrics.get('step', 0))} steps in "
          f"{time.perf_counter() - start:.0f} s; best validation mIoU {best}")
    if result.restored_epoch:
        print(f"  resumed after a failure from epoch {result.restored_epoch}")
    print(f"  Ray run {result.name}: {result.storage_path}")
    if result.mlflow_run_id:
        print(f"  MLflow run {result.mlflow_run_id}")
    print(f"  checkpoints in {result.meta_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fssmeta.cross_domain import (
        evaluate_target_splits,
        evaluate_targets,
        format_splits_report,
        format_target_report,
        target_sources,
    )
    from fssmeta.evaluation import evaluate_method, format_report, result_path

    cfg = config_from_args(args)
    if args.targets and (args.splits or (args.fold is None and cfg.eval.target_source == "splits")):
        print(format_splits_report(evaluate_target_splits(cfg, args.method, progress=not args.quiet,
                                                          regime=args.regime or cfg.eval.regime)))
        return 0
    if args.targets:
        fold = target_sources(cfg)[0] if args.fold is None else args.fold
        print(format_target_report(evaluate_targets(cfg, args.method, fold=fold, progress=not args.quiet,
                                                    regime=args.regime or cfg.eval.regime)))
        return 0
    report = evaluate_method(cfg, args.method, progress=not args.quiet, regime=args.regime)
    print(format_report(report))
    written = ", ".join(str(result_path(cfg, fold, report["method"], report["regime"])) for fold in cfg.eval.folds)
    print(f"written to {written} in {report['seconds']:.0f} s")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from fssmeta.data.io import write_json_atomic
    from fssmeta.decoding import RequestError, read_image_file
    from fssmeta.predict import load_training_checkpoint, save_prediction, segment_arrays
    from fssmeta.predict_ways import check_way_supports, save_way_prediction, segment_ways

    pairs = []
    for value in args.support:
        image, sep, mask = value.rpartition(":")
        if not sep or not image or not mask:
            raise RequestError(f"--support {value}: expected IMAGE:MASK (the support image and its mask file)")
        pairs.append((Path(image), Path(mask)))
    supports = [read_image_file(image, "support image") for image, _ in pairs]
    masks = [read_image_file(mask, "support mask", mask=True, mask_threshold=args.mask_threshold,
                             mask_class=args.mask_class) for _, mask in pairs]
    queries = [Path(q) for q in args.query]
    for query in queries:  # read one at a time below; missing ones fail before any work
        if not query.is_file():
            raise RequestError(f"query image {query}: file not found")
    if len({q.stem for q in queries}) != len(queries):
        raise RequestError(f"--query: two queries share a file name stem ({', '.join(args.query)}); their outputs "
                           "would overwrite each other")
    scheme, is_uri, _ = args.model.partition(":/")
    if is_uri and len(scheme) > 1 and "/" not in scheme:  # models:/, runs:/, s3://...; not C:/ nor a path
        if args.shot is not None or args.fold is not None:
            raise ValueError("--shot / --fold apply to a checkpoint file; a logged model records its own")
        from fssmeta.integrations.mlflow_model import load_logged_model

        model, model_cfg, info = load_logged_model(config_from_args(args).mlflow, args.model)
    else:
        model, model_cfg, info = load_training_checkpoint(args.model, shot=args.shot, fold=args.fold)
    shot = int(info["shot"])
    check_way_supports(shot, args.ways, supports, masks, names=[f"support mask {mask}" for _, mask in pairs])
    if torch.cuda.is_available():
        model.to("cuda")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, path in enumerate(queries):
        start = time.perf_counter()
        query = read_image_file(path, "query image")
        if args.ways > 1:
            probs, presence = segment_ways(model, model_cfg, shot, args.ways, query, supports, masks)
            results.append({"query": str(path), **save_way_prediction(out, path.stem, query, probs, presence)})
            if not args.quiet:
                present = ", ".join(str(n + 1) for n, p in enumerate(results[-1]["presence"]) if p) or "none"
                print(f"[{i + 1}/{len(queries)}] {path} ({query.shape[1]}x{query.shape[0]}): classes present: "
                      f"{present}; labelled {100 * results[-1]['foreground_fraction']:.1f}% -> "
                      f"{out / results[-1]['files']['labels']} ({time.perf_counter() - start:.2f} s)")
            continue
        prob = segment_arrays(model, model_cfg, shot, query, supports, masks)
        results.append({"query": str(path), **save_prediction(out, path.stem, query, prob)})
        if not args.quiet:
            print(f"[{i + 1}/{len(queries)}] {path} ({query.shape[1]}x{query.shape[0]}): foreground "
                  f"{100 * results[-1]['foreground_fraction']:.1f}% -> {out / results[-1]['files']['mask']} "
                  f"({time.perf_counter() - start:.2f} s)")
    write_json_atomic(out / "predictions.json", {
        "model": args.model, "method": info.get("method", model_cfg.model.method), "fold": info["fold"],
        "shot": shot, "ways": args.ways,
        "supports": [{"image": str(image), "mask": str(mask), **({"way": i // shot + 1} if args.ways > 1 else {})}
                     for i, (image, mask) in enumerate(pairs)],
        "queries": results}, indent=2)
    print(f"wrote {len(results)} prediction(s) to {out} ({out / 'predictions.json'})")
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
    add("methods", cmd_methods, "list the methods (model.method keys) and what their records declare")
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
    p = add("train-base", cmd_train_base, "train a fold's stage-1 PSPNet (BAM's base learner; the encoder other methods and the baseline may start from)")
    p.add_argument("--fold", type=split_arg, help="fold 0..3, or all: every source class (default: train_base.fold)")
    p.add_argument("--restart", action="store_true", help="ignore an existing last.pt instead of resuming")
    add("tune", cmd_tune, "Ray Tune sweep (tune.*) on the validation episodes; best values to tune.out/best.yaml")
    p = add("train", cmd_train, "episodic meta-training of model.method on a fold (what differs per method: its METHOD record)")
    p.add_argument("--tuned", help="a sweep's best.yaml: its values on top of params (as the train_meta stage)")
    p.add_argument("--fold", type=split_arg, help="fold 0..3, or all: every source class (default: train.fold)")
    p.add_argument("--shot", type=int, help="shots (default: train.shot)")
    p.add_argument("--restart", action="store_true", help="ignore an existing last.pt instead of resuming")
    p.add_argument("--ray", action="store_true",
                   help="train under Ray Train with ray.num_workers workers (a new run; `ray` in params)")
    p = add("evaluate", cmd_evaluate, "score trained models on the fixed test episode lists")
    p.add_argument("--method", help="a trained method, or `baseline` (default: model.method)")
    p.add_argument("--targets", action="store_true",
                   help="cross-domain: the source model(s) of eval.target_source (or --fold / --splits) score "
                        "every data.targets list")
    p.add_argument("--fold", type=split_arg, default=None,
                   help="with --targets: the model of this source split, a fold or all (PATNet's all-classes model)")
    p.add_argument("--splits", action="store_true",
                   help="with --targets: every eval.folds model scores the targets; per-split rows and their mean "
                        "(RMT's protocol)")
    p.add_argument("--regime", choices=["none", "tta", "finetune"],
                   help="none, or tta / finetune: adapt on each episode's supports before predicting (finetune: "
                        "each labelled support predicted from the others, CRNet's k-shot) (default: eval.regime)")
    p = add("register", cmd_register, "register a trained checkpoint as a version of the MLflow registered model "
                                       "(fold, shot and protocol tags from its stored config; idempotent)")
    p.add_argument("--checkpoint", required=True, help="a .pt checkpoint written by training")
    p.add_argument("--name", help="registered model name (default: mlflow.registered_model)")
    p.add_argument("--metrics", help="a JSON object of metric names to numbers, recorded as metric.<name> tags")
    p = add("promote", cmd_promote, "move champion-<domain> to a registered version if it wins on that domain")
    p.add_argument("--model", help="registered model name (default: mlflow.registered_model)")
    p.add_argument("--domain", required=True, help="`source` or a data.targets name")
    p.add_argument("--version", help="the challenger version (default: the latest)")
    p.add_argument("--rollback", action="store_true", help="give the alias back to the previous champion")
    p = add("predict", cmd_predict, "segment query images from support images and masks with a trained model")
    p.add_argument("--model", required=True, metavar="URI|CHECKPOINT",
                   help="a logged model (models:/fssmeta@champion-source, models:/fssmeta/3, runs:/...) or a .pt "
                        "checkpoint written by training")
    p.add_argument("--support", action="append", required=True, metavar="IMG:MASK",
                   help="a support image and its mask (0 background; one other value foreground, 255 = ignore "
                        "beside one class value; several classes need --mask-class, anti-aliased masks "
                        "--mask-threshold); once per shot")
    p.add_argument("--mask-threshold", type=int, metavar="T",
                   help="read the support masks as value >= T = foreground, else background (anti-aliased 0/255 "
                        "masks, e.g. 128)")
    p.add_argument("--mask-class", type=int, metavar="ID",
                   help="read the support masks as label maps: value ID = foreground, 255 = ignore, others background")
    p.add_argument("--query", action="append", required=True, metavar="IMG", help="a query image; repeatable")
    p.add_argument("--ways", type=int, default=1, metavar="N",
                   help="N > 1: iFSL's FS-CS task (methods that take it: asnet): N classes, each given by `shot` "
                        "--support pairs in order (the first shot are class 1's, ...); writes <stem>_labels.png "
                        "(palette; value n = class n) and <stem>_overlay.png, and each class's presence in "
                        "predictions.json (default 1: one class)")
    p.add_argument("--out", required=True, help="output folder: <stem>_mask/_probability/_overlay.png per query, "
                                                 "predictions.json")
    p.add_argument("--shot", type=int, help="checkpoint only: shots (default: its train.shot)")
    p.add_argument("--fold", type=int, help="checkpoint only: fold (default: its train.fold)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, FloatingPointError, ValueError) as exc:
        print(f"fssmeta {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output or cache folder that is a file, unwritable, or on a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        reason = {errno.EEXIST: "a file is there, not a folder", errno.ENOTDIR: "a file is in the way of this folder",
                  errno.EACCES: "permission denied (not writable)"}.get(exc.errno, exc.strerror or str(exc))
        print(f"fssmeta {args.command}: error: {where}{reason} (check the folder the params or --out name)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
