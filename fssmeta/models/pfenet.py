"""PFENet (Tian et al., TPAMI 2020): training-free prior mask + feature enrichment on a frozen deep-stem ResNet.

Follows dvlab-research/PFENet `model/PFENet.py` layer for layer. One generalisation: the pyramid bins are
sizes at the training input, whose feature map is `pyramid_bins[0]` wide (60 at 473); on another feature
size every bin scales proportionally (`ops.scaled_bins`), so small inputs work. At the reference size the
bins are exactly PFENet's. The front end it shares with BAM and NTRENet is models/family.py.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import ModelConfig, Section
from fssmeta.episode import Episode, SegOutput
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet, build_backbone, freeze_
from fssmeta.models.family import PFENET_RECIPE, FrozenBackboneModel, memory_losses, meta_inputs, mid_channels
from fssmeta.models.feature_cache import active_cache
from fssmeta.models.memory import MemoryTransfer, build_memory
from fssmeta.models.method import Method, Reference, Stage1


class PFENetOptions(Section):
    """`model.pfenet`: the sizes that decide PFENet's learnable parameters (docs/methods.md, PFENet)."""

    reduce_dim: int = 256  # mid-level feature width
    pyramid_bins: tuple[int, ...] = (60, 30, 15, 8)  # feature-enrichment scales at a 473 input
    dropout: float = 0.1  # classifier heads
    feature_dropout: float = 0.5  # down_query / down_supp (the official constant)
    init: Literal["official", "he"] = "official"  # the head's convs: official (PyTorch's) | he (ops.he_init_)


class PFENet(FrozenBackboneModel):
    """Prior-guided feature enrichment network over a frozen backbone (BN convention: `backbone_bn`)."""

    def __init__(self, *, backbone: ResNet, reduce_dim: int = 256, pyramid_bins: tuple[int, ...] = (60, 30, 15, 8),
                 dropout: float = 0.1, feature_dropout: float = 0.5, shot: int = 1,
                 memory: MemoryTransfer | None = None, backbone_bn: str = "frozen") -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.backbone_bn = backbone_bn  # "frozen" | "train" (FrozenBackboneModel)
        self.memory = memory  # RMT feature restyling (models/memory.py), or None
        self.pyramid_bins = tuple(pyramid_bins)
        self.shot = shot  # shots it is trained for; forward averages over however many an episode has
        mid_dim = mid_channels(backbone)
        self.down_query = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.down_supp = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        # Feature enrichment: per scale, merge [query, prototype, prior]; from the second scale on, also merge
        # the previous (coarser-to-finer in PFENet's order: 60 -> 8) scale's output.
        self.init_merge = nn.ModuleList(ops.merge_conv(2 * reduce_dim + 1, reduce_dim) for _ in pyramid_bins)
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * reduce_dim, reduce_dim, 1, bias=False), nn.ReLU())
            for _ in pyramid_bins[1:]
        )
        self.beta_conv = nn.ModuleList(ops.residual_pair(reduce_dim) for _ in pyramid_bins)
        self.inner_cls = nn.ModuleList(ops.classifier(reduce_dim, dropout) for _ in pyramid_bins)
        self.res1 = ops.merge_conv(reduce_dim * len(pyramid_bins), reduce_dim)
        self.res2 = ops.residual_pair(reduce_dim)
        self.cls = ops.classifier(reduce_dim, dropout)

    def forward(self, episode: Episode) -> SegOutput:
        query_img = episode.query_img  # (B, 3, H, W)
        inputs = meta_inputs(self.backbone, self.down_query, self.down_supp, episode, self.memory,
                             active_cache(self, episode))
        query_feat = inputs.query_feat  # (B, D, h, w)
        size = (query_feat.shape[-2], query_feat.shape[-1])
        prototype, prior = inputs.shot_average()  # (B, D), (B, 1, h, w)

        pyramid: list[torch.Tensor] = []
        inner_logits: list[torch.Tensor] = []
        for idx, bin_size in enumerate(ops.scaled_bins(self.pyramid_bins, size)):
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


def build(cfg: ModelConfig, options: PFENetOptions, *, shot: int, base_classes: list[int]) -> PFENet:
    """PFENet on a frozen deep-stem backbone; `base_classes` is unused (no base learner). With mining it
    would be NTRENet: its record takes the memory only."""
    backbone = build_backbone(cfg.backbone, "deep_stem", cfg.weights)
    model = PFENet(backbone=backbone, reduce_dim=options.reduce_dim, pyramid_bins=options.pyramid_bins,
                   dropout=options.dropout, feature_dropout=options.feature_dropout, shot=shot,
                   memory=build_memory(cfg.memory, mid_channels(backbone)), backbone_bn=METHOD.bn_mode(cfg))
    if options.init == "he":
        ops.he_init_([model])  # the head's convs (the backbone is frozen)
    return model


METHOD = Method(
    key="pfenet", build=build, options=PFENetOptions, stage1=Stage1("backbone"), parts=frozenset({"memory"}),
    backbone_bn="train", recipe=PFENET_RECIPE,  # PFENet's train.py never fixes BN
    summary="prior mask + multi-scale feature enrichment (TPAMI 2020)",
    tiny={"backbone": "small", "pspnet": {"ppm_dim": 32}, "pfenet": {"reduce_dim": 32, "pyramid_bins": (9, 5, 3, 2)}},
    reference=Reference(10_817_034, {"backbone": "resnet50"}, published="10.8M"),
)
