"""DVC stage `evaluate_targets`: cross-domain evaluation (PATNet protocol) from the all-classes source model
(`eval.target_source: all`: trained on every source class by the train_base_all / train_meta_all stages,
checkpoint selected on held-out source images). It and the non-learned baseline on that split's stage 1 score
every `data.targets` list, 1-way, at every `eval.shots`, the method under each `eval.target_regimes` (none,
tta); written to `<eval.out>/targets/<method>-all[-tta].json`. Under `splits` / `fold` the fold models are the
source and each fold's evaluate stage scores the targets instead (their files sit beside its in-domain
results); this stage then records where. With no targets configured it records that and succeeds."""

from __future__ import annotations

from pathlib import Path

from fssmeta.config import Config
from fssmeta.cross_domain import evaluate_targets, format_target_report, scores_targets
from fssmeta.data.folds import ALL, Split
from fssmeta.data.io import write_json_atomic
from pipelines.common import config, parser, run


def score_targets(cfg: Config, fold: Split) -> None:
    """`model.method` under every `eval.target_regimes` and the baseline (nothing to adapt) on the targets,
    from source split `fold`'s models; each to its own file (the report shows them as rows)."""
    for regime in cfg.eval.target_regimes:
        print(format_target_report(evaluate_targets(cfg, cfg.model.method, fold=fold, regime=regime)))
    print(format_target_report(evaluate_targets(cfg, "baseline", fold=fold)))


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    out = Path(cfg.eval.out) / "targets"
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.targets:
        write_json_atomic(out / "none.json", {"targets": {}, "reason": "data.targets is empty in params"})
        print("data.targets is empty: no cross-domain evaluation")
        return
    if not scores_targets(cfg, ALL):
        where = f"{cfg.eval.out}/fold<k>/targets (the evaluate stages)"
        write_json_atomic(out / "none.json", {"targets": sorted(cfg.data.targets), "source": cfg.eval.target_source,
                                              "reason": f"eval.target_source {cfg.eval.target_source}: see {where}"})
        print(f"eval.target_source {cfg.eval.target_source}: the fold models score the targets, in {where}")
        return
    score_targets(cfg, ALL)


if __name__ == "__main__":
    run(main, __file__)
