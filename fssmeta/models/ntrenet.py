"""NTRENet (Liu et al., CVPR 2022, "Learning Non-target Knowledge for Few-shot Semantic Segmentation"):
PFENet's backbone, features and prior, plus background and distracting-object mining (models/mining.py).

Layer layout and widths follow LIUYUANWEI98/NERTNet `model/ourmodel.py` (20.85M learnable at ResNet-50, the
paper's ~20.9M); the forward pass is implemented from the description, since the release does not run as
published. Approximate (open in the paper / code, or deliberately different):
- k-shot: prototypes and priors are averaged over shots as in PFENet; the supports' background maps and
  distractor prototypes are computed per shot (the official k-shot path mixes shots inconsistently).
- PCL positive = the support prototype used by the segmentation path (mask resized bilinearly), where the
  official code re-pools with a nearest-resized mask; anchor = masked average of the query feature under
  the final prediction's argmax at feature size, as officially.
- the queue receives, as officially, per query and per support shot, the masked average of the reduced
  feature where the background map says "not background" and the ground truth says "not the class" (the
  per-scale DOEM prototypes use the initial prediction instead), and only non-empty ones (officially an
  empty mask pushes a zero vector).
As the paper and release, each with a switch keeping fssmeta's earlier form (`model.mining`): the DOEM
prototype is the plain average of mask x feature (`do_prototype`), PCL leaves the positive out of the
denominator (`pcl_form`), and the batch's distractors join the queue before the loss (`queue_push`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import MiningConfig, ModelConfig, Section
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import cross_entropy, resize_logits
from fssmeta.models import mining, ops
from fssmeta.models.backbone import ResNet, build_backbone, freeze_
from fssmeta.models.family import PFENET_RECIPE, FrozenBackboneModel, memory_losses, meta_inputs, mid_channels
from fssmeta.models.feature_cache import active_cache
from fssmeta.models.memory import MemoryTransfer, build_memory
from fssmeta.models.method import Method, Reference, Stage1


class NTRENetOptions(Section):
    """`model.ntrenet`: sizes as PFENet's (docs/methods.md, NTRENet); loss weights and queue in `model.mining`."""

    reduce_dim: int = 256
    pyramid_bins: tuple[int, ...] = (60, 30, 15, 8)
    dropout: float = 0.1
    feature_dropout: float = 0.5


