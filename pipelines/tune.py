"""DVC stage `tune`: a Ray Tune sweep (Optuna search, ASHA early stopping) on `tune.fold` / `tune.shot`, scored
on validation episodes (`tune.domain`: the fold's, or one target's selection lists); the best values land in
`<tune.out>/best.yaml`, which every train_meta run applies. `tune.trials: 0` passes params through. An
interrupted sweep resumes when the stage runs again."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fssmeta.config import ConfigError  # noqa: E402
from fssmeta.integrations.ray_tune import SweepError, main_summary, run_sweep  # noqa: E402
from pipelines.common import config, parser, run  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--quiet", action="store_true", help="no Tune progress table")
    args = p.parse_args()
    try:
        result = run_sweep(config(args), progress=not args.quiet)
    except (SweepError, ConfigError) as exc:  # ConfigError: a tune.domain that names no target
        sys.exit(f"tune: {exc}")
    print(main_summary(result))


if __name__ == "__main__":
    run(main, __file__)
