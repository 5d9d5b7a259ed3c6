"""Per-domain promotion in the MLflow model registry: a version (the challenger) takes the alias
`champion-<domain>` only if it beats the non-learned baseline (the floor, also for the first champion) and the
current champion by at least `registry.min_improvement`, all three scored on the SAME fixed selection episodes
of that domain; every decision and the three scores are recorded as version tags, and the alias history (kept
as a registered-model tag) makes `rollback` restore the previous champion.

A missing or NaN score refuses the promotion (PromotionRefused, nothing moved). Domains: `source` (the
version's own fold, scored on its fixed VALIDATION list) or a name in `data.targets` (its fixed 1-way
SELECTION lists, images its test lists never use; refused when `episodes.target_val_fraction` is 0). Test
lists never choose a model. Works against any tracking URI: the sqlite default or an MLflow server.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fssmeta.config import Config
from fssmeta.data.folds import parse_split
from fssmeta.integrations.mlflow import _mlflow, resolve_tracking_uri
from fssmeta.integrations.mlflow_model import load_logged_model
from fssmeta.tracking import episodes_for

ScoreFn = Callable[[str], float]


class PromotionRefused(RuntimeError):
    """A promotion that must not happen (a score missing or not finite, an unknown version); nothing moved."""


@dataclass(frozen=True)
class Decision:
    """One promotion decision, as recorded on the challenger version."""

    domain: str
    challenger: str
    champion: str | None
    challenger_score: float
    champion_score: float | None
    min_improvement: float
    promoted: bool
    reason: str
    baseline_score: float | None = None  # the non-learned baseline on the same episodes: the floor
    episodes: str = ""  # which selection episodes scored it (`tracking.episodes_for`)


def alias_for(domain: str) -> str:
    return f"champion-{domain}"


def _history_key(domain: str) -> str:
    return f"champion_history.{domain}"


def decide(challenger_score: float | None, champion_score: float | None, *, has_champion: bool,
           min_improvement: float, baseline_score: float | None) -> tuple[bool, str]:
    """The rule, with no registry: (promote?, why). First the floor: the challenger must score strictly above
    the non-learned baseline (a model that learned nothing would otherwise become the first champion); then,
    with a champion, it must gain `min_improvement` over it. Raises PromotionRefused on a missing / NaN score."""
    if challenger_score is None or not math.isfinite(challenger_score):
        raise PromotionRefused(f"the challenger's score is {challenger_score!r}: refusing to promote")
    if baseline_score is None or not math.isfinite(baseline_score):
        raise PromotionRefused(f"the non-learned baseline's score is {baseline_score!r}: refusing to promote "
                               "without the floor")
    if challenger_score <= baseline_score:
        return False, (f"score {challenger_score:.4f} at or below the non-learned baseline's {baseline_score:.4f} "
                       "on the same episodes")
    if not has_champion:
        return True, "no champion yet"
    if champion_score is None or not math.isfinite(champion_score):
        raise PromotionRefused(f"the champion's score is {champion_score!r}: refusing to compare")
    gain = challenger_score - champion_score
    if gain >= min_improvement:
        return True, f"wins by {gain:+.4f} >= {min_improvement}"
    return False, f"gain {gain:+.4f} < min_improvement {min_improvement}"


def _client(cfg: Config) -> Any:
    return _mlflow().MlflowClient(tracking_uri=resolve_tracking_uri(cfg.mlflow))


def current_champion(client: Any, name: str, domain: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias_for(domain)).version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def _history(client: Any, name: str, domain: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(_history_key(domain), "[]"))


def _record(client: Any, name: str, decision: Decision) -> None:
    prefix = f"promotion.{decision.domain}"
    tags = {f"{prefix}.decision": "promoted" if decision.promoted else "rejected",
            f"{prefix}.reason": decision.reason,
            f"{prefix}.score": repr(decision.challenger_score),
            f"{prefix}.champion_version": decision.champion or "",
            f"{prefix}.champion_score": "" if decision.champion_score is None else repr(decision.champion_score),
            f"{prefix}.baseline_score": "" if decision.baseline_score is None else repr(decision.baseline_score),
            f"{prefix}.episodes": decision.episodes,
            f"{prefix}.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.challenger, key, value)


def promote(cfg: Config, *, domain: str, version: str, score: ScoreFn, baseline: ScoreFn | None = None,
            name: str | None = None) -> Decision:
    """Score the challenger `version`, the non-learned baseline on the same episodes (`baseline(version)`,
    default `score_baseline`) and the current `champion-<domain>` with `score`, apply `decide`, record it on
    the challenger, and move the alias only when it wins."""
    name = name or cfg.mlflow.registered_model
    client = _client(cfg)
    version = str(client.get_model_version(name, str(version)).version)  # an unknown version fails here
    champion = current_champion(client, name, domain)
    episodes = episodes_for(domain)
    if champion == version:
        return Decision(domain, version, champion, math.nan, math.nan, cfg.registry.min_improvement, False,
                        "already the champion", episodes=episodes)

    def params_baseline(v: str) -> float:
        return score_baseline(cfg, version=v, domain=domain, name=name)

    baseline = baseline or params_baseline
    try:
        if domain != "source" and cfg.episodes.target_val_fraction == 0:
            raise PromotionRefused(f"episodes.target_val_fraction is 0: target {domain} has no selection episodes, "
                                   "and its test lists never choose a model; set it > 0 and rerun the episodes stage")
        if champion is not None:
            _check_comparable(client, name, domain, version, champion)
        challenger_score = score(version)
        baseline_score = baseline(version)
        champion_score = score(champion) if champion is not None else None
        promoted, reason = decide(challenger_score, champion_score, has_champion=champion is not None,
                                  min_improvement=cfg.registry.min_improvement, baseline_score=baseline_score)
    except PromotionRefused as exc:
        prefix = f"promotion.{domain}"
        client.set_model_version_tag(name, version, f"{prefix}.decision", "refused")
        client.set_model_version_tag(name, version, f"{prefix}.reason", str(exc))
        raise
    decision = Decision(domain, version, champion, challenger_score, champion_score,
                        cfg.registry.min_improvement, promoted, reason, baseline_score, episodes)
    _record(client, name, decision)
    if promoted:
        history = _history(client, name, domain)
        if champion is not None:
            history.append(champion)
        client.set_registered_model_tag(name, _history_key(domain), json.dumps(history))
        client.set_registered_model_alias(name, alias_for(domain), version)
    return decision


def _check_comparable(client: Any, name: str, domain: str, challenger: str, champion: str) -> None:
    """Both versions must be scored on the same episodes: the same shot (the lists differ per shot) and, on
    `source`, the same fold (each fold has its own validation list)."""
    tags = {v: client.get_model_version(name, v).tags for v in (challenger, champion)}
    keys = ("shot", "fold") if domain == "source" else ("shot",)
    for key in keys:
        mine, theirs = tags[challenger].get(key), tags[champion].get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise PromotionRefused(
                f"{name} version {challenger} ({key} {mine}) and {alias_for(domain)} version {champion} ({key} "
                f"{theirs}) would not be scored on the same {domain} episodes; promote a version with {key} {theirs}")


def rollback(cfg: Config, *, domain: str, name: str | None = None) -> str:
    """Give `champion-<domain>` back to the previous champion; returns its version. Refused (nothing moved)
    when there is no previous champion."""
    name = name or cfg.mlflow.registered_model
    client = _client(cfg)
    history = _history(client, name, domain)
    if not history:
        raise PromotionRefused(f"{name}: no previous {alias_for(domain)} to roll back to")
    previous = history.pop()
    current = current_champion(client, name, domain)
    client.set_registered_model_alias(name, alias_for(domain), previous)
    client.set_registered_model_tag(name, _history_key(domain), json.dumps(history))
    if current is not None:
        client.set_model_version_tag(name, current, f"promotion.{domain}.decision", f"rolled back to {previous}")
    return previous


def score_version(cfg: Config, *, version: str, domain: str, name: str | None = None) -> float:
    """mIoU of a registered version on `domain`'s fixed selection episodes (mean over validation seeds):
    `source` = the version's fold VALIDATION list, a target name = its 1-way selection lists at
    `eval.resized_size` (`evaluation.score_domain`)."""
    from fssmeta.cross_domain import score_domain

    name = name or cfg.mlflow.registered_model
    model, model_cfg, info = load_logged_model(cfg.mlflow, f"models:/{name}/{version}")
    return score_domain(cfg, model, domain, fold=parse_split(info["fold"]), shot=int(info["shot"]),
                        method=model_cfg.model.method)


def score_baseline(cfg: Config, *, version: str, domain: str, name: str | None = None) -> float:
    """mIoU of the non-learned baseline (`model.method: baseline`, built from the params as `fssmeta evaluate
    --method baseline` builds it) on the episodes `score_version` scores `version` on: `domain`'s selection
    episodes at the version's fold and shot (its `fold` / `shot` tags)."""
    from fssmeta.cross_domain import score_domain
    from fssmeta.runs import default_device, evaluation_model

    name = name or cfg.mlflow.registered_model
    tags = _client(cfg).get_model_version(name, str(version)).tags
    if "fold" not in tags or "shot" not in tags:
        raise PromotionRefused(f"{name} version {version} has no `fold` / `shot` tags (not registered by "
                               "register_model): the baseline cannot be scored on its episodes")
    fold, shot = parse_split(tags["fold"]), int(tags["shot"])
    model = evaluation_model(cfg, fold, shot, "baseline", default_device())
    return score_domain(cfg, model, domain, fold=fold, shot=shot, method="baseline")


def decision_dict(decision: Decision) -> dict[str, Any]:
    return asdict(decision)
