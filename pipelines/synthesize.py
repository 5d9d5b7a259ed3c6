"""DVC stage `synthesize`: the synthetic few-shot dataset at `synthesize.out`."""

from __future__ import annotations

from fssmeta.data.synthetic import synthesize
from pipelines.common import config, parser, run


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    summary = synthesize(cfg.synthesize)
    print(f"synthesize: {summary['counts']}")


if __name__ == "__main__":
    run(main, __file__)
