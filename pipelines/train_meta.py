"""DVC stages `train_meta` and `train_meta_all`: episodic meta-training of `model.method` for one fold (or,
with `--fold all` and only under `eval.target_source: all`, the all-classes source split) and shot under Ray Train,
with the tune stage's best values (`--tuned best.yaml`) applied on top of params; the best checkpoint lands
in `<train.out>/fold<k>/<method>-<shot>shot/best.pt` (its stored config says what was trained). A method
trained 1-shot for every k (its record's `trains_each_shot` false) trains once, into the 1-shot folder; the
stage of another shot then writes only a pointer (`trained_shot.json`) to it, training it first if absent."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fssmeta.cli import split_arg  # noqa: E402
from fssmeta.integrations.ray_train import RayTrainingError, train_with_ray  # noqa: E402
from fssmeta.models import get_method  # noqa: E402
from fssmeta.params import apply_tuned  # noqa: E402
from fssmeta.runs import meta_dir, run_dir, write_pointer  # noqa: E402
from pipelines.common import config, parser, run, skip_unused_all  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fold", type=split_arg, help="fold 0..3 or all (default: train.fold)")
    p.add_argument("--shot", type=int, help="shots (default: train.shot)")
    p.add_argument("--tuned", help="a sweep's best.yaml: its `overrides` are applied on top of params")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = p.parse_args()
    cfg = config(args)
    if args.tuned:
        cfg, tuned = apply_tuned(cfg, args.tuned)
        print(f"train_meta: tuned values from {args.tuned}: {tuned or 'none (params pass through)'}")
    fold = cfg.train.fold if args.fold is None else args.fold
    shot = cfg.train.shot if args.shot is None else args.shot
    if skip_unused_all(cfg, fold, run_dir(cfg, fold, shot)):
        return
    trained_shot = get_method(cfg.model.method).training_shot(shot)
    checkpoint = meta_dir(cfg, fold, shot) / "best.pt"
    if trained_shot != shot and checkpoint.is_file():
        print(f"train_meta: {cfg.model.method} trains {trained_shot}-shot for every k; {shot}-shot uses "
              f"{checkpoint} ({write_pointer(cfg, fold, shot)})")
        return
    try:
        result = train_with_ray(cfg, fold=fold, shot=shot, progress=not args.quiet)
    except RayTrainingError as exc:
        sys.exit(f"train_meta: {exc}")
    best = "n/a" if result.best_val_miou is None else f"{100 * result.best_val_miou:.1f}"
    print(f"train_meta: run {result.name}, best validation mIoU {best}, checkpoints in {result.meta_dir}")
    if trained_shot != shot:
        print(f"train_meta: {shot}-shot uses that {trained_shot}-shot checkpoint ({write_pointer(cfg, fold, shot)})")


if __name__ == "__main__":
    run(main, __file__)
