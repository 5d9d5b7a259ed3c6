"""PFENet (Tian et al., TPAMI 2020): training-free prior mask + feature enrichment on a frozen deep-stem ResNet.

Follows dvlab-research/PFENet `model/PFENet.py` layer for layer. One generalisation: the pyramid bins are
sizes at the training input, whose feature map is `pyramid_bins[0]` wide (60 at 473); on another feature
size every bin scales proportionally (`scaled_bins`), so small inputs work. At the reference size the bins
are exactly PFENet's. The support-feature helpers here are shared with BAM, whose meta learner is PFENet's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta import memory as rmt
from fssmeta.config import ModelConfig
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import DIAGNOSTIC_PREFIX
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet, build_backbone, freeze_

if TYPE_CHECKING:  # fssmeta.memory imports fssmeta.models.ops: a runtime import here would be circular
    from fssmeta.memory import MemoryTransfer


class SupportFeatures(NamedTuple):
    """Frozen backbone features of the B*S support images, shot-major within each episode."""

    layer2: torch.Tensor  # (B*S, C2, h, w)
    layer3: torch.Tensor  # (B*S, C3, h, w)
    layer4: torch.Tensor  # (B*S, C4, h, w), computed from layer3 * mask (the object only)
    fg_mask: torch.Tensor  # (B*S, H, W) float, 1 = the episode's class


def foreground(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) 0/1/255 labels -> float 0/1. As in PFENet, 255 (ignore) counts as not-the-class."""
    return (masks == 1).float()