def label_distractor_mask(bg_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N, 2, h, w) background map, (N, H, W) 0/1/255 labels -> (N, 1, h, w) float 0/1: neither background
    (by the map) nor the class (by the labels, nearest-resized; 255 counts as not-the-class)."""
    fg = F.interpolate(ops.foreground(masks)[:, None], size=bg_logits.shape[-2:], mode="nearest")  # (N, 1, h, w)
    target_logits = torch.cat([1 - fg, fg], 1)  # argmax = the label
    return mining.distractor_mask(bg_logits, target_logits)


class NTRENet(FrozenBackboneModel):
    """Non-target region eliminating network; the backbone is frozen and kept in eval mode.

    `distractor_queue` (PCL's negatives) is a plain attribute, not state: see mining.DistractorQueue.
    """

    def __init__(self, *, backbone: ResNet, mining_cfg: MiningConfig, reduce_dim: int = 256,
                 pyramid_bins: tuple[int, ...] = (60, 30, 15, 8), dropout: float = 0.1, feature_dropout: float = 0.5,
                 shot: int = 1, memory: MemoryTransfer | None = None, backbone_bn: str = "frozen") -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.backbone_bn = backbone_bn  # "frozen" | "train" (FrozenBackboneModel)
        self.memory = memory  # RMT feature restyling (models/memory.py), or None
        self.pyramid_bins = tuple(pyramid_bins)
        self.shot = shot  # shots it is trained for; forward averages over however many an episode has
        self.mining_cfg = mining_cfg  # loss weights and queue sizes
        mid_dim = mid_channels(backbone)
        self.down_query = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.down_supp = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.background = mining.BackgroundMining(reduce_dim, dropout=dropout, feature_dropout=feature_dropout)
        # Per scale: BGEM (query + BG prototype), then [that, support prototype, prior] -> initial prediction,
        # then DOEM; official names init_merge1, init_merge2, inital_beta_conv, inital_inner_cls, init_merge3.
        self.bg_merge = nn.ModuleList(mining.BackgroundElimination(reduce_dim) for _ in pyramid_bins)
        self.init_merge = nn.ModuleList(ops.merge_conv(2 * reduce_dim + 1, reduce_dim) for _ in pyramid_bins)
        self.initial_conv = nn.ModuleList(ops.residual_pair(reduce_dim) for _ in pyramid_bins)
        self.initial_cls = nn.ModuleList(ops.classifier(reduce_dim, dropout) for _ in pyramid_bins)
        self.do_merge = nn.ModuleList(mining.DistractorElimination(reduce_dim, mining_cfg.do_prototype) for _ in pyramid_bins)
        # PFENet's inter-scale path and final head.
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * reduce_dim, reduce_dim, 1, bias=False), nn.ReLU())
            for _ in pyramid_bins[1:]
        )
        self.beta_conv = nn.ModuleList(ops.residual_pair(reduce_dim) for _ in pyramid_bins)
        self.inner_cls = nn.ModuleList(ops.classifier(reduce_dim, dropout) for _ in pyramid_bins)
        self.res1 = ops.merge_conv(reduce_dim * len(pyramid_bins), reduce_dim)
        self.res2 = ops.residual_pair(reduce_dim)
        self.cls = ops.classifier(reduce_dim, dropout)
        self.distractor_queue = mining.DistractorQueue(reduce_dim, mining_cfg.queue_size, mining_cfg.queue_sample)

    def forward(self, episode: Episode) -> SegOutput:
        query_img = episode.query_img  # (B, 3, H, W)
        inputs = meta_inputs(self.backbone, self.down_query, self.down_supp, episode, self.memory,
                             active_cache(self, episode))
        query_feat = inputs.query_feat  # (B, D, h, w)
        size = (query_feat.shape[-2], query_feat.shape[-1])
        prototype, prior = inputs.shot_average()  # (B, D), (B, 1, h, w), as PFENet
        bg_logits = self.background(query_feat)  # (B, 2, h, w), channel 1 = background
        bg_prototype = self.background.prototype()  # (D,)

        pyramid: list[torch.Tensor] = []
        initial_logits: list[torch.Tensor] = []
        inner_logits: list[torch.Tensor] = []
        for idx, bin_size in enumerate(ops.scaled_bins(self.pyramid_bins, size)):
            query_bin = F.adaptive_avg_pool2d(query_feat, bin_size)  # (B, D, b, b)
            merged = self.bg_merge[idx](query_bin, bg_prototype)
            prototype_bin = prototype[:, :, None, None].expand(-1, -1, *bin_size)
            prior_bin = F.interpolate(prior, size=bin_size, mode="bilinear", align_corners=True)
            merged = self.init_merge[idx](torch.cat([merged, prototype_bin, prior_bin], 1))
            merged = self.initial_conv[idx](merged) + merged
            initial = self.initial_cls[idx](merged)  # (B, 2, b, b), also needed at test time (the DO mask)
            do_mask = mining.distractor_mask(resize_logits(bg_logits, bin_size), initial)  # (B, 1, b, b)
            merged, _ = self.do_merge[idx](merged, query_bin, do_mask)
            if idx > 0:
                previous = F.interpolate(pyramid[-1], size=bin_size, mode="bilinear", align_corners=True)
                merged = self.alpha_conv[idx - 1](torch.cat([merged, previous], 1)) + merged
            merged = self.beta_conv[idx](merged) + merged
            if self.training:  # the per-scale heads only serve deep supervision
                initial_logits.append(initial)
                inner_logits.append(self.inner_cls[idx](merged))
            pyramid.append(F.interpolate(merged, size=size, mode="bilinear", align_corners=True))

        feat = self.res1(torch.cat(pyramid, 1))  # (B, D, h, w)
        feat = self.res2(feat) + feat
        final = self.cls(feat)  # (B, 2, h, w)
        logits = F.interpolate(final, size=query_img.shape[-2:], mode="bilinear", align_corners=True)
        if not self.training:
            return SegOutput(logits, [], memory_losses(self.memory, inputs.losses))

        losses = self.mining_losses(episode, query_feat, inputs.supp_feat, prototype, bg_logits, final)
        w = self.mining_cfg
        target = episode.query_mask
        losses["aux_final"] = w.aux_final_weight * torch.stack([cross_entropy(x, target) for x in inner_logits]).mean()
        losses["aux_initial"] = w.aux_initial_weight * torch.stack(
            [cross_entropy(x, target) for x in initial_logits]).mean()
        return SegOutput(logits, [], memory_losses(self.memory, {**inputs.losses, **losses}))

    def mining_losses(self, episode: Episode, query_feat: torch.Tensor, supp_feat: torch.Tensor,
                      prototype: torch.Tensor, bg_logits: torch.Tensor, final: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted BG loss and PCL; this batch's distractor prototypes join the queue before the loss (NTRENet,
        `model.mining.queue_push: before`: an episode's own distractors are among its negatives) or after it.

        query_feat (B, D, h, w), supp_feat (B*S, D, h, w), prototype (B, D), bg_logits and final (B, 2, h, w).
        """
        B, S = episode.support_imgs.shape[:2]
        supp_bg_logits = self.background(supp_feat)  # (B*S, 2, h, w)
        shot_bg = supp_bg_logits.view(B, S, *supp_bg_logits.shape[1:])
        bg_terms = [mining.background_loss(bg_logits, episode.query_mask)]
        bg_terms += [mining.background_loss(shot_bg[:, s], episode.support_masks[:, s]) for s in range(S)]

        w = self.mining_cfg
        if w.queue_push == "before":
            self._push_distractors(episode, query_feat, supp_feat, bg_logits, supp_bg_logits)
        predicted_fg = final.argmax(dim=1, keepdim=True).to(query_feat.dtype)  # (B, 1, h, w), no gradient
        anchor = ops.masked_average_pool(query_feat, predicted_fg)  # (B, D)
        negatives = [self.distractor_queue.negatives(int(c)) for c in episode.class_id]
        pcl = mining.prototypical_contrastive_loss(anchor, prototype, negatives, w.pcl_temperature, w.pcl_form)
        if w.queue_push == "after":
            self._push_distractors(episode, query_feat, supp_feat, bg_logits, supp_bg_logits)
        return {"bg": w.bg_weight * torch.stack(bg_terms).mean(), "pcl": w.pcl_weight * pcl}

    @torch.no_grad()
    def _push_distractors(self, episode: Episode, query_feat: torch.Tensor, supp_feat: torch.Tensor,
                          bg_logits: torch.Tensor, supp_bg_logits: torch.Tensor) -> None:
        """Per query and support shot, the masked average of the reduced feature where the background map
        says "not background" and the ground truth "not the class", into the class's queue (non-empty only)."""
        S = episode.support_imgs.shape[1]
        support_masks = episode.support_masks.flatten(0, 1)  # (B*S, H, W)
        query_do = label_distractor_mask(bg_logits, episode.query_mask)  # (B, 1, h, w)
        supp_do = label_distractor_mask(supp_bg_logits, support_masks)  # (B*S, 1, h, w)
        do_prototypes = torch.cat([ops.masked_average_pool(query_feat, query_do),
                                   ops.masked_average_pool(supp_feat, supp_do)])  # (B + B*S, D)
        valid = torch.cat([query_do.flatten(1).sum(1), supp_do.flatten(1).sum(1)]) > 0  # (B + B*S,)
        class_ids = torch.cat([episode.class_id, episode.class_id.repeat_interleave(S)])
        self.distractor_queue.push(class_ids, do_prototypes, valid)


def build(cfg: ModelConfig, options: NTRENetOptions, *, shot: int, base_classes: list[int]) -> NTRENet:
    """NTRENet on a frozen deep-stem backbone; `base_classes` is unused (the queue keys on episode class ids).
    Always mines: `model.mining.enabled` is BAM's switch and is not read here; its weights and queue sizes are."""
    backbone = build_backbone(cfg.backbone, "deep_stem", cfg.weights)
    return NTRENet(backbone=backbone, mining_cfg=cfg.mining, reduce_dim=options.reduce_dim,
                   pyramid_bins=options.pyramid_bins, dropout=options.dropout,
                   feature_dropout=options.feature_dropout, shot=shot,
                   memory=build_memory(cfg.memory, mid_channels(backbone)), backbone_bn=METHOD.bn_mode(cfg))


METHOD = Method(
    key="ntrenet", build=build, options=NTRENetOptions, stage1=Stage1("backbone"),
    parts=frozenset({"memory", "mining"}),  # mines always; `model.mining` gives its weights
    backbone_bn="train", recipe=PFENET_RECIPE,  # NERTNet's train.py never fixes BN
    summary="non-target region elimination: background and distracting-object mining (CVPR 2022)",
    tiny={"backbone": "small", "pspnet": {"ppm_dim": 32}, "ntrenet": {"reduce_dim": 32, "pyramid_bins": (9, 5, 3, 2)}},
    reference=Reference(20_846_868, {"backbone": "resnet50"}, published="~20.9M"),
)
