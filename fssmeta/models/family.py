"""The PFENet-family front end: frozen support / query features, per-shot priors and prototypes, the reduced
mid-level features (optionally restyled by the RMT memory), and the frozen-backbone base class.

PFENet, BAM and NTRENet start every forward with `meta_inputs`; the memory (models/memory.py) plugs in here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import SGD_RECIPE
from fssmeta.episode import DIAGNOSTIC_PREFIX, Episode
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet
from fssmeta.models.feature_cache import FeatureCache, digest
from fssmeta.models.memory import MemoryTransfer, instance_stats

# PFENet's PASCAL recipe: base_lr 0.0025 with every parameter group at 10x (its poly schedule, index_split -1),
# an effective 0.025 at its batch of 4; SGD momentum 0.9, weight decay 1e-4, poly 0.9. NTRENet trains the same.
PFENET_RECIPE = SGD_RECIPE.model_copy(update={"lr": 0.025})


class SupportFeatures(NamedTuple):
    """Frozen backbone features of the B*S support images, shot-major within each episode."""

    layer2: torch.Tensor  # (B*S, C2, h, w)
    layer3: torch.Tensor | None  # (B*S, C3, h, w); None once `meta_inputs` has reduced it (memory)
    layer4: torch.Tensor  # (B*S, C4, h, w), computed from layer3 * mask (the object only)
    fg_mask: torch.Tensor  # (B*S, H, W) float, 1 = the episode's class


# (layer2, layer3) -> the same two restyled: the memory's `backbone` scope (`meta_inputs`), applied before layer4.
Style = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def support_features(backbone: ResNet, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                     cache: FeatureCache | None = None, style: Style | None = None) -> SupportFeatures:
    """Run the frozen backbone on (B, S, 3, H, W) supports with (B, S, H, W) 0/1/255 masks.

    Layer4 sees only the object: PFENet multiplies layer3 by the mask (bilinear, align_corners) before layer4,
    so the prior compares the query with object features uncontaminated by the support background.
    One backbone pass per shot over the B episodes, as the official code does: with BN in train mode
    (`Method.backbone_bn`) the batch statistics are then those of one shot's B supports, not of all B*S.
    With a `cache` (eval, B = 1: feature_cache.active_cache) each shot comes through it (`_cached_shot`).
    With a `style`, layer2 and layer3 are restyled first and layer4 is computed from the restyled layer3.
    """
    B, S = support_imgs.shape[:2]
    fg_mask = ops.foreground(support_masks.flatten(0, 1))  # (B*S, H, W)
    shot_masks = fg_mask.view(B, S, *fg_mask.shape[1:])
    stacked: list[torch.Tensor] = []  # layer2, layer3, layer4 as (B, S, ...), filled shot by shot
    for s in range(S):
        if cache is not None:
            shot = _cached_shot(backbone, support_imgs[:, s], shot_masks[:, s], cache, style)
        else:
            layer2, layer3 = _mid_features(backbone, support_imgs[:, s])  # (B, C2 / C3, h, w)
            if style is not None:
                layer2, layer3 = style(layer2, layer3)
            shot = (layer2, layer3, _masked_layer4(backbone, layer3, shot_masks[:, s]))
        if S == 1:  # already the layout below: no copy
            return SupportFeatures(*shot, fg_mask)
        # Each shot is copied in as it comes and dropped, rather than all kept and stacked at the end: at
        # ResNet-50 473 and 5 shots that held 258 MB twice.
        stacked = stacked or [t.new_empty((B, S, *t.shape[1:])) for t in shot]
        for out, t in zip(stacked, shot, strict=True):
            out[:, s] = t
        del shot
    # (B, S, ...) flattened shot-major within each episode, the order of `fg_mask`
    layer2, layer3, layer4 = (t.flatten(0, 1) for t in stacked)
    return SupportFeatures(layer2, layer3, layer4, fg_mask)


def _mid_features(backbone: ResNet, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) -> layer2 and layer3, the same modules in the same order as `backbone(img)`."""
    layer2 = backbone.layer2(backbone.layer1(backbone.layer0(img)))
    return layer2, backbone.layer3(layer2)