@torch.no_grad()
def support_features(backbone: ResNet, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> SupportFeatures:
    """Run the frozen backbone on (B, S, 3, H, W) supports with (B, S, H, W) 0/1/255 masks.

    Layer4 sees only the object: PFENet multiplies layer3 by the mask (bilinear, align_corners) before layer4,
    so the prior compares the query with object features uncontaminated by the support background.
    """
    images = support_imgs.flatten(0, 1)  # (B*S, 3, H, W)
    fg_mask = foreground(support_masks.flatten(0, 1))  # (B*S, H, W)
    feat = backbone.layer1(backbone.layer0(images))
    layer2 = backbone.layer2(feat)
    layer3 = backbone.layer3(layer2)
    mask = F.interpolate(fg_mask[:, None], size=layer3.shape[-2:], mode="bilinear", align_corners=True)
    layer4 = backbone.layer4(layer3 * mask)
    return SupportFeatures(layer2, layer3, layer4, fg_mask)


@torch.no_grad()
def shot_priors(query_layer4: torch.Tensor, support: SupportFeatures, size: tuple[int, int]) -> torch.Tensor:
    """One prior mask per shot: (B, C4, h, w) query x (B*S) supports -> (B, S, h', w') at `size`."""
    shots = support.layer4.shape[0] // query_layer4.shape[0]
    query = query_layer4.repeat_interleave(shots, dim=0)  # (B*S, C4, h, w), aligned with the supports
    prior = ops.prior_mask(query, support.layer4, support.fg_mask)  # (B*S, 1, h, w)
    if prior.shape[-2:] != size:
        prior = F.interpolate(prior, size=size, mode="bilinear", align_corners=True)
    return prior.view(-1, shots, *size)


class MetaInputs(NamedTuple):
    """What every PFENet-family meta learner starts from."""

    query: dict[str, torch.Tensor]  # frozen backbone features of the query, "layer0".."layer4"
    support: SupportFeatures
    query_feat: torch.Tensor  # (B, D, h, w) reduced mid-level query feature
    prototypes: torch.Tensor  # (B, S, D) masked-average support prototype per shot
    priors: torch.Tensor  # (B, S, h, w) prior mask per shot
    supp_feat: torch.Tensor  # (B*S, D, h, w) reduced mid-level support features, shot-major per episode
    losses: dict[str, torch.Tensor]  # weighted losses of the memory (training only), else empty

    def shot_average(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PFENet's k-shot rule: the mean prototype (B, D) and the mean prior (B, 1, h, w) over shots."""
        return self.prototypes.mean(1), self.priors.mean(1, keepdim=True)


def meta_inputs(backbone: nn.Module, down_query: nn.Module, down_supp: nn.Module, episode: Episode,
                memory: MemoryTransfer | None = None) -> MetaInputs:
    """Frozen features, reduced mid-level features, per-shot prototypes and priors (PFENet, BAM, ...).

    With a `memory` (RMT), the mid-level concat(layer3, layer2) features of query and supports are restyled by
    the memory before the reduction; in training the raw statistics are written to the bank and the category
    contrastive loss compares the raw and restyled query views.
    """
    B, S = episode.support_imgs.shape[:2]
    with torch.no_grad():
        query = backbone(episode.query_img)
    support = support_features(backbone, episode.support_imgs, episode.support_masks)
    query_mid = torch.cat([query["layer3"], query["layer2"]], 1)  # (B, C3 + C2, h, w)
    supp_mid = torch.cat([support.layer3, support.layer2], 1)  # (B*S, C3 + C2, h, w)
    losses: dict[str, torch.Tensor] = {}
    if memory is None:
        query_feat, supp_feat = down_query(query_mid), down_supp(supp_mid)  # (B, D, h, w), (B*S, D, h, w)
    else:
        query_feat, supp_feat = down_query(memory.restyle(query_mid)), down_supp(memory.restyle(supp_mid))
        if memory.training:
            if memory.contrast_weight > 0:
                losses["memory_contrast"] = memory.contrast_loss(down_query(query_mid), query_feat,
                                                                 episode.query_mask, episode.class_id)
            memory.observe(query_mid, supp_mid)  # after the reads: this step's restyling used the old bank
    prototypes = ops.masked_average_pool(supp_feat, support.fg_mask).view(B, S, -1)  # (B, S, D)
    priors = shot_priors(query["layer4"], support, (query_feat.shape[-2], query_feat.shape[-1]))
    return MetaInputs(query, support, query_feat, prototypes, priors, supp_feat, losses)


def reduce_block(in_dim: int, out_dim: int, dropout: float = 0.5) -> nn.Sequential:
    """PFENet's down_query / down_supp: 1x1 conv -> ReLU -> Dropout2d(0.5) (the official constant)."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(dropout))


def residual_pair(dim: int) -> nn.Sequential:
    """Two 3x3 conv + ReLU; callers add the input back (PFENet's beta_conv / res2)."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
    )


def classifier(dim: int, dropout: float, classes: int = 2) -> nn.Sequential:
    """PFENet's cls / inner_cls head: 3x3 conv -> ReLU -> Dropout2d -> 1x1 conv to `classes`."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
        nn.Conv2d(dim, classes, 1),
    )


def scaled_bins(bins: tuple[int, ...], size: tuple[int, int]) -> list[tuple[int, int]]:
    """Pyramid bins for an (h, w) feature map; `bins[0]` is the feature size they were chosen for.

    Approximate for non-reference sizes (PFENet uses fixed bins at 60x60): bin = max(1, round(b * h / bins[0])).
    """
    h, w = size
    ref = bins[0]
    return [(max(1, int(b * h / ref + 0.5)), max(1, int(b * w / ref + 0.5))) for b in bins]


class FrozenBackboneModel(nn.Module):
    """Base of the meta learners over a frozen `self.backbone`: `train()` keeps it in eval mode."""

    backbone: nn.Module

    def train(self, mode: bool = True) -> FrozenBackboneModel:
        super().train(mode)
        self.backbone.eval()  # frozen BN: ImageNet running statistics stay fixed (PFENet's fix_bn)
        return self


class PFENet(FrozenBackboneModel):
    """Prior-guided feature enrichment network; the backbone is frozen and kept in eval mode."""

    def __init__(self, *, backbone: ResNet, reduce_dim: int = 256, pyramid_bins: tuple[int, ...] = (60, 30, 15, 8),
                 dropout: float = 0.1, feature_dropout: float = 0.5, shot: int = 1,
                 memory: MemoryTransfer | None = None) -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.memory = memory  # RMT feature restyling (fssmeta.memory), or None
        self.pyramid_bins = tuple(pyramid_bins)
        self.shot = shot  # shots it is trained for; forward averages over however many an episode has
        mid_dim = mid_channels(backbone)
        self.down_query = reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.down_supp = reduce_block(mid_dim, reduce_dim, feature_dropout)
        # Feature enrichment: per scale, merge [query, prototype, prior]; from the second scale on, also merge
        # the previous (coarser-to-finer in PFENet's order: 60 -> 8) scale's output.
        self.init_merge = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * reduce_dim + 1, reduce_dim, 1, bias=False), nn.ReLU(inplace=True))
            for _ in pyramid_bins
        )
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * reduce_dim, reduce_dim, 1, bias=False), nn.ReLU())
            for _ in pyramid_bins[1:]
        )
        self.beta_conv = nn.ModuleList(residual_pair(reduce_dim) for _ in pyramid_bins)
        self.inner_cls = nn.ModuleList(classifier(reduce_dim, dropout) for _ in pyramid_bins)
        self.res1 = nn.Sequential(
            nn.Conv2d(reduce_dim * len(pyramid_bins), reduce_dim, 1, bias=False), nn.ReLU(inplace=True)
        )
        self.res2 = residual_pair(reduce_dim)
        self.cls = classifier(reduce_dim, dropout)

    def forward(self, episode: Episode) -> SegOutput:
        query_img = episode.query_img  # (B, 3, H, W)
        inputs = meta_inputs(self.backbone, self.down_query, self.down_supp, episode, self.memory)
        query_feat = inputs.query_feat  # (B, D, h, w)
        size = (query_feat.shape[-2], query_feat.shape[-1])
        prototype, prior = inputs.shot_average()  # (B, D), (B, 1, h, w)

        pyramid: list[torch.Tensor] = []
        inner_logits: list[torch.Tensor] = []
        for idx, bin_size in enumerate(scaled_bins(self.pyramid_bins, size)):
            query_bin = F.adaptive_avg_pool2d(query_feat, bin_size)
            prototype_bin = prototype[:, :, None, None].expand(-1, -1, *bin_size)
            prior_bin = F.interpolate(prior, size=bin_size, mode="bilinear", align_corners=True)
            merged = self.init_merge[idx](torch.cat([query_bin, prototype_bin, prior_bin], 1))  # (B, D, b, b)
            if idx > 0:
                previous = F.interpolate(pyramid[-1], size=bin_size, mode="bilinear", align_corners=True)
                merged = self.alpha_conv[idx - 1](torch.cat([merged, previous], 1)) + merged
            merged = self.beta_conv[idx](merged) + merged
            if self.training:  # the per-scale heads only serve deep supervision
                inner_logits.append(self.inner_cls[idx](merged))
            pyramid.append(F.interpolate(merged, size=size, mode="bilinear", align_corners=True))

        feat = self.res1(torch.cat(pyramid, 1))  # (B, D, h, w)
        feat = self.res2(feat) + feat
        out_size = query_img.shape[-2:]
        logits = F.interpolate(self.cls(feat), size=out_size, mode="bilinear", align_corners=True)  # (B, 2, H, W)
        aux = [F.interpolate(x, size=out_size, mode="bilinear", align_corners=True) for x in inner_logits]
        return SegOutput(logits, aux, memory_losses(self.memory, inputs.losses))


def memory_losses(memory: MemoryTransfer | None, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The memory's weighted losses plus its orthogonality as a diagnostic (logged, not minimised)."""
    if memory is None or not memory.training:
        return losses
    return {**losses, DIAGNOSTIC_PREFIX + "memory_orth": memory.orthogonality()}


def mid_channels(backbone: ResNet) -> int:
    """Width of the mid-level concat(layer3, layer2) features: 1024 + 512 at ResNet-50."""
    return backbone.channels["layer3"] + backbone.channels["layer2"]


def build(cfg: ModelConfig, *, base_classes: list[int]) -> PFENet:
    """PFENet on a frozen deep-stem backbone; `base_classes` is unused (no base learner)."""
    if cfg.mining.enabled:
        raise ValueError("model.mining.enabled: PFENet with non-target mining is NTRENet; set model.method: ntrenet")
    backbone = build_backbone(cfg.backbone, "deep_stem", cfg.weights)
    return PFENet(backbone=backbone, reduce_dim=cfg.reduce_dim, pyramid_bins=cfg.pyramid_bins,
                  dropout=cfg.dropout, feature_dropout=cfg.feature_dropout, shot=cfg.shot,
                  memory=rmt.build_memory(cfg.memory, mid_channels(backbone)))
