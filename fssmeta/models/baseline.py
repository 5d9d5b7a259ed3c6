"""The non-learned reference: cosine similarity to the support prototype, thresholded (no parameters trained)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import ModelConfig
from fssmeta.episode import Episode, SegOutput
from fssmeta.models.backbone import build_backbone
from fssmeta.models.feature_cache import FeatureCache, active_cache, digest
from fssmeta.models.method import Method, Stage1


class PrototypeBaseline(nn.Module):
    """Query pixels whose layer4 feature is close (min-max normalised cosine >= threshold) to the masked
    average of the support layer4 features are foreground. Any learned method must beat it."""

    feature_cache: FeatureCache | None = None  # evaluation's frozen-feature cache (feature_cache.caching)

    def __init__(self, *, backbone: nn.Module, threshold: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.threshold = threshold
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> PrototypeBaseline:
        super().train(mode)
        self.backbone.eval()  # frozen: BN statistics stay fixed
        return self

    def forward(self, episode: Episode) -> SegOutput:
        B, S, _, H, W = episode.support_imgs.shape
        cache = active_cache(self, episode)
        query = self._layer4(episode.query_img, cache)  # (B, C, h, w)
        support = self._layer4(episode.support_imgs.flatten(0, 1), cache)  # (B*S, C, h, w)
        mask = (episode.support_masks.flatten(0, 1) == 1).float()[:, None]  # (B*S, 1, H, W), 255 is not fg
        mask = F.interpolate(mask, size=support.shape[-2:], mode="bilinear", align_corners=True)
        proto = (support * mask).sum((2, 3)) / (mask.sum((2, 3)) + 5e-4)  # (B*S, C)
        proto = proto.view(B, S, -1).mean(1)  # (B, C)
        cos = F.cosine_similarity(query, proto[:, :, None, None], dim=1)  # (B, h, w)
        low = cos.flatten(1).min(1).values[:, None, None]
        high = cos.flatten(1).max(1).values[:, None, None]
        score = (cos - low) / (high - low + 1e-7)
        logits = torch.stack([self.threshold - score, score - self.threshold], dim=1)  # argmax = thresholding
        logits = F.interpolate(logits, size=(episode.query_img.shape[-2:]), mode="bilinear", align_corners=True)
        return SegOutput(logits, [], {})

    def _layer4(self, images: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """(N, 3, H, W) -> layer4, with a cache keyed by the whole batch: the shots run in one pass, so a
        k-shot support set is reused only whole (one batch-1 pass per shot could round differently); a
        single image, a query or a 1-shot support, shares one entry."""
        if cache is None:
            return self.backbone(images)["layer4"]
        return cache.get_or_compute(("layer4", digest(images)), lambda: self.backbone(images)["layer4"])


def build(cfg: ModelConfig, options: None, *, shot: int, base_classes: list[int]) -> PrototypeBaseline:
    """The baseline on the deep-stem backbone; the stages load the fold's stage-1 encoder into it and set
    its cut from `eval.baseline_threshold` (an evaluation setting: changing it retrains nothing)."""
    return PrototypeBaseline(backbone=build_backbone(cfg.backbone, "deep_stem", cfg.weights))


METHOD = Method(
    key="baseline", build=build, stage1=Stage1("backbone"), learned=False,
    summary="non-learned reference: min-max cosine to the support prototype, thresholded",
    tiny={"backbone": "small", "pspnet": {"ppm_dim": 32}},
)
