"""DVC stage `evaluate_targets`: cross-domain evaluation (PATNet protocol). The source fold's trained method
(`eval.target_fold`, checkpoint selected on source-side validation episodes) and the non-learned baseline
score every `data.targets` list, 1-way, at every `eval.shots`, the method under each `eval.target_regimes`
(none, tta); written to `<eval.out>/targets/<method>-fold<k>[-tta].json`. With no targets configured the stage records that and succeeds."""

from __future__ import annotations

from pathlib import Path

from fssmeta.data.io import write_json_atomic
from fssmeta.evaluation import evaluate_targets, format_target_report
from pipelines.common import config, parser, run


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    out = Path(cfg.eval.out) / "targets"
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.targets:
        write_json_atomic(out / "none.json", {"targets": {}, "reason": "data.targets is empty in params"})
        print("data.targets is empty: no cross-domain evaluation")
        return
    for regime in cfg.eval.target_regimes:  # each regime to its own file; the report shows them as rows
        print(format_target_report(evaluate_targets(cfg, cfg.model.method, fold=cfg.eval.target_fold, regime=regime)))
    print(format_target_report(evaluate_targets(cfg, "baseline", fold=cfg.eval.target_fold)))  # nothing to adapt


if __name__ == "__main__":
    run(main, __file__)
