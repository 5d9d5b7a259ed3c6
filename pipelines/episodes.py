"""DVC stage `episodes`: the fixed test / validation episode lists at `episodes.out`."""

from __future__ import annotations

from fssmeta.data.episode_lists import write_episode_lists
from pipelines.common import config, parser, run


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    manifest = write_episode_lists(cfg.data, cfg.episodes)
    print(f"episodes: {len(manifest['files'])} lists")
    for warning in manifest["warnings"]:
        print(f"episodes: warning: {warning}")


if __name__ == "__main__":
    run(main, __file__)
