"""DVC stage `evaluate@<fold>`: the fold's trained method (and the non-learned baseline) on every test
seed's fixed list, written to `<eval.out>/fold<k>/<method>.json`."""

from __future__ import annotations

from fssmeta.evaluation import evaluate_method, format_report
from pipelines.common import config, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fold", type=int, required=True)
    args = p.parse_args()
    cfg = config(args)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"folds": (args.fold,)})})
    for method in (cfg.model.method, "baseline"):
        print(format_report(evaluate_method(cfg, method)))


if __name__ == "__main__":
    run(main, __file__)
