"""HDMNet (Peng et al., CVPR 2023, "Hierarchical Dense Correlation Distillation for Few-Shot Segmentation"): BAM's
frozen PSPNet base learner and ensemble around a three-stage transformer that matches every query token with
every support foreground token, its correlation maps distilled from coarse to fine.

Follows the official release (Pbihao/HDMNet: `model/HDMNet.py`, `Transformer.py`, `MaskMultiheadAttention.py`,
the PASCAL config; tests/fixtures/oracle/hdmnet.pt pins its forward). Its transformer is assembled from mmcv /
mmseg parts, which do not run with this project's torch; here it is plain PyTorch (models/hdm_transformer.py). Departures, each where it
is made: the supports go through the backbone one shot at a time (as the PFENet family; the official code
batches all shots), and BAM's k-shot MLP, which HDMNet's optimiser never updates, is frozen.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from fssmeta.config import ModelConfig, OptimConfig, Positive, Section
from fssmeta.episode import Episode, SegOutput
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet, freeze_
from fssmeta.models.ensemble import BaseMetaEnsemble, any_base_class
from fssmeta.models.family import memory_losses, mid_channels
from fssmeta.models.feature_cache import FeatureCache, active_cache, digest
from fssmeta.models.hdm_transformer import HierarchicalTransformer
from fssmeta.models.memory import MemoryTransfer, build_memory
from fssmeta.models.method import Method, OptimizerSpec, Reference, Stage1, trainable
from fssmeta.models.pspnet import PSPNet, build_pspnet

# AdamW, weight decay 0.01, poly 0.9 (the PASCAL config); `lr` is the rate of everything but the transformer
# (official base_lr 1e-4 x 10), which trains at lr x `transformer_lr_scale` (0.1: base_lr itself).
# `momentum` is AdamW's beta1 (0.9, as official).
ADAMW_RECIPE = OptimConfig(optimizer="adamw", lr=1.0e-3, momentum=0.9, weight_decay=0.01, power=0.9, warmup_steps=0)
LOG_EPS = 1e-12  # inside the logs of the distillation KL, as official
OFF_TARGET = -1e9  # the ground-truth "correlation" off the object: its softmax is uniform over the object


class HDMNetOptions(Section):
    """`model.hdmnet`: sizes at a 473 input (60 -> 30 -> 15 stages); docs/methods.md, HDMNet."""

    reduce_dim: Positive = 256  # mid-level feature width (down_query / down_supp)
    embed_dim: Positive = 64  # transformer width (query_merge / supp_merge out)
    num_heads: tuple[int, ...] = (2, 4, 8)  # self-attention heads per stage; one stage per entry
    sr_ratios: tuple[int, ...] = (4, 2, 1)  # spatial reduction of the self-attention keys per stage
    match_heads: Positive = 2  # heads of the query-to-support matching attention
    mlp_ratio: Positive = 4  # Mix-FFN hidden width / embed_dim
    dropout: float = Field(default=0.1, ge=0, lt=1)  # transformer drop rate (attention output, Mix-FFN)
    feature_dropout: float = Field(default=0.5, ge=0, lt=1)  # down_query / down_supp (PFENet's constant)
    temperature: float = Field(default=0.1, gt=0)  # matching: cosine / temperature
    prior_scale: float = 10.0  # the priors enter query_merge times this
    distill_weight: float = Field(default=1.0, ge=0)  # x the mean of the stages' KL (official: their sum / 3)
    transformer_lr_scale: float = Field(default=0.1, gt=0)  # official: 1e-4 vs 1e-3 for the rest
    base_dropout: bool = True  # the frozen base head's Dropout2d active in training, as the official trainer

    @model_validator(mode="after")
    def _stages(self) -> HDMNetOptions:
        if len(self.num_heads) != len(self.sr_ratios) or not self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} and sr_ratios {self.sr_ratios}: one entry per stage each")
        for heads in (*self.num_heads, self.match_heads):
            if self.embed_dim % heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by {heads} heads")
        return self


@torch.no_grad()
def cosine_prior(query: torch.Tensor, support: torch.Tensor, support_fg: torch.Tensor) -> torch.Tensor:
    """HDMNet's prior (official `get_similarity`): (B, C, h, w) query and support features, (B, H, W) float
    foreground -> (B, 1, h, w), for every query pixel the highest cosine with any support pixel under the
    foreground (mask resized NEAREST), not min-max normalised.

    Official form dot / (|s| |q| + 1e-7), on the support times the mask: a background support pixel scores
    exactly 0, so it is left out of the product and stands in as that 0 in the max (when there is one).
    """
    B, C, h, w = query.shape
    keep = F.interpolate(support_fg[:, None], size=support.shape[-2:], mode="nearest").flatten(1) > 0  # (B, Ns)
    queries = query.flatten(2)  # (B, C, Nq)
    query_norm = queries.norm(dim=1, keepdim=True)  # (B, 1, Nq)
    best = []
    for b in range(B):
        s = support[b].flatten(1)[:, keep[b]].t()  # (n, C): the foreground pixels
        sim = (s @ queries[b]) / (s.norm(dim=1, keepdim=True) * query_norm[b] + ops.COSINE_EPS)  # (n, Nq)
        top = sim.amax(dim=0) if len(s) else query_norm.new_zeros(h * w)
        best.append(top.clamp_min(0) if len(s) < keep.shape[1] else top)
    return torch.stack(best).view(B, 1, h, w)


def distillation_loss(correlations: list[torch.Tensor], query_mask: torch.Tensor) -> torch.Tensor:
    """Correlation distillation: the mean over stages (coarsest first) of KL(teacher || stage), each map a
    softmax over its pixels. The coarsest stage's teacher is the ground truth (1 on the object, -1e9 elsewhere,
    255 included: a uniform distribution over the object); each finer stage's is the DETACHED coarser map,
    resized bilinearly (align_corners False) to the student's size, as official `disstil_loss`."""
    teacher = torch.where(query_mask == 1, 1.0, OFF_TARGET).float()  # (B, H, W)
    total = query_mask.new_zeros((), dtype=torch.float32)
    for student in correlations:
        if teacher.shape[-2:] != student.shape[-2:]:
            teacher = F.interpolate(teacher[:, None], size=student.shape[-2:], mode="bilinear")[:, 0]
        t, s = teacher.flatten(1).softmax(1), student.float().flatten(1).softmax(1)
        total = total + (t * (torch.log(t + LOG_EPS) - torch.log(s + LOG_EPS))).sum(1).mean()
        teacher = student.detach().float()
    return total / len(correlations)


