"""CRNet (Liu et al., CVPR 2020, "CRNet: Cross-Reference Networks for Few-Shot Segmentation"): a Siamese frozen
backbone, a cross-reference module that re-weights both images' channels by what they share, a condition
module per image (query and support are both predicted, both supervised) and an iterated mask refinement.

APPROXIMATE: there is no official code; built from the paper's description (docs/methods.md, CRNet). Open in
the paper and chosen here: the gate's hidden width (= `reduce_dim`), the refinement's first input (a zero
probability map), one refinement module shared by both branches, CE on the final iteration only, frozen BN,
He init of the head and half the run's learning rate (both against the all-background plateau; measured in
docs/results.md, CRNet), and the k-shot forward without fine-tuning (the query is re-weighted by the mean of
the shots' gates and conditioned on the mean prototype). The paper's k-shot inference, fine-tuning on the k
labelled supports, is the `finetune` regime (fssmeta/adaptation.py), open to every learned method.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fssmeta.config import ModelConfig, OptimConfig, Positive, Section
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import cross_entropy
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet, build_backbone, freeze_
from fssmeta.models.family import PFENET_RECIPE, FrozenBackboneModel, mid_channels
from fssmeta.models.feature_cache import FeatureCache, active_cache, digest
from fssmeta.models.method import Method, OptimizerSpec, Reference, Stage1, trainable


class CRNetOptions(Section):
    """`model.crnet`: widths, the refinement's iterations and the support loss weight (docs/methods.md, CRNet)."""

    reduce_dim: int = 256  # the Siamese mid-level feature width
    refine_iterations: Positive = 4  # passes of the mask refinement, each fed the previous probability map
    aspp_dilations: tuple[int, ...] = (6, 12, 18)  # of the refinement's ASPP, at a 60x60 feature map
    dropout: float = 0.1  # classifier head
    feature_dropout: float = 0.5  # the Siamese reduction (PFENet's constant)
    support_weight: float = Field(default=1.0, ge=0)  # CE of the support prediction, beside the query's
    init: Literal["he", "pytorch"] = "he"  # the head's convs: He (fan-in, ReLU) | PyTorch's default
    lr_scale: float = Field(default=0.5, gt=0)  # trains at train.optim.lr x this (at the params' 0.05: plateau)


class CrossReference(nn.Module):
    """Per image GAP -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid: a channel importance vector per image (own
    weights per branch). The product of the two vectors keeps the channels BOTH images excite (the
    co-occurring object) and re-weights both feature maps with it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_gate = self._gate(dim)
        self.support_gate = self._gate(dim)

    @staticmethod
    def _gate(dim: int) -> nn.Sequential:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, 1), nn.ReLU(inplace=True),
                             nn.Conv2d(dim, dim, 1), nn.Sigmoid())

    def forward(self, query_feat: torch.Tensor, supp_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) query, (B, S, D, h, w) supports -> both re-weighted, same shapes. The query takes the
        mean of the shots' vectors; each support shot its own vector times the query's."""
        B, S = supp_feat.shape[:2]
        query_vec = self.query_gate(query_feat)[:, None]  # (B, 1, D, 1, 1)
        supp_vec = self.support_gate(supp_feat.flatten(0, 1)).view(B, S, -1, 1, 1)  # (B, S, D, 1, 1)
        common = query_vec * supp_vec  # (B, S, D, 1, 1)
        return query_feat * common.mean(1), supp_feat * common


def condition_block(dim: int) -> nn.ModuleDict:
    """One branch of the condition module: concat(feature, prototype) -> 1x1 merge, then a residual pair."""
    return nn.ModuleDict({"merge": ops.merge_conv(2 * dim, dim), "residual": ops.residual_pair(dim)})


