"""Test-time adaptation on the support set, one episode at a time: one mechanism (`EpisodeAdaptation`), two
regimes that differ only in the views it trains on (`REGIME_VIEWS`): `tta` (`eval.tta.views`: by default
`support_views`, below) and
`finetune` (`labelled_views`: CRNet's k-shot inference, each labelled support predicted from the others).

`tta`: per episode, a copy-free fine-tune of the model's learnable parameters (or the modules `eval.tta.modules`
names) on the episode's SUPPORT images only: each step takes one support shot (shot `step % S`), flipped
left-right, as the query, with the episode's own supports (all S of them, unflipped) as the support set, and
minimises the cross-entropy of the model's output against that shot's flipped mask. The query image is
then predicted with the adapted weights (or, with `blend` < 1 and no held-out check, the trained weights
moved that share of the way to them; `check: holdout` keeps or drops a change whole, on a held-out
support), and every adapted parameter is put back before the next episode
(also when a step fails). The query's mask is never read: adaptation sees only what a user gives (the k
labelled supports). This is the support-as-its-own-query scheme of the strongest cross-domain methods
(ABCDFSS, IFA), with one fixed augmentation so that the frozen features of both views are computed once per
episode (the feature cache of evaluation keeps them; models/feature_cache.py).

Bounded: `steps` forward / backward passes of one view, whatever the shot, and a fresh optimiser
(`optimizer`, `lr`) per episode, so no state crosses episodes; the settings are the regime's own section
(`eval.tta`, `eval.finetune`).
Plain PyTorch: the scoring loop (`train.evaluate`) calls the wrapper like any model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fssmeta.config import TTAConfig
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import cross_entropy


def adapted_parameters(model: nn.Module, modules: tuple[str, ...] = (), section: str = "eval.tta",
                       ) -> dict[str, nn.Parameter]:
    """The parameters test-time adaptation may change: every learnable (requires_grad) parameter, or those
    under the module prefixes `modules` (e.g. ("cls_meta", "ensemble")). An unknown prefix is an error naming
    the modules that exist, so a typo cannot silently adapt nothing; `section` names the settings in it."""
    learnable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not modules:
        return learnable
    chosen = {name: p for name, p in learnable.items()
              if any(name == m or name.startswith(m + ".") for m in modules)}
    missing = [m for m in modules if not any(n == m or n.startswith(m + ".") for n in learnable)]
    if missing:
        tops = sorted({n.split(".")[0] for n in learnable})
        raise ValueError(f"{section}.modules: {missing} hold no learnable parameter of {type(model).__name__} "
                         f"(its learnable modules: {tops})")
    return chosen


def flipped_view(episode: Episode, shot: int, order: list[int] | None = None) -> Episode:
    """Support `shot`'s image and mask flipped left-right as the query, predicted from the supports in
    `order` (None: the episode's own, unchanged). Reads nothing of the episode's query."""
    imgs, masks = episode.support_imgs, episode.support_masks
    if order is not None:
        imgs, masks = imgs[:, order], masks[:, order]
    return Episode(imgs, masks, episode.support_imgs[:, shot].flip(-1), episode.support_masks[:, shot].flip(-1),
                   episode.class_id)


def support_views(episode: Episode, shot: int) -> Episode:
    """The support-as-query episode of `shot`: that shot flipped as the query, the episode's supports
    unchanged (itself among them)."""
    return flipped_view(episode, shot)


def labelled_views(episode: Episode, shot: int) -> Episode:
    """The `finetune` view of `shot` (CRNet's k-shot fine-tuning): that shot's image and mask as the query,
    predicted from the OTHER k - 1 labelled supports; with one support, that support flipped left-right,
    predicted from itself (`support_views`). Reads nothing of the episode's query."""
    shots = episode.support_imgs.shape[1]
    if shots == 1:
        return support_views(episode, 0)
    others = [s for s in range(shots) if s != shot]
    return Episode(episode.support_imgs[:, others], episode.support_masks[:, others],
                   episode.support_imgs[:, shot], episode.support_masks[:, shot], episode.class_id)


def other_views(episode: Episode, shot: int) -> Episode:
    """The `eval.tta.views: others` view of `shot`: that shot's image and mask flipped left-right as the query,
    predicted from the episode's supports with that shot replaced by the next one (`shot + 1` mod S), so the
    support set keeps its size (BAM's k-shot weights are built for S) and never holds the query's own image.
    With one support there is no other: `support_views`. Reads nothing of the episode's query."""
    shots = episode.support_imgs.shape[1]
    if shots == 1:
        return support_views(episode, 0)
    return flipped_view(episode, shot, [s if s != shot else (shot + 1) % shots for s in range(shots)])


def without_order(shots: int, held: int) -> list[int]:
    """Support indices with `held` left out, padded back to `shots` by repeating the others in order (BAM's
    k-shot weights are built for S): the support set of `check: holdout`, which never holds the held-out
    image."""
    rest = [s for s in range(shots) if s != held]
    return [rest[i % len(rest)] for i in range(shots)]


def foreground_iou(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """IoU of the predicted foreground (argmax = 1) with `mask` == 1, ignored (255) pixels left out; 1 when
    both are empty."""
    pred, valid = logits.argmax(1) == 1, mask != 255
    target = (mask == 1) & valid
    pred = pred & valid
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union


Views = Callable[[Episode, int], Episode]
# `eval.tta.views`: what the support-as-query views train on.
TTA_VIEWS: dict[str, Views] = {"flip": support_views, "others": other_views}
# The regimes that adapt, each with the views it trains on given its settings; `none` is the model as trained.
REGIME_VIEWS: dict[str, Callable[[TTAConfig], Views]] = {
    "tta": lambda cfg: TTA_VIEWS[cfg.views],
    "finetune": lambda cfg: labelled_views,
}


class EpisodeAdaptation(nn.Module):
    """Wraps a trained model: `forward(episode)` adapts on views of the supports (`views(episode, shot)`, shot
    `step % S` at each step), predicts the query, restores. `regime` names it in errors.

    Use in eval mode (BN statistics and dropout fixed while adapting). `feature_cache` reads and sets the
    wrapped model's, so `feature_cache.caching(wrapper, cache)` reaches the model that reads it.
    """

    def __init__(self, model: nn.Module, cfg: TTAConfig, views: Views = support_views, regime: str = "tta") -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.views = views
        self.regime = regime
        self.params = adapted_parameters(model, cfg.modules, f"eval.{regime}")
        if not self.params:
            raise ValueError(f"eval.regime {regime}: {type(model).__name__} has no learnable parameter to adapt")
        self.last_losses: list[float] = []  # the adaptation losses of the last episode (diagnostics, tests)
        self.last_kept = True  # check: holdout kept the last episode's adaptation (diagnostics, tests)

    @property
    def feature_cache(self) -> Any:
        return getattr(self.model, "feature_cache", None)

    @feature_cache.setter
    def feature_cache(self, cache: Any) -> None:
        self.model.feature_cache = cache

    def _optimizer(self) -> torch.optim.Optimizer:
        params = list(self.params.values())
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9)
        return torch.optim.Adam(params, lr=self.cfg.lr)

    def forward(self, episode: Episode) -> SegOutput:
        if episode.query_img.shape[0] != 1:
            raise ValueError(f"eval.regime {self.regime} adapts one episode at a time: got a batch of "
                             f"{episode.query_img.shape[0]} (set eval.batch_size: 1)")
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        shots = episode.support_imgs.shape[1]
        holdout = self.cfg.check == "holdout" and shots > 1
        train_on, train_shots = episode, shots
        if holdout:  # the last support is held out: adapt on the others, check on it
            order = without_order(shots, shots - 1)
            train_on = episode._replace(support_imgs=episode.support_imgs[:, order],
                                        support_masks=episode.support_masks[:, order])
            train_shots = shots - 1
            check = flipped_view(episode, shots - 1, order)
        optimizer = self._optimizer()
        self.last_losses = []
        self.last_kept = True
        try:
            if holdout:
                with torch.no_grad():
                    before = foreground_iou(self.model(check).logits, check.query_mask)
            with torch.enable_grad():
                for step in range(self.cfg.steps):
                    view = self.views(train_on, step % train_shots)
                    loss = cross_entropy(self.model(view).logits, view.query_mask)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    self.last_losses.append(loss.item())
            with torch.no_grad():
                if self.cfg.blend < 1 and not holdout:  # an unchecked change is hedged; a checked one is kept whole
                    for name, p in self.params.items():
                        p.lerp_(saved[name], 1 - self.cfg.blend)
                if holdout and foreground_iou(self.model(check).logits, check.query_mask) < before:
                    self.last_kept = False  # adapting made the held-out support worse: predict as trained
                    for name, p in self.params.items():
                        p.copy_(saved[name])
                return self.model(episode)
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])
                    p.grad = None


def with_regime(model: nn.Module, regime: str, cfg: TTAConfig) -> nn.Module:
    """`model` as scored under `eval.regime`: itself (`none`) or wrapped in `EpisodeAdaptation` with the
    regime's views (`tta`, `finetune`); `cfg` is that regime's settings (`eval.tta` or `eval.finetune`)."""
    if regime == "none":
        return model
    if regime in REGIME_VIEWS:
        return EpisodeAdaptation(model, cfg, REGIME_VIEWS[regime](cfg), regime)
    raise ValueError(f"eval.regime: {regime!r} is not none, {' or '.join(REGIME_VIEWS)}")
