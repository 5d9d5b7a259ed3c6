"""DVC stages `train_base@<fold>` and `train_base_all`: the fold's PSPNet base learner at
`<train_base.out>/fold<k>/base`, or (`--fold all`, only under `eval.target_source: all`) the all-classes
source split's at `<train_base.out>/all/base`."""

from __future__ import annotations

from fssmeta.cli import split_arg
from fssmeta.runs import base_dir
from fssmeta.stages import train_base
from pipelines.common import config, parser, run, skip_unused_all


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fold", type=split_arg, required=True, help="a fold 0..3, or all (every source class)")
    args = p.parse_args()
    cfg = config(args)
    if skip_unused_all(cfg, args.fold, base_dir(cfg, args.fold)):
        return
    # DVC removed the stage's outputs before running it: this is always a fresh run.
    result = train_base(cfg, args.fold, resume_run=False)
    print(f"train_base fold {args.fold}: {result.step} steps, final loss {result.history[-1]['train_loss']:.4f}")


if __name__ == "__main__":
    run(main, __file__)
