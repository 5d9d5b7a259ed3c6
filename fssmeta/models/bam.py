"""BAM (Lang et al., CVPR 2022): a frozen PSPNet base learner ensembled with a PFENet-style meta learner.

Follows chunbolang/BAM `model/BAM.py`. `logits` are BAM's `final_out` itself (the ensembled
probability-like maps), because BAM applies CrossEntropyLoss straight to them; softmax(logits) is therefore
exactly what BAM's loss and argmax see. In training the base learner is frozen as BAM's trainer leaves it:
BN fixed (`fix_bn`; `model.backbone_bn`), the base head's Dropout2d(0.1) active (`model.bam.base_dropout`;
false keeps the whole base learner in eval mode, a deterministic base map, fssmeta's earlier convention).

fssmeta's flagship is this BAM with two switches from params (all four combinations are valid):
`model.memory.enabled` restyles the mid-level features with the RMT meta-memory (models/memory.py) and
`model.mining.enabled` inserts NTRENet's non-target mining (models/mining.py: background mining and
elimination, an initial prediction, distracting-object elimination, the prototypical contrastive loss)
between the prior merge and BAM's ASPP. BAM's base-learner ensemble (models/ensemble.py) is the third,
always-on, piece.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import MiningConfig, ModelConfig, Section
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import cross_entropy
from fssmeta.models import mining as ntm
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet, freeze_
from fssmeta.models.ensemble import BaseMetaEnsemble, base_class_map
from fssmeta.models.family import MetaInputs, memory_losses, meta_inputs, mid_channels
from fssmeta.models.feature_cache import FeatureCache, active_cache
from fssmeta.models.memory import MemoryTransfer, build_memory
from fssmeta.models.method import Method, Reference, Stage1
from fssmeta.models.pspnet import PSPNet, build_pspnet


class BAMOptions(Section):
    """`model.bam`: the meta learner's sizes (docs/methods.md, BAM). The base learner is `model.pspnet`."""

    reduce_dim: int = 256  # mid-level feature width
    aspp_dilations: tuple[int, ...] = (6, 12, 18)  # meta-learner ASPP, at a 473 input
    dropout: float = 0.1  # classifier heads
    feature_dropout: float = 0.5  # down_query / down_supp (the official constant)
    base_dropout: bool = True  # the frozen base head's Dropout2d active in meta-training, as BAM's trainer leaves it
    init: Literal["official", "he"] = "official"  # the meta learner's convs: official (PyTorch's, ASPP kaiming) | he (ops.he_init_)


