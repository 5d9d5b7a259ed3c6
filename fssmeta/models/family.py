"""The PFENet-family front end: frozen support / query features, per-shot priors and prototypes, the reduced
mid-level features (optionally restyled by the RMT memory), and the frozen-backbone base class.

PFENet, BAM and NTRENet start every forward with `meta_inputs`; the memory (models/memory.py) plugs in here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import SGD_RECIPE
from fssmeta.episode import DIAGNOSTIC_PREFIX, Episode
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet
from fssmeta.models.feature_cache import FeatureCache, digest
from fssmeta.models.memory import MemoryTransfer

# PFENet's PASCAL recipe: base_lr 0.0025 with every parameter group at 10x (its poly schedule, index_split -1),
# an effective 0.025 at its batch of 4; SGD momentum 0.9, weight decay 1e-4, poly 0.9. NTRENet trains the same.
PFENET_RECIPE = SGD_RECIPE.model_copy(update={"lr": 0.025})


class SupportFeatures(NamedTuple):
    """Frozen backbone features of the B*S support images, shot-major within each episode."""

    layer2: torch.Tensor  # (B*S, C2, h, w)
    layer3: torch.Tensor | None  # (B*S, C3, h, w); None once `meta_inputs` has reduced it (memory)
    layer4: torch.Tensor  # (B*S, C4, h, w), computed from layer3 * mask (the object only)
    fg_mask: torch.Tensor  # (B*S, H, W) float, 1 = the episode's class


@torch.no_grad()
def support_features(backbone: ResNet, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                     cache: FeatureCache | None = None) -> SupportFeatures:
    """Run the frozen backbone on (B, S, 3, H, W) supports with (B, S, H, W) 0/1/255 masks.

    Layer4 sees only the object: PFENet multiplies layer3 by the mask (bilinear, align_corners) before layer4,
    so the prior compares the query with object features uncontaminated by the support background.
    One backbone pass per shot over the B episodes, as the official code does: with BN in train mode
    (`Method.backbone_bn`) the batch statistics are then those of one shot's B supports, not of all B*S.
    With a `cache` (eval, B = 1: feature_cache.active_cache) each shot comes through it (`_cached_shot`).
    """
    B, S = support_imgs.shape[:2]
    fg_mask = ops.foreground(support_masks.flatten(0, 1))  # (B*S, H, W)
    shot_masks = fg_mask.view(B, S, *fg_mask.shape[1:])
    stacked: list[torch.Tensor] = []  # layer2, layer3, layer4 as (B, S, ...), filled shot by shot
    for s in range(S):
        if cache is not None:
            shot = _cached_shot(backbone, support_imgs[:, s], shot_masks[:, s], cache)
        else:
            layer2, layer3 = _mid_features(backbone, support_imgs[:, s])  # (B, C2 / C3, h, w)
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


def _cached_shot(backbone: ResNet, img: torch.Tensor, fg: torch.Tensor, cache: FeatureCache,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One shot of `support_features` through the cache: (1, 3, H, W) image, (1, H, W) float 0/1 foreground
    -> layer2, layer3 keyed by the image; layer4 (of layer3 * mask, the same ops) by image and mask."""
    image = digest(img)
    layer2, layer3 = cache.get_or_compute(("mid", image), lambda: _mid_features(backbone, img))
    layer4 = cache.get_or_compute(("masked_layer4", image, digest(fg.bool())),
                                  lambda: _masked_layer4(backbone, layer3, fg))
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

    With a `memory` (RMT), the mid-level concat(layer3, layer2) features of query and supports are restyled by
    the memory before the reduction; in training the raw statistics are written to the bank (the memory
    contract: the write happens here, inside `forward`, once per training step, see models/memory.py) and
    the category contrastive loss compares the raw and restyled query views. With a `cache`
    (feature_cache.active_cache: eval, one episode) the frozen features come through it, layer2..layer4 only.
    """
    B, S = episode.support_imgs.shape[:2]
    query_key = None
    with torch.no_grad():
        if cache is None:  # the layers the models read; layer0 and layer1 (43 MB at 473) are let go
            query = {k: v for k, v in backbone(episode.query_img).items() if k in ("layer2", "layer3", "layer4")}
        else:
            query_key = digest(episode.query_img)
            query = query_features(backbone, episode.query_img, query_key, cache)
    support = support_features(backbone, episode.support_imgs, episode.support_masks, cache)
    query_mid = torch.cat([query["layer3"], query["layer2"]], 1)  # (B, C3 + C2, h, w)

    def reduce(down: nn.Module, mid: torch.Tensor) -> torch.Tensor:
        return down(mid if memory is None else memory.restyle(mid))

    losses: dict[str, torch.Tensor] = {}
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
        if memory.contrast_weight > 0:
            losses["memory_contrast"] = memory.contrast_loss(down_query(query_mid), query_feat,
                                                             episode.query_mask, episode.class_id)
        memory.observe(query_mid, supp_mid)  # after the reads: this step's restyling used the old bank
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
