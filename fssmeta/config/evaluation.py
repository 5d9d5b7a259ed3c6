"""`eval`: scoring conventions, the cross-domain source, and the adaptation regimes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fssmeta.config.base import Amp, NonNegative, Positive, Section

Regime = Literal["none", "tta", "finetune"]


class TTAConfig(Section):
    """`eval.tta` / `eval.finetune`: adaptation on each episode's supports (fssmeta/adaptation.py), one
    section per regime that adapts."""

    steps: Positive = 20  # support-as-query forward / backward passes per episode, whatever the shot
    lr: Annotated[float, Field(gt=0)] = 1.0e-3
    optimizer: Literal["adam", "sgd"] = "adam"  # fresh per episode
    modules: tuple[str, ...] = ()  # module prefixes to adapt; () = every learnable parameter
    # The share of an UNCHECKED weight change the query is predicted with: theta0 + blend (theta - theta0)
    # (weight-space interpolation as in WiSE-FT); 1 = the adapted weights, 0 = the model as trained. A change
    # `check: holdout` has checked (k > 1) is kept whole or dropped; at k = 1 nothing can check it: blended.
    blend: Annotated[float, Field(ge=0, le=1)] = 1.0
    # tta's views (fssmeta/adaptation.py): flip = each support, flipped, predicted from all supports (itself
    # included); others = predicted from the supports with itself replaced by the next one (1 shot: flip)
    views: Literal["flip", "others"] = "flip"
    # holdout (k > 1): adapt on k - 1 supports and keep the change only if the held-out support's foreground IoU
    # (predicted from the others) does not fall; otherwise predict with the model as trained. 1 shot: no check
    check: Literal["none", "holdout"] = "none"
    episodes: NonNegative = 0  # episodes scored per list under the regime (the first ones); 0 = eval.episodes


class FinetuneConfig(TTAConfig):
    """`eval.finetune`: as `eval.tta`, with its own default of 10 steps (a section given in params keeps it
    for every key it leaves unset)."""

    steps: Positive = 10


class EvalConfig(Section):
    """Test-time conventions (docs/protocol.md section 4)."""

    resolution: Literal["original", "resized"] = "original"
    test_size: Positive = 473
    # The square canvas at `original` resolution (docs/protocol.md section 4): `pfenet` (test_Resize), `bam`
    # (BAM's Resize), `mean` (fssmeta's earlier mean-colour canvas), or `method` = the method's own
    # (`Method.canvas`).
    canvas: Literal["method", "pfenet", "bam", "mean"] = "method"
    resized_size: Positive = 400
    episode_order: Literal["image", "class"] = "image"
    folds: Annotated[tuple[NonNegative, ...], Field(min_length=1)] = (0, 1, 2, 3)
    shots: Annotated[tuple[Positive, ...], Field(min_length=1)] = (1, 5)
    episodes: NonNegative = 0  # episodes scored per list; 0 = the whole list
    batch_size: Positive = 1  # `original` resolution scores every query at its own size: 1
    num_workers: NonNegative = 0
    amp: Amp = "off"  # bf16 autocast in evaluation (see `Amp`); fp32 by default: bf16 moves BAM's psi ~5%
    feature_cache_mib: NonNegative = 1024  # frozen features reused per image, exact at batch_size 1; 0 = off
    out: str = "results"
    baseline_threshold: float = 0.5  # the non-learned prototype baseline's cut on min-max cosine
    # Cross-domain: which source model scores the data.targets lists (docs/protocol.md section 5). `all` =
    # PATNet's: one model trained on every source class (its own stage 1 and meta stage), selected on held-out
    # source images; `splits` = RMT's: every eval.folds model, per-split rows and their mean; `fold` = the
    # `target_fold` model alone (fssmeta's earlier shortcut, neither paper's protocol).
    target_source: Literal["all", "splits", "fold"] = "all"
    target_fold: int = 0  # the fold of `target_source: fold`, and whose version promotion takes to `source`
    # none: the trained weights as they are; tta: adapted per episode on its supports (fssmeta/adaptation.py);
    # finetune: adapted per episode on its labelled supports, each predicted from the others (CRNet's k-shot).
    # `regime` is that of `fssmeta evaluate` and the evaluate stage; `target_regimes` those the
    # evaluate_targets stage scores, each to its own results file (the report never mixes them).
    regime: Regime = "none"
    target_regimes: Annotated[tuple[Regime, ...], Field(min_length=1)] = ("none",)
    tta: TTAConfig = TTAConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _one_episode_at_a_time(self) -> EvalConfig:
        adapting = sorted({"tta", "finetune"} & {self.regime, *self.target_regimes})
        if self.batch_size != 1 and adapting:
            raise ValueError(f"eval.regime / eval.target_regimes {' / '.join(adapting)} adapts one episode at a time: it needs "
                             f"eval.batch_size 1 (got {self.batch_size})")
        return self

    @model_validator(mode="after")
    def _cache_at_batch_one(self) -> EvalConfig:
        # The cache's exactness contract is one episode per batch (models/feature_cache.py).
        if self.feature_cache_mib > 0 and self.batch_size != 1:
            raise ValueError(f"eval.feature_cache_mib {self.feature_cache_mib} needs eval.batch_size 1 (got "
                             f"{self.batch_size}): the cache is exact one episode at a time; set "
                             "eval.feature_cache_mib: 0 to score in batches")
        return self

    @property
    def size(self) -> int:
        """The model input side at test time: `test_size` (original) or `resized_size` (resized)."""
        return self.test_size if self.resolution == "original" else self.resized_size
