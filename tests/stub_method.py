"""stub: a throwaway method of another family, HSNet-shaped, that the plug-in tests drop into fssmeta/models/
as `stub.py` to show a method is one file + one METHODS line + its `model.stub` options section.

What differs from the PFENet family, all declared in its record: no stage 1 (its frozen backbone is its own),
the torchvision-layout backbone's bottleneck features, `support_masking` honoured (feature / input / hybrid),
training images resized (no augmentation), Adam at a constant rate, trained 1-shot and evaluated at every k by
averaging the per-shot correlations, and a CE-only loss of its own.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import ModelConfig, OptimConfig, Section
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import cross_entropy
from fssmeta.models.backbone import ResNet, build_backbone, freeze_, masked_bottleneck_features
from fssmeta.models.family import FrozenBackboneModel
from fssmeta.models.method import Method


class StubOptions(Section):
    """`model.stub`."""

    hidden: int = 8
    support_masking: Literal["feature", "input", "hybrid"] = "feature"


class Stub(FrozenBackboneModel):
    """Cosine correlation of the last bottleneck features (clamped at 0, max over support pixels, mean over
    shots) -> a small conv head."""

    def __init__(self, *, backbone: ResNet, hidden: int, support_masking: str) -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.support_masking = support_masking
        self.head = nn.Sequential(nn.Conv2d(1, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 2, 1))

    def forward(self, episode: Episode) -> SegOutput:
        B, S = episode.support_imgs.shape[:2]
        with torch.no_grad():
            query = self.backbone.bottleneck_features(episode.query_img)[-1]  # (B, C, h, w)
            support = masked_bottleneck_features(self.backbone, episode.support_imgs.flatten(0, 1),
                                                 episode.support_masks.flatten(0, 1), self.support_masking)[-1]
        q = F.normalize(query.repeat_interleave(S, 0).flatten(2), dim=1)  # (B*S, C, Nq)
        s = F.normalize(support.flatten(2), dim=1)  # (B*S, C, Ns)
        corr = torch.bmm(q.transpose(1, 2), s).clamp(min=0).amax(2)  # (B*S, Nq)
        corr = corr.view(B, S, 1, *query.shape[-2:]).mean(1)  # (B, 1, h, w): the shots vote
        logits = F.interpolate(self.head(corr), size=episode.query_img.shape[-2:], mode="bilinear",
                               align_corners=True)
        return SegOutput(logits, [], {})


def stub_loss(model: nn.Module, episode: Episode) -> dict[str, torch.Tensor]:
    return {"ce": cross_entropy(model(episode).logits, episode.query_mask)}


def build(cfg: ModelConfig, options: StubOptions, *, shot: int, base_classes: list[int]) -> Stub:
    return Stub(backbone=build_backbone(cfg.backbone, "torchvision", cfg.weights), hidden=options.hidden,
                support_masking=options.support_masking)


METHOD = Method(
    key="stub", build=build, options=StubOptions, stage1=None,
    recipe=OptimConfig(optimizer="adam", lr=1.0e-3, momentum=0.9, weight_decay=0.0, power=0.0, warmup_steps=0),
    transform="resize", trains_each_shot=False, loss=stub_loss, tiny={"backbone": "small"},
)
