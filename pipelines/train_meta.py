"""DVC stage `train_meta`: episodic meta-training of `model.method` for one fold and shot under Ray Train,
with the tune stage's best values (`--tuned best.yaml`) applied on top of params; the best checkpoint lands
in `<train.out>/fold<k>/<method>-<shot>shot/best.pt` (its stored config says what was trained)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fssmeta.config import apply_tuned  # noqa: E402
from fssmeta.integrations.ray_train import RayTrainingError, train_with_ray  # noqa: E402
from pipelines.common import config, parser  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fold", type=int, help="fold (default: train.fold)")
    p.add_argument("--shot", type=int, help="shots (default: train.shot)")
    p.add_argument("--tuned", help="a sweep's best.yaml: its `overrides` are applied on top of params")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = p.parse_args()
    cfg = config(args)
    if args.tuned:
        cfg, tuned = apply_tuned(cfg, args.tuned)
        print(f"train_meta: tuned values from {args.tuned}: {tuned or 'none (params pass through)'}")
    try:
        result = train_with_ray(cfg, fold=args.fold, shot=args.shot, progress=not args.quiet)
    except RayTrainingError as exc:
        sys.exit(f"train_meta: {exc}")
    best = "n/a" if result.best_val_miou is None else f"{100 * result.best_val_miou:.1f}"
    print(f"train_meta: run {result.name}, best validation mIoU {best}, checkpoints in {result.meta_dir}")


if __name__ == "__main__":
    main()