class MaskRefinement(nn.Module):
    """One refinement pass: concat(conditioned feature, previous foreground probability) -> merge ->
    residual pair -> ASPP (reduced back to `dim`) -> classifier logits. Called `iterations` times."""

    def __init__(self, dim: int, dilations: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.merge = ops.merge_conv(dim + 1, dim)
        self.residual = ops.residual_pair(dim)
        self.aspp = ops.ASPP(dim, dim // 4, dilations)
        self.aspp_reduce = ops.merge_conv(self.aspp.out_channels, dim)
        self.cls = ops.classifier(dim, dropout)

    def forward(self, feat: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) feature, (N, 1, h, w) foreground probability -> (N, 2, h, w) logits."""
        x = self.merge(torch.cat([feat, prob], 1))
        x = self.residual(x) + x
        return self.cls(self.aspp_reduce(self.aspp(x)))


class Prediction(NamedTuple):
    """Feature-size logits of both branches."""

    query_logits: torch.Tensor  # (B, 2, h, w)
    support_logits: torch.Tensor | None  # (B*S, 2, h, w) shot-major per episode; None when not asked for


class CRNet(FrozenBackboneModel):
    """Cross-reference network over a frozen backbone (eval-mode BN). In training `forward` also predicts
    every support from the support prototype and adds its CE (`support_ce`) to the loss dict."""

    def __init__(self, *, backbone: ResNet, reduce_dim: int = 256, refine_iterations: int = 4,
                 aspp_dilations: tuple[int, ...] = (6, 12, 18), dropout: float = 0.1, feature_dropout: float = 0.5,
                 support_weight: float = 1.0, init: Literal["he", "pytorch"] = "he", lr_scale: float = 0.5,
                 shot: int = 1) -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.shot = shot  # shots it is trained for (1: k-shot comes from the `finetune` regime)
        self.refine_iterations = refine_iterations
        self.support_weight = support_weight
        self.lr_scale = lr_scale  # read by `optimizers` (the record's), not saved: it comes from the options
        self.reduce = ops.reduce_block(mid_channels(backbone), reduce_dim, feature_dropout)  # Siamese: shared
        self.cross_reference = CrossReference(reduce_dim)
        self.query_condition = condition_block(reduce_dim)
        self.support_condition = condition_block(reduce_dim)
        self.refine = MaskRefinement(reduce_dim, tuple(aspp_dilations), dropout)  # shared by both branches
        if init == "he":
            he_init_(self)

    def _mid(self, img: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """(N, 3, H, W) -> frozen concat(layer3, layer2) (N, C3 + C2, h, w), through the cache when active."""

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            layer2 = self.backbone.layer2(self.backbone.layer1(self.backbone.layer0(img)))
            return layer2, self.backbone.layer3(layer2)

        with torch.no_grad():
            layer2, layer3 = compute() if cache is None else cache.get_or_compute(("mid", digest(img)), compute)
        return torch.cat([layer3, layer2], 1)

    @staticmethod
    def _condition(block: nn.ModuleDict, feat: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) feature, (N, D) prototype -> (N, D, h, w)."""
        x = block["merge"](torch.cat([feat, prototype[:, :, None, None].expand_as(feat)], 1))
        return block["residual"](x) + x

    def predict(self, episode: Episode, *, with_support: bool) -> Prediction:
        """Both branches at feature size; the support branch only when `with_support` (training)."""
        B, S = episode.support_imgs.shape[:2]
        cache = active_cache(self, episode)
        query_feat = self.reduce(self._mid(episode.query_img, cache))  # (B, D, h, w)
        # One backbone pass per shot (as the PFENet family), each image through the cache at batch 1.
        supp_feat = torch.stack([self.reduce(self._mid(episode.support_imgs[:, s], cache)) for s in range(S)], 1)
        query_feat, supp_feat = self.cross_reference(query_feat, supp_feat)  # (B, D, h, w), (B, S, D, h, w)
        supp_flat = supp_feat.flatten(0, 1)  # (B*S, D, h, w)
        fg = ops.foreground(episode.support_masks.flatten(0, 1))  # (B*S, H, W)
        shot_prototypes = ops.masked_average_pool(supp_flat, fg).view(B, S, -1)  # (B, S, D)

        feats = [self._condition(self.query_condition, query_feat, shot_prototypes.mean(1))]
        if with_support:  # each shot conditioned on its own prototype
            feats.append(self._condition(self.support_condition, supp_flat, shot_prototypes.flatten(0, 1)))
        feat = torch.cat(feats)  # (B [+ B*S], D, h, w): the shared refinement runs once per iteration
        prob = feat.new_zeros(feat.shape[0], 1, *feat.shape[-2:])  # no previous prediction yet
        for _ in range(self.refine_iterations):
            logits = self.refine(feat, prob)
            prob = logits.softmax(1)[:, 1:]
        return Prediction(logits[:B], logits[B:] if with_support else None)

    def forward(self, episode: Episode) -> SegOutput:
        prediction = self.predict(episode, with_support=self.training)
        size = episode.query_img.shape[-2:]
        logits = F.interpolate(prediction.query_logits, size=size, mode="bilinear", align_corners=True)
        extra: dict[str, torch.Tensor] = {}
        if prediction.support_logits is not None:
            extra["support_ce"] = self.support_weight * cross_entropy(prediction.support_logits,
                                                                      episode.support_masks.flatten(0, 1))
        return SegOutput(logits, [], extra)


def he_init_(model: CRNet) -> None:
    """He (fan-in, ReLU) weights and zero biases for the learnable convs between the frozen backbone and the
    logits, except the last classifier conv and the gates. PyTorch's default init shrinks the second moment
    about 6x per conv + ReLU: through CRNet's 11 head convs the logits came out spatially constant (the fg - bg
    logit's spatial std 0.003 against its mean 0.058), the classifier bias took almost all the gradient, and
    training stayed on the all-background plateau (docs/results.md, CRNet)."""
    # ops.he_init_ keeps the classifiers (the last conv, to 2 channels); the gates are outside these modules.
    ops.he_init_([model.reduce, model.query_condition, model.support_condition, model.refine])


def build(cfg: ModelConfig, options: CRNetOptions, *, shot: int, base_classes: list[int]) -> CRNet:
    """CRNet on a frozen deep-stem backbone; `base_classes` is unused (no base learner)."""
    return CRNet(backbone=build_backbone(cfg.backbone, "deep_stem", cfg.weights), reduce_dim=options.reduce_dim,
                 refine_iterations=options.refine_iterations, aspp_dilations=options.aspp_dilations,
                 dropout=options.dropout, feature_dropout=options.feature_dropout,
                 support_weight=options.support_weight, init=options.init, lr_scale=options.lr_scale, shot=shot)


def optimizers(model: CRNet, recipe: OptimConfig) -> list[OptimizerSpec]:
    """One optimiser, every learnable parameter at the recipe's lr x `lr_scale`."""
    return [OptimizerSpec("main", [{"params": trainable(model), "lr_scale": model.lr_scale}], recipe)]


METHOD = Method(
    key="crnet", build=build, options=CRNetOptions, stage1=Stage1("backbone"), recipe=PFENET_RECIPE,
    optimizers=optimizers,
    trains_each_shot=False,  # trained 1-shot; k shots by the `finetune` regime (or the shot-mean forward)
    summary="cross-reference + support prediction + iterated mask refinement (CVPR 2020; approximate)",
    tiny={"backbone": "small", "pspnet": {"ppm_dim": 32},
          "crnet": {"reduce_dim": 32, "refine_iterations": 2, "aspp_dilations": (1, 2, 3)}},
    # No published count (no official code): the figure measured at this layout, so a change is caught.
    reference=Reference(5_670_978, {"backbone": "resnet50"}, published="none (no official code; measured)"),
)