def weighted_psi(ensemble: BaseMetaEnsemble, psi: torch.Tensor) -> torch.Tensor:
    """(B, S) per-shot psi -> (B,) HDMNet's k-shot psi. BAM's MLP scores the sorted psi, but HDMNet never puts
    the weights back in the episode's shot order (its `idx1.gather(1, idx2)` is the identity permutation), so
    the weight of the i-th smallest psi goes to shot i: the weights of the sorted psi, as they come, applied to
    psi in the episode's order (BAM's `ensemble.shot_weights` returns them to the shots' order)."""
    return (ensemble.shot_weights(psi.sort(dim=1).values) * psi).sum(1)


class Frozen(NamedTuple):
    """Frozen features of a batch of images: the backbone's and the PSPNet head's."""

    layer2: torch.Tensor  # (N, C2, h, w)
    layer3: torch.Tensor  # (N, C3, h, w)
    layer4: torch.Tensor  # (N, C4, h, w)
    head: torch.Tensor  # (N, ppm_dim, h, w): PSPNet's 3x3 conv + BN, before its ReLU (the second prior's feature)


class HDMNet(nn.Module):
    """Base learner (frozen PSPNet, its encoder the frozen backbone) + hierarchical transformer meta learner +
    BAM's ensemble. In training `forward` adds the distillation (`distill`) to the loss dict; the record's loss
    adds CE(final) (`ce`) and CE(meta) (`aux`)."""

    feature_cache: FeatureCache | None = None  # evaluation's frozen-feature cache (feature_cache.caching)

    def __init__(self, *, base_learner: PSPNet, base_classes: list[int], options: HDMNetOptions, shot: int = 1,
                 memory: MemoryTransfer | None = None, backbone_bn: str = "frozen") -> None:
        super().__init__()
        if len(base_classes) + 1 != base_learner.num_classes:
            raise ValueError(f"HDMNet: {len(base_classes)} base classes but the base learner predicts "
                             f"{base_learner.num_classes} channels (expected 1 + number of base classes)")
        self.backbone_bn = backbone_bn  # "frozen": every BN in eval mode in training (official fix_bn) | "train"
        self.base_dropout = options.base_dropout
        self.shot = shot
        self.prior_scale = options.prior_scale
        self.distill_weight = options.distill_weight
        self.transformer_lr_scale = options.transformer_lr_scale  # read by `optimizers`
        self.base_learner = freeze_(base_learner)
        self.register_buffer("base_classes", torch.tensor(sorted(base_classes), dtype=torch.long))
        self.memory = memory  # RMT restyling of the mid-level features (models/memory.py), or None
        dim, embed = options.reduce_dim, options.embed_dim
        self.down_supp = ops.reduce_block(mid_channels(base_learner.backbone), dim, options.feature_dropout)
        self.down_query = ops.reduce_block(mid_channels(base_learner.backbone), dim, options.feature_dropout)
        self.query_merge = ops.merge_conv(2 * dim + 2, embed)  # [feature, prototype, 2 priors]
        self.supp_merge = ops.merge_conv(2 * dim, embed)  # [feature, its own prototype]
        self.transformer = HierarchicalTransformer(embed, options.num_heads, options.sr_ratios, options.match_heads,
                                                   options.mlp_ratio, options.dropout, options.temperature)
        self.ensemble = BaseMetaEnsemble(shot, kshot_weights=False)
        self.ensemble.add_kshot_weights()  # last, as official
        if shot > 1:  # frozen: HDMNet's optimiser groups leave BAM's k-shot MLP out, so it keeps its init
            freeze_(self.ensemble.kshot_rw)

    @property
    def backbone(self) -> ResNet:
        return self.base_learner.backbone

    def train(self, mode: bool = True) -> HDMNet:
        super().train(mode)
        self.base_learner.eval()
        if mode:  # the official trainer's model.apply(fix_bn): every BN, the transformer's learnable ones too
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(self.backbone_bn == "train")
            for module in self.base_learner.modules():  # ... while the base head's Dropout2d stays active
                if isinstance(module, nn.Dropout2d):
                    module.train(self.base_dropout)
        return self

    @torch.no_grad()
    def _frozen(self, img: torch.Tensor) -> Frozen:
        """(N, 3, H, W) -> the frozen features the model reads (layer0 and layer1 are let go)."""
        backbone, pspnet = self.backbone, self.base_learner
        layer2 = backbone.layer2(backbone.layer1(backbone.layer0(img)))
        layer3 = backbone.layer3(layer2)
        layer4 = backbone.layer4(layer3)
        return Frozen(layer2, layer3, layer4, pspnet.cls[:2](pspnet.ppm(layer4)))

    def _features(self, img: torch.Tensor, cache: FeatureCache | None) -> tuple[Frozen, str | None]:
        """`_frozen` through the cache (eval, batch 1), keyed by the image's content: a support comes here
        already masked, so its key is that of the masked image. Returns the features and the key."""
        if cache is None:
            return self._frozen(img), None
        key = digest(img)
        return Frozen(*cache.get_or_compute(("hdmnet", key), lambda: tuple(self._frozen(img)))), key

    def base_map(self, head: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        """(B, ppm_dim, h, w) query head feature -> (B, 1, h, w) base-learner probability of any base class,
        the episode's own class left out in training (BAM's rule, `ensemble.any_base_class`, from the head
        feature: the PPM is not run twice)."""
        prob = self.base_learner.cls[3:](F.relu(head)).softmax(1)[:, 1:]  # cls[2] is the in-place ReLU: not on `head`
        return any_base_class(prob, self.base_classes, class_id, self.training)

    def forward(self, episode: Episode) -> SegOutput:
        B, S = episode.support_imgs.shape[:2]
        cache = active_cache(self, episode)
        memory = self.memory
        query, query_key = self._features(episode.query_img, cache)
        fg = ops.foreground(episode.support_masks)  # (B, S, H, W)
        # The support image masked at the input: the backbone sees the object only (official extract_feats).
        # One pass per shot, as the PFENet family and the cache (the official code batches every shot).
        shots = [self._features(episode.support_imgs[:, s] * fg[:, s, None], cache)[0] for s in range(S)]
        support = Frozen(*(torch.stack(parts, 1).flatten(0, 1) for parts in zip(*shots, strict=True)))
        support_fg = fg.flatten(0, 1)  # (B*S, H, W), shot-major per episode

        query_mid = torch.cat([query.layer3, query.layer2], 1)
        supp_mid = torch.cat([support.layer3, support.layer2], 1)
        # The RMT memory (scope `mid`) restyles these two before their reductions.
        query_feat = self.down_query(query_mid if memory is None else memory.restyle(query_mid))  # (B, D, h, w)
        supp_feat = self.down_supp(supp_mid if memory is None else memory.restyle(supp_mid))  # (B*S, D, h, w)
        h, w = query_feat.shape[-2:]
        losses = self._memory_step(episode, query_mid, supp_mid, query_feat, supp_feat, support_fg)

        # Priors: PSPNet head feature and layer4, cosine max over the support object, mean over the shots.
        priors = torch.stack([torch.cat([cosine_prior(query.head, support.head[s::S], support_fg[s::S]),
                                         cosine_prior(query.layer4, support.layer4[s::S], support_fg[s::S])], 1)
                              for s in range(S)], 1).mean(1)  # (B, 2, h, w)
        prototypes = ops.masked_average_pool(supp_feat, support_fg)  # (B*S, D)
        prototype = prototypes.view(B, S, -1).mean(1)  # (B, D)
        query_tokens = self.query_merge(torch.cat([query_feat, prototype[:, :, None, None].expand(-1, -1, h, w),
                                                   self.prior_scale * priors], 1))  # (B, E, h, w)
        supp_tokens = self.supp_merge(torch.cat([supp_feat, prototypes[:, :, None, None].expand(-1, -1, h, w)], 1))
        meta_logits, correlations = self.transformer(query_tokens, supp_tokens, support_fg, priors)

        # BAM's ensemble: psi from the layer2 Gram matrices (the support's of the masked image), the base map.
        psi = weighted_psi(self.ensemble, self.ensemble.shot_psi(query.layer2, support.layer2))  # (B,)
        if query_key is None:
            base = self.base_map(query.head, episode.class_id)
        else:  # eval: the map depends on the query alone
            base = cache.get_or_compute(("hdmnet_base_map", query_key),
                                        lambda: self.base_map(query.head, episode.class_id))
        final = self.ensemble(meta_logits, psi, base)  # (B, 2, h, w)

        size = episode.query_img.shape[-2:]
        logits = F.interpolate(final, size=size, mode="bilinear", align_corners=True)
        if not self.training:
            return SegOutput(logits, [], {})
        losses["distill"] = self.distill_weight * distillation_loss(correlations, episode.query_mask)
        aux = [F.interpolate(meta_logits, size=size, mode="bilinear", align_corners=True)]
        return SegOutput(logits, aux, memory_losses(memory, losses))

    def _memory_step(self, episode: Episode, query_mid: torch.Tensor, supp_mid: torch.Tensor,
                     query_feat: torch.Tensor, supp_feat: torch.Tensor, support_fg: torch.Tensor,
                     ) -> dict[str, torch.Tensor]:
        """In training with a memory: its weighted losses, then the write of the RAW mid-level statistics
        (after this step's reads: the contract of models/memory.py, as family.meta_inputs)."""
        memory = self.memory
        if memory is None or not memory.training:
            return {}
        losses = memory.step_losses(episode, self.down_query, query_mid, query_feat, supp_feat, support_fg)
        memory.observe(query_mid, supp_mid)
        return losses


def build(cfg: ModelConfig, options: HDMNetOptions, *, shot: int, base_classes: list[int]) -> HDMNet:
    """HDMNet around a fresh PSPNet base learner (the stages load stage 1 into it through `METHOD.stage1`).
    The memory plugs in at its `mid` scope only (the input of the two reductions): scope `backbone` (restyled
    layer2 / layer3 under layer4, the priors and psi) is not wired into HDMNet's masked-support feature path."""
    if cfg.memory.enabled and cfg.memory.restyle != "mid":
        raise ValueError(f"model.memory.restyle: hdmnet takes the memory at scope `mid` only, got "
                         f"{cfg.memory.restyle!r}")
    base_learner = build_pspnet(cfg, 1 + len(base_classes))
    return HDMNet(base_learner=base_learner, base_classes=base_classes, options=options, shot=shot,
                  memory=build_memory(cfg.memory, mid_channels(base_learner.backbone)),
                  backbone_bn=METHOD.bn_mode(cfg))


def optimizers(model: HDMNet, recipe: OptimConfig) -> list[OptimizerSpec]:
    """One AdamW, two groups (official `get_optim`): the transformer at lr x `transformer_lr_scale`, every
    other learnable parameter at lr."""
    transformer = [p for p in model.transformer.parameters() if p.requires_grad]
    inside = {id(p) for p in transformer}
    rest = [p for p in trainable(model) if id(p) not in inside]
    return [OptimizerSpec("main", [{"params": transformer, "lr_scale": model.transformer_lr_scale},
                                   {"params": rest}], recipe)]


METHOD = Method(
    key="hdmnet", build=build, options=HDMNetOptions, stage1=Stage1("base_learner"), recipe=ADAMW_RECIPE,
    optimizers=optimizers, parts=frozenset({"memory"}), canvas="bam",
    summary="BAM's base learner + hierarchical transformer matching, correlation distillation (CVPR 2023)",
    tiny={"backbone": "small", "pspnet": {"ppm_dim": 32}, "hdmnet": {"reduce_dim": 32, "embed_dim": 16}},
    reference=Reference(4_161_734, {"backbone": "resnet50"}, published="~4.2M"),
)
