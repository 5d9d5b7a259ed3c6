"""DVC stage `train_base@<fold>`: the fold's PSPNet base learner at `<train_base.out>/fold<k>/base`."""

from __future__ import annotations

from fssmeta.stages import train_base
from pipelines.common import config, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fold", type=int, required=True)
    args = p.parse_args()
    cfg = config(args)
    # DVC removed the stage's outputs before running it: this is always a fresh run.
    result = train_base(cfg, args.fold, resume_run=False)
    print(f"train_base fold {args.fold}: {result.step} steps, final loss {result.history[-1]['train_loss']:.4f}")


if __name__ == "__main__":
    run(main, __file__)
