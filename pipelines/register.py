"""DVC stage `register`: every (fold, shot) best checkpoint becomes a version of the registered model
`mlflow.registered_model`, tagged with its metrics and protocol (status=candidate). Idempotent: a checkpoint
already registered returns its version.

Under `eval.target_source: all` the all-classes source model's versions (fold tag `all`) are registered too.
Then, with `registry.promote`, a version challenges each domain's `champion-<domain>` alias (`registry.domains`;
default `source` and every data.targets name): on `source` the version of (`eval.target_fold`,
`registry.shot`), on a target the cross-domain source's (the all-classes model, or `eval.target_fold`'s under
`splits` / `fold`). It, the champion
and the non-learned baseline are scored on that domain's SAME fixed selection episodes (never test lists), and
the alias moves only when it beats the baseline and wins by `registry.min_improvement`. A refused promotion (a
NaN score, versions not comparable, a target without selection lists) is recorded and reported; it moves
nothing. `report/registered.json` holds the versions, their `selection` tag and every decision with its scores."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

from fssmeta.config import Config
from fssmeta.cross_domain import domains as all_domains
from fssmeta.cross_domain import scores_targets, target_result_path
from fssmeta.data.folds import ALL, Split, split_name
from fssmeta.data.io import read_json, write_json_atomic
from fssmeta.data.prepare import load_fold
from fssmeta.integrations.promotion import (
    PromotionRefused,
    decision_dict,
    promote,
    score_baseline,
    score_version,
)
from fssmeta.integrations.registry import register_model
from fssmeta.runs import meta_dir
from fssmeta.tracking import episodes_for, protocol_tags, selection_source
from pipelines.common import config, parser, run


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    domains = check_promotion(cfg)
    out = Path(cfg.report.out)
    table = read_json(out / "metrics.json", "report metrics (run the report stage)")
    method = cfg.model.method
    versions = []
    for fold in registered_splits(cfg):
        for shot in cfg.eval.shots:
            metrics = {}
            if fold != ALL:
                scores = table[method][f"{shot}shot"][f"fold{fold}"]
                metrics = {"miou": scores["miou"], "miou_std": scores["miou_std"], "fb_iou": scores["fb_iou"],
                           **{k: v for k, v in scores.items() if k.endswith("way")}}  # FS-CS: er_<N>way, miou_<N>way
            metrics |= target_metrics(cfg, method, fold, shot)  # the per-domain test scores, for the record
            tags = protocol_tags(cfg, fold=fold, shot=shot)
            info = register_model(cfg, checkpoint=meta_dir(cfg, fold, shot) / "best.pt", metrics=metrics,
                                  tags=tags, fold=fold, shot=shot,
                                  base_classes=load_fold(cfg.data.prepared, fold)["base"])
            versions.append({"fold": fold, "shot": shot, "selection": tags["selection"], **info})
            state = "registered" if info["created"] else "already registered"
            print(f"register: {info['name']} version {info['version']} ({method}, {split_name(fold)}, {shot}-shot) {state}")
    promotions = []
    for domain in domains:  # `source` takes eval.target_fold's version; a target, the cross-domain source's
        fold = cfg.eval.target_fold if domain == "source" else deployed_split(cfg)
        challenger = next(v for v in versions if (v["fold"], v["shot"]) == (fold, cfg.registry.shot))
        promotions += promote_everywhere(cfg, challenger["version"], [domain])
    write_json_atomic(out / "registered.json", {"registered_model": cfg.mlflow.registered_model,
                                                "selection": selection_source(cfg), "versions": versions,
                                                "promotions": promotions})


def registered_splits(cfg: Config) -> list[Split]:
    """Every eval.folds fold, and the all-classes split when it is the cross-domain source."""
    return [*cfg.eval.folds, *([ALL] if scores_targets(cfg, ALL) else [])]


def deployed_split(cfg: Config) -> Split:
    """The split whose version challenges on the targets: the all-classes model under `eval.target_source:
    all`; eval.target_fold's otherwise (under `splits` every fold scores the targets, one is deployed)."""
    return ALL if scores_targets(cfg, ALL) else cfg.eval.target_fold


def target_metrics(cfg: Config, method: str, fold: Split, shot: int) -> dict[str, float]:
    """`target_<name>_miou` of `fold`'s model (regime none) when it scored the targets, else nothing."""
    path = target_result_path(cfg, method, fold)
    if not scores_targets(cfg, fold) or not path.is_file():
        return {}
    results = read_json(path, f"cross-domain evaluation of {method}")["results"]
    return {f"target_{name}_miou": per_shot[f"{shot}shot"]["miou_mean"] for name, per_shot in results.items()
            if f"{shot}shot" in per_shot}


def check_promotion(cfg: Config) -> list[str]:
    """The domains to promote on (none when `registry.promote` is off); a wrong setting stops here, first."""
    if not cfg.registry.promote:
        return []
    if cfg.eval.target_fold not in cfg.eval.folds or cfg.registry.shot not in cfg.eval.shots:
        sys.exit(f"register: registry.shot {cfg.registry.shot} / eval.target_fold {cfg.eval.target_fold} must be "
                 f"among eval.shots {list(cfg.eval.shots)} / eval.folds {list(cfg.eval.folds)} (or registry.promote: false)")
    known = all_domains(cfg)
    domains = list(cfg.registry.domains) or known
    unknown = [d for d in domains if d not in known]
    if unknown:
        sys.exit(f"register: registry.domains {unknown} are not `source` nor data.targets names ({', '.join(known)})")
    return domains


def promote_everywhere(cfg: Config, version: str, domains: list[str]) -> list[dict]:
    """One promotion decision per domain for `version`; scores (the versions' and the non-learned baseline's
    on their episodes) are computed once per (version, domain)."""
    name = cfg.mlflow.registered_model
    scores: dict[tuple[str, str, str], float] = {}

    def cached(kind: str, domain: str, fn: Callable[..., float]) -> Callable[[str], float]:
        def of(v: str) -> float:
            if (kind, v, domain) not in scores:
                scores[(kind, v, domain)] = fn(cfg, version=v, domain=domain, name=name)
            return scores[(kind, v, domain)]
        return of

    decisions = []
    for domain in domains:
        try:
            decision = decision_dict(promote(cfg, domain=domain, version=version, name=name,
                                             score=cached("version", domain, score_version),
                                             baseline=cached("baseline", domain, score_baseline)))
            decision = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in decision.items()}
        except PromotionRefused as exc:
            print(f"register: {name} version {version} on {domain}: promotion refused: {exc}", file=sys.stderr)
            decisions.append({"domain": domain, "challenger": version, "promoted": False, "reason": f"refused: {exc}",
                              "episodes": episodes_for(domain)})
            continue
        verdict = "promoted" if decision["promoted"] else "not promoted"
        baseline = "" if decision["baseline_score"] is None else f"; baseline {decision['baseline_score']:.4f}"
        print(f"register: {name}@champion-{domain}: version {version} {verdict} ({decision['reason']}{baseline})")
        decisions.append(decision)
    return decisions


if __name__ == "__main__":
    run(main, __file__)
