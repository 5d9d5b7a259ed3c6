"""PSPNet (Zhao et al., CVPR 2017) on the deep-stem ResNet: BAM's stage-1 base learner, trained end to end
by ordinary supervised segmentation on the base classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fssmeta.config import ModelConfig
from fssmeta.episode import SegOutput
from fssmeta.models.backbone import ResNet, build_backbone
from fssmeta.models.ops import PPM

REFERENCE_LAYER4 = 2048  # ResNet-50/101 layer4 width, at which `model.pspnet.ppm_dim` is stated


class PSPNet(nn.Module):
    """Backbone -> PPM -> 3x3 conv (ppm_dim) BN ReLU Dropout2d -> 1x1 classifier, plus (optionally,
    `model.pspnet.aux_head`) semseg's auxiliary head on layer3, which BAM's own PSPNet does not have. The
    backbone is trainable here; BAM freezes the whole model afterwards."""

    def __init__(self, *, backbone: ResNet, num_classes: int, ppm_dim: int = 512,
                 bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux_head: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        fea_dim = backbone.channels["layer4"]  # 2048 at ResNet-50
        self.ppm = PPM(fea_dim, ppm_dim, bins)
        # At ResNet-50 this is semseg's Conv(4096 -> 512): 2048 + 4 bins x 512 in, 512 out.
        self.cls = nn.Sequential(
            nn.Conv2d(self.ppm.out_channels, ppm_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(ppm_dim),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(ppm_dim, num_classes, 1),
        )
        # semseg's deep supervision on layer3 (1024 -> 256 at ResNet-50; a quarter of layer3 in general).
        # BAM's own stage-1 PSPNet has none: pass aux_head=False for that exact model.
        self.aux: nn.Sequential | None = None
        if aux_head:
            aux_in = backbone.channels["layer3"]
            self.aux = nn.Sequential(
                nn.Conv2d(aux_in, aux_in // 4, 3, padding=1, bias=False),
                nn.BatchNorm2d(aux_in // 4),
                nn.ReLU(inplace=True),
                nn.Dropout2d(dropout),
                nn.Conv2d(aux_in // 4, num_classes, 1),
            )

    def head_features(self, layer4: Tensor) -> Tensor:
        """(B, C4, h, w) -> (B, ppm_dim, h, w): the features before the final 1x1 classifier."""
        return self.cls[:-1](self.ppm(layer4))

    def classify(self, layer4: Tensor) -> Tensor:
        """(B, C4, h, w) -> (B, num_classes, h, w) logits at feature size (BAM's base learner)."""
        return self.cls[-1](self.head_features(layer4))

    def forward(self, image: Tensor) -> SegOutput:
        """(B, 3, H, W) -> logits (B, num_classes, H, W); aux_logits holds the layer3 head in training."""
        size = image.shape[-2:]
        feats = self.backbone(image)
        logits = F.interpolate(self.classify(feats["layer4"]), size=size, mode="bilinear", align_corners=True)
        aux_logits = []
        if self.training and self.aux is not None:
            aux = self.aux(feats["layer3"])  # (B, num_classes, h, w)
            aux_logits.append(F.interpolate(aux, size=size, mode="bilinear", align_corners=True))
        return SegOutput(logits, aux_logits, {})


def build_pspnet(cfg: ModelConfig, num_classes: int) -> PSPNet:
    """PSPNet on the deep-stem `cfg.backbone` (with `cfg.weights` when given).

    `model.pspnet.ppm_dim` is stated at ResNet-50/101 width (512 = 2048 / 4); a narrower backbone scales it
    with its layer4 width, so `small` (layer4 512) gets 128 = layer4 / 4.
    """
    backbone = build_backbone(cfg.backbone, "deep_stem", cfg.weights)
    ppm_dim = max(1, cfg.pspnet.ppm_dim * backbone.channels["layer4"] // REFERENCE_LAYER4)
    return PSPNet(backbone=backbone, num_classes=num_classes, ppm_dim=ppm_dim, bins=cfg.pspnet.ppm_bins,
                  dropout=cfg.pspnet.dropout, aux_head=cfg.pspnet.aux_head)