def _masked_layer4(backbone: ResNet, layer3: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """layer4 of (B, C3, h, w) layer3 times the (B, H, W) float foreground, resized as PFENet does."""
    mask = F.interpolate(fg[:, None], size=layer3.shape[-2:], mode="bilinear", align_corners=True)
    return backbone.layer4(layer3 * mask)


def query_features(backbone: ResNet, img: torch.Tensor, image: str,
                   cache: FeatureCache) -> dict[str, torch.Tensor]:
    """`backbone(img)` through the cache for a (1, 3, H, W) query of digest `image`, only the layers the
    models read: layer2 and layer3 (the entry its support role shares) and layer4."""
    layer2, layer3 = cache.get_or_compute(("mid", image), lambda: _mid_features(backbone, img))
    layer4 = cache.get_or_compute(("layer4", image), lambda: backbone.layer4(layer3))
    return {"layer2": layer2, "layer3": layer3, "layer4": layer4}


def _styled_mid(backbone: ResNet, img: torch.Tensor, image: str, cache: FeatureCache,
                style: Style | None) -> tuple[torch.Tensor, torch.Tensor]:
    """layer2, layer3 of a cached image, restyled by `style` when given (eval: the bank and test_alpha are
    fixed, so the restyled features depend on the image alone and are cached under their own key; the raw ones
    are not kept, since nothing reads them at that scope)."""
    if style is None:
        return cache.get_or_compute(("mid", image), lambda: _mid_features(backbone, img))
    return cache.get_or_compute(("styled_mid", image), lambda: style(*_mid_features(backbone, img)))


def _cached_shot(backbone: ResNet, img: torch.Tensor, fg: torch.Tensor, cache: FeatureCache,
                 style: Style | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One shot of `support_features` through the cache: (1, 3, H, W) image, (1, H, W) float 0/1 foreground
    -> layer2, layer3 keyed by the image; layer4 (of layer3 * mask, the same ops) by image and mask."""
    image = digest(img)
    layer2, layer3 = _styled_mid(backbone, img, image, cache, style)
    layer4 = cache.get_or_compute(("masked_layer4" if style is None else "styled_masked_layer4", image,
                                   digest(fg.bool())), lambda: _masked_layer4(backbone, layer3, fg))
    return layer2, layer3, layer4


@torch.no_grad()
def shot_priors(query_layer4: torch.Tensor, support: SupportFeatures, size: tuple[int, int]) -> torch.Tensor:
    """One prior mask per shot: (B, C4, h, w) query x (B*S) supports -> (B, S, h', w') at `size`."""
    B = query_layer4.shape[0]
    shots = support.layer4.shape[0] // B
    layer4 = support.layer4.view(B, shots, *support.layer4.shape[1:])
    fg_mask = support.fg_mask.view(B, shots, *support.fg_mask.shape[1:])
    # Shot by shot, as the official code: the (B, Ns, Nq) similarity of all shots at once is S times the
    # memory (260 MB more at ResNet-50 473, 5 shots), freshly mapped on every call, and slower on CPU.
    priors = [ops.prior_mask(query_layer4, layer4[:, s], fg_mask[:, s]) for s in range(shots)]  # (B, 1, h, w)
    prior = torch.cat(priors, 1)  # (B, S, h, w)
    if prior.shape[-2:] != size:
        prior = F.interpolate(prior, size=size, mode="bilinear", align_corners=True)
    return prior


class MetaInputs(NamedTuple):
    """What every PFENet-family meta learner starts from."""

    query: dict[str, torch.Tensor]  # frozen backbone features of the query, "layer2".."layer4"
    support: SupportFeatures
    query_feat: torch.Tensor  # (B, D, h, w) reduced mid-level query feature
    prototypes: torch.Tensor  # (B, S, D) masked-average support prototype per shot
    priors: torch.Tensor  # (B, S, h, w) prior mask per shot
    supp_feat: torch.Tensor  # (B*S, D, h, w) reduced mid-level support features, shot-major per episode
    losses: dict[str, torch.Tensor]  # weighted losses of the memory (training only), else empty
    query_key: str | None = None  # the query's content digest when a feature cache is active, else None

    def shot_average(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PFENet's k-shot rule: the mean prototype (B, D) and the mean prior (B, 1, h, w) over shots."""
        return self.prototypes.mean(1), self.priors.mean(1, keepdim=True)


def meta_inputs(backbone: nn.Module, down_query: nn.Module, down_supp: nn.Module, episode: Episode,
                memory: MemoryTransfer | None = None, cache: FeatureCache | None = None) -> MetaInputs:
    """Frozen features, reduced mid-level features, per-shot prototypes and priors (PFENet, BAM, ...).

    With a `memory` (RMT) the concat(layer3, layer2) features of query and supports are restyled by the memory:
    scope `mid` restyles the input of the reduction only; scope `backbone` restyles the frozen layer2 / layer3
    themselves, so layer4 (recomputed from the restyled layer3: the prior, BAM's base learner) and layer2 (BAM's
    Gram psi) are restyled too. In training the RAW statistics are written to the bank after the reads (the
    memory contract: the write happens here, inside `forward`, once per training step, see models/memory.py),
    the category contrastive loss compares the raw and restyled query views and the prototype loss segments
    the query by its restyled prototypes. With a `cache` (feature_cache.active_cache: eval, one episode) the
    frozen features come through it, layer2..layer4 only.
    """
    B, S = episode.support_imgs.shape[:2]
    query_key = None
    scope_backbone = memory is not None and memory.scope == "backbone"
    raw_stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # training, scope backbone: written after the reads

    def style(layer2: torch.Tensor, layer3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = torch.cat([layer3, layer2], 1)
        if memory.training:
            raw_stats.append(instance_stats(mid.float()))
        styled = memory.restyle(mid)
        return styled[:, layer3.shape[1]:], styled[:, :layer3.shape[1]]

    raw_query_mid = None  # the unstyled query mid-level feature where the memory's training losses need it
    with torch.no_grad():
        if cache is not None:
            query_key = digest(episode.query_img)
        if not scope_backbone and cache is None:  # the layers the models read; layer0 and layer1 are let go
            query = {k: v for k, v in backbone(episode.query_img).items() if k in ("layer2", "layer3", "layer4")}
        elif not scope_backbone:
            query = query_features(backbone, episode.query_img, query_key, cache)
        elif cache is None:
            layer2, layer3 = _mid_features(backbone, episode.query_img)
            if memory.training:
                raw_query_mid = torch.cat([layer3, layer2], 1)
            layer2, layer3 = style(layer2, layer3)
            query = {"layer2": layer2, "layer3": layer3, "layer4": backbone.layer4(layer3)}
        else:
            layer2, layer3 = _styled_mid(backbone, episode.query_img, query_key, cache, style)
            layer4 = cache.get_or_compute(("styled_layer4", query_key), lambda: backbone.layer4(layer3))
            query = {"layer2": layer2, "layer3": layer3, "layer4": layer4}
    support = support_features(backbone, episode.support_imgs, episode.support_masks, cache,
                               style if scope_backbone else None)
    query_mid = torch.cat([query["layer3"], query["layer2"]], 1)  # (B, C3 + C2, h, w)

    def reduce(down: nn.Module, mid: torch.Tensor) -> torch.Tensor:
        return down(mid if memory is None or scope_backbone else memory.restyle(mid))

    losses: dict[str, torch.Tensor] = {}  # the memory's, in training
    query_feat = reduce(down_query, query_mid)  # (B, D, h, w)
    if S > 1 and not down_supp.training and (memory is None or not memory.training):
        # Evaluation at k shots: B rows (a shot's worth) at a time, so that the concat of every shot's
        # mid-level features (110 MB at ResNet-50 473, 5 shots) never exists at once. Per-row modules only.
        supp_feat = torch.cat([reduce(down_supp, torch.cat([l3, l2], 1))
                               for l3, l2 in zip(support.layer3.split(B), support.layer2.split(B), strict=True)])
    else:
        supp_mid = torch.cat([support.layer3, support.layer2], 1)  # (B*S, C3 + C2, h, w)
        supp_feat = reduce(down_supp, supp_mid)  # (B*S, D, h, w)
    if memory is not None and memory.training:
        losses = memory.step_losses(episode, down_query, query_mid if raw_query_mid is None else raw_query_mid,
                                    query_feat, supp_feat, support.fg_mask)
        # After the reads: this step's restyling used the old bank.
        if scope_backbone:
            memory.observe_stats(raw_stats)
        else:
            memory.observe(query_mid, supp_mid)
    support = support._replace(layer3=None)  # read only by the reduction above: let it go (74 MB at 5 shots)
    prototypes = ops.masked_average_pool(supp_feat, support.fg_mask).view(B, S, -1)  # (B, S, D)
    priors = shot_priors(query["layer4"], support, (query_feat.shape[-2], query_feat.shape[-1]))
    return MetaInputs(query, support, query_feat, prototypes, priors, supp_feat, losses, query_key)


def memory_losses(memory: MemoryTransfer | None, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The memory's weighted losses plus its orthogonality as a diagnostic (logged, not minimised)."""
    if memory is None or not memory.training:
        return losses
    return {**losses, DIAGNOSTIC_PREFIX + "memory_orth": memory.orthogonality()}


def mid_channels(backbone: ResNet) -> int:
    """Width of the mid-level concat(layer3, layer2) features: 1024 + 512 at ResNet-50."""
    return backbone.channels["layer3"] + backbone.channels["layer2"]


class FrozenBackboneModel(nn.Module):
    """Base of the meta learners over a frozen `self.backbone` (no gradients). `backbone_bn` is the BN
    convention in training (`Method.bn_mode`): "frozen" keeps the backbone in eval mode (fixed running
    statistics); "train" leaves its BN in train mode, as PFENet's and NTRENet's official trainers do (batch
    statistics, running averages updated under no_grad). Evaluation is eval mode either way."""

    backbone: nn.Module
    backbone_bn: str = "frozen"
    feature_cache: FeatureCache | None = None  # evaluation's frozen-feature cache (feature_cache.caching)

    def train(self, mode: bool = True) -> FrozenBackboneModel:
        super().train(mode)
        if self.backbone_bn == "frozen":
            self.backbone.eval()
        return self