class BAM(nn.Module):
    """Base-and-meta learner; the base learner (and its backbone, BAM's feature extractor) stays frozen."""

    feature_cache: FeatureCache | None = None  # evaluation's frozen-feature cache (caching)

    def __init__(self, *, base_learner: PSPNet, base_classes: list[int], reduce_dim: int = 256,
                 aspp_dilations: tuple[int, ...] = (6, 12, 18), dropout: float = 0.1, feature_dropout: float = 0.5,
                 shot: int = 1, memory: MemoryTransfer | None = None, mining: MiningConfig | None = None,
                 backbone_bn: str = "frozen", base_dropout: bool = True) -> None:
        super().__init__()
        self.backbone_bn = backbone_bn  # "frozen" (BAM's fix_bn) | "train": the base learner's BN in training
        self.base_dropout = base_dropout
        if len(base_classes) + 1 != base_learner.num_classes:
            raise ValueError(f"BAM: {len(base_classes)} base classes but the base learner predicts "
                             f"{base_learner.num_classes} channels (expected 1 + number of base classes)")
        self.base_learner = freeze_(base_learner)
        # Channel i + 1 of the base learner is the i-th base class in ascending dataset-id order.
        self.register_buffer("base_classes", torch.tensor(sorted(base_classes), dtype=torch.long))
        self.shot = shot
        backbone = base_learner.backbone
        mid_dim = mid_channels(backbone)
        self.memory = memory  # RMT feature restyling (models/memory.py), or None
        self.down_query = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.down_supp = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.init_merge = ops.merge_conv(2 * reduce_dim + 1, reduce_dim)
        self.aspp = ops.ASPP(reduce_dim, reduce_dim, tuple(aspp_dilations))
        aspp_dim = reduce_dim * (2 + len(aspp_dilations))  # image pool + 1x1 + one branch per dilation
        self.res1_meta = ops.merge_conv(aspp_dim, reduce_dim)
        self.res2_meta = ops.residual_pair(reduce_dim)
        self.cls_meta = ops.classifier(reduce_dim, dropout)
        # psi calibration, the base-map merge and the k-shot weights (models/ensemble.py).
        self.ensemble = BaseMetaEnsemble(shot, kshot_weights=False)
        # NTRENet's non-target mining on the meta learner (the flagship), or None.
        self.mining = mining
        if mining is not None:
            self.bgmm = ntm.BackgroundMining(reduce_dim, dropout=dropout, feature_dropout=feature_dropout)
            self.bgem = ntm.BackgroundElimination(reduce_dim)
            self.init_res = ops.residual_pair(reduce_dim)
            self.init_cls = ops.classifier(reduce_dim, dropout)
            self.doem = ntm.DistractorElimination(reduce_dim, mining.do_prototype)
            self.queue = ntm.DistractorQueue(reduce_dim, mining.queue_size, mining.queue_sample)
        self.ensemble.add_kshot_weights()  # last, as BAM creates it: the same random initialisation

    @property
    def backbone(self) -> ResNet:
        """The base learner's encoder (one module, registered once under `base_learner.backbone`)."""
        return self.base_learner.backbone

    def train(self, mode: bool = True) -> BAM:
        super().train(mode)
        self.base_learner.eval()  # frozen: no gradients, fixed BN statistics, a deterministic base map ...
        if mode:  # ... except what BAM's trainer leaves in train mode
            for module in self.base_learner.modules():
                if (isinstance(module, nn.modules.batchnorm._BatchNorm) and self.backbone_bn == "train") or (
                        isinstance(module, nn.Dropout2d) and self.base_dropout):
                    module.train()
        return self

    def base_map(self, query_layer4: torch.Tensor, class_id: torch.Tensor, query_key: str | None = None,
                 ) -> torch.Tensor:
        """(B, C4, h, w) query layer4 -> (B, 1, h, w) base-learner probability of any base class; the
        episode's own class is left out in training (ensemble.base_class_map). With a `query_key` (a feature
        cache is active: eval, so nothing is left out) the map depends on the query alone and is cached."""
        def compute() -> torch.Tensor:
            return base_class_map(self.base_learner, query_layer4, self.base_classes, class_id, self.training)

        if query_key is None:
            return compute()
        return self.feature_cache.get_or_compute(("base_map", query_key), compute)

    def forward(self, episode: Episode) -> SegOutput:
        query_img = episode.query_img  # (B, 3, H, W)
        B, S = episode.support_imgs.shape[:2]
        inputs = meta_inputs(self.backbone, self.down_query, self.down_supp, episode, self.memory,
                             active_cache(self, episode))
        query, support, query_feat, prototypes, priors = inputs[:5]  # see family.MetaInputs for shapes
        h, w = query_feat.shape[-2:]

        # psi: how different the query's and each support's low-level (layer2) styles are.
        psi = self.ensemble.shot_psi(query["layer2"], support.layer2)  # (B, S)
        weights = self.ensemble.shot_weights(psi)  # (B, S)
        psi = (weights * psi).sum(1)  # (B,)
        prior = (weights[:, :, None, None] * priors).sum(1, keepdim=True)  # (B, 1, h, w)
        prototype = (weights[:, :, None] * prototypes).sum(1)  # (B, D)

        losses = dict(inputs.losses)
        tiled_prototype = prototype[:, :, None, None].expand(-1, -1, h, w)
        if self.mining is None:
            feat = self.init_merge(torch.cat([query_feat, tiled_prototype, prior], 1))  # (B, D, h, w)
        else:
            feat, mining_losses, distractors = self._mine(inputs, query_feat, tiled_prototype, prior, episode)
            losses |= mining_losses
        feat = self.res1_meta(self.aspp(feat))  # (B, D, h, w)
        feat = self.res2_meta(feat) + feat
        meta_logits = self.cls_meta(feat)  # (B, 2, h, w)
        if self.mining is not None and self.training and self.mining.pcl_weight > 0:
            losses["pcl"] = self._contrast(query_feat, meta_logits, prototype, episode.class_id, distractors)

        # Ensemble at feature size: calibrate the meta probabilities by psi, then let the base learner's
        # "some base class is here" map lower the foreground through the background channel.
        base = self.base_map(query["layer4"], episode.class_id, inputs.query_key)  # (B, 1, h, w)
        final = self.ensemble(meta_logits, psi, base)  # (B, 2, h, w)

        out_size = query_img.shape[-2:]
        logits = F.interpolate(final, size=out_size, mode="bilinear", align_corners=True)  # (B, 2, H, W)
        aux = [F.interpolate(meta_logits, size=out_size, mode="bilinear", align_corners=True)] if self.training else []
        return SegOutput(logits, aux, memory_losses(self.memory, losses))

    def _mine(self, inputs: MetaInputs, query_feat: torch.Tensor, tiled_prototype: torch.Tensor,
              prior: torch.Tensor, episode: Episode,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """NTRENet's non-target mining at BAM's single scale: BGMM -> BGEM -> initial prediction -> DOEM.

        Returns the (B, D, h, w) feature for BAM's ASPP, in training the weighted BG and initial-head losses,
        and this batch's distractors ((B, D) detached DO prototypes, (B,) non-empty) for the PCL queue. Approximate: NTRENet mines at every PFENet pyramid scale; BAM's meta learner has one.
        """
        bg_logits = self.bgmm(query_feat)  # (B, 2, h, w), channel 1 = background
        query_clean = self.bgem(query_feat, self.bgmm.prototype())
        merged = self.init_merge(torch.cat([query_clean, tiled_prototype, prior], 1))
        merged = self.init_res(merged) + merged
        init_logits = self.init_cls(merged)  # (B, 2, h, w)
        do_mask = ntm.distractor_mask(bg_logits, init_logits)  # (B, 1, h, w)
        feat, do_prototype = self.doem(merged, query_feat, do_mask)
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            cfg = self.mining
            supp_labels = episode.support_masks.flatten(0, 1)  # (B*S, H, W)
            bg = (ntm.background_loss(bg_logits, episode.query_mask)
                  + ntm.background_loss(self.bgmm(inputs.supp_feat), supp_labels)) / 2
            losses["bg"] = cfg.bg_weight * bg
            losses["aux_initial"] = cfg.aux_initial_weight * cross_entropy(init_logits, episode.query_mask)
        return feat, losses, (do_prototype.detach(), do_mask.flatten(1).amax(1) > 0)

    def _contrast(self, query_feat: torch.Tensor, meta_logits: torch.Tensor, prototype: torch.Tensor,
                  class_id: torch.Tensor, distractors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Weighted PCL: anchor = query prototype under the predicted foreground, positive = the support
        prototype, negatives = this class's queued distractor prototypes. This batch's distractors join the
        queue before the loss (NTRENet's order, `model.mining.queue_push: before`) or after it."""
        cfg = self.mining
        if cfg.queue_push == "before":
            self.queue.push(class_id, *distractors)
        predicted = meta_logits.argmax(dim=1).to(query_feat.dtype)  # (B, h, w), no gradient through argmax
        anchor = ops.masked_average_pool(query_feat, predicted)  # (B, D)
        negatives = [self.queue.negatives(int(c)) for c in class_id]
        loss = ntm.prototypical_contrastive_loss(anchor, prototype, negatives, cfg.pcl_temperature, cfg.pcl_form)
        if cfg.queue_push == "after":
            self.queue.push(class_id, *distractors)
        return cfg.pcl_weight * loss


def build(cfg: ModelConfig, options: BAMOptions, *, shot: int, base_classes: list[int]) -> BAM:
    """BAM around a fresh PSPNet base learner (the stages load stage 1 into it through `METHOD.stage1`)."""
    base_learner = build_pspnet(cfg, 1 + len(base_classes))
    model = BAM(base_learner=base_learner, base_classes=base_classes, reduce_dim=options.reduce_dim,
               aspp_dilations=options.aspp_dilations, dropout=options.dropout,
               feature_dropout=options.feature_dropout, shot=shot,
               memory=build_memory(cfg.memory, mid_channels(base_learner.backbone)),
               mining=cfg.mining if cfg.mining.enabled else None, backbone_bn=METHOD.bn_mode(cfg),
               base_dropout=options.base_dropout)
    if options.init == "he":
        ops.he_init_([model])  # the meta learner's convs (the base learner is frozen)
    return model


METHOD = Method(
    key="bam", build=build, options=BAMOptions, stage1=Stage1("base_learner"), parts=frozenset({"memory", "mining"}),
    summary="base-learner / meta-learner ensemble (CVPR 2022); with model.memory / model.mining: the flagship",
    tiny={"backbone": "small", "pspnet": {"ppm_dim": 32}, "bam": {"reduce_dim": 32, "aspp_dilations": (1, 2, 3)}},
    reference=Reference(4_917_254, {"backbone": "resnet50"}, published="4.92M (+27 at 5 shots)"), canvas="bam",
)
