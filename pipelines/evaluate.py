"""DVC stage `evaluate@<fold>`: the fold's trained method (and the non-learned baseline) on every test
seed's fixed list, written to `<eval.out>/fold<k>/<method>.json`. When this fold's models are a cross-domain
source (`eval.target_source: splits`, or `fold` with `eval.target_fold` = this fold) they also score every
`data.targets` list (`pipelines/evaluate_targets.py` says how), to `<eval.out>/fold<k>/targets/`."""

from __future__ import annotations

from fssmeta.cross_domain import scores_targets
from fssmeta.evaluation import evaluate_method, format_report
from pipelines.common import config, parser, run
from pipelines.evaluate_targets import score_targets


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fold", type=int, required=True)
    args = p.parse_args()
    params = config(args)
    cfg = params.model_copy(update={"eval": params.eval.model_copy(update={"folds": (args.fold,)})})
    for method in (cfg.model.method, "baseline"):
        print(format_report(evaluate_method(cfg, method)))
    if scores_targets(params, args.fold):  # the params' eval.folds decide what `splits` means
        score_targets(cfg, args.fold)


if __name__ == "__main__":
    run(main, __file__)
