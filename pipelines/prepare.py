"""DVC stage `prepare`: validate and index `data.root` into per-fold lists at `data.prepared`."""

from __future__ import annotations

from fssmeta.data.prepare import prepare
from pipelines.common import config, parser, run


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    summary = prepare(cfg.data)
    print(f"prepare: pools {summary['pools']}, folds {summary['folds']}")


if __name__ == "__main__":
    run(main, __file__)
