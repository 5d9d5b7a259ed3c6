"""Blocks shared by several methods: masked average pooling, the PFENet prior mask, BAM's Gram distance,
the PFENet-family conv blocks (reduce, residual pair, classifier head, merge), pyramid bins, and the ASPP /
pyramid-pooling modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# PFENet / BAM constants, kept so that results are comparable with the official code.
AREA_EPS = 5e-4  # Weighted_GAP: an empty mask gives a zero prototype instead of a division by zero
COSINE_EPS = 1e-7


def foreground(masks: Tensor) -> Tensor:
    """(..., H, W) 0/1/255 labels -> float 0/1. As in PFENet, 255 (ignore) counts as not-the-class."""
    return (masks == 1).float()


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


def he_init_(modules: Sequence[nn.Module]) -> None:
    """He (fan-in, ReLU) weights and zero biases for every learnable conv in `modules` but the classifiers
    (convs to at most 2 channels, which keep their init; frozen convs are left alone): the `he` head init
    against the all-background plateau, where PyTorch's default init leaves the untrained logits spatially
    flat and the classifier bias takes the gradient (docs/results.md, "The all-background plateau")."""
    for module in modules:
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d) and conv.out_channels > 2 and conv.weight.requires_grad:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)


def merge_conv(in_dim: int, out_dim: int) -> nn.Sequential:
    """1x1 conv (no bias) -> ReLU: PFENet's init_merge / res1 shape."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), nn.ReLU(inplace=True))


def scaled_bins(bins: Sequence[int], size: tuple[int, int]) -> list[tuple[int, int]]:
    """Pyramid bins for an (h, w) feature map; `bins[0]` is the feature size they were chosen for.

    Approximate for non-reference sizes (PFENet uses fixed bins at 60x60): bin = max(1, round(b * h / bins[0])).
    """
    h, w = size
    ref = bins[0]
    return [(max(1, int(b * h / ref + 0.5)), max(1, int(b * w / ref + 0.5))) for b in bins]


def _resized_mask(mask: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """(B, H, W) or (B, 1, H, W) float 0/1 -> (B, 1, h, w), bilinear with align_corners as PFENet."""
    mask = mask.unsqueeze(1) if mask.dim() == 3 else mask
    mask = mask.to(dtype)
    if mask.shape[-2:] != size:
        mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=True)
    return mask


def masked_average_pool(feat: Tensor, mask: Tensor) -> Tensor:
    """feat (B, C, h, w), mask (B, H, W) float 0/1 -> (B, C): sum(f * m) / (sum(m) + 5e-4)."""
    m = _resized_mask(mask, feat.shape[-2:], feat.dtype)  # (B, 1, h, w)
    return (feat * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + AREA_EPS)


def prior_mask(query_feat4: Tensor, support_feat4: Tensor, support_mask: Tensor) -> Tensor:
    """PFENet's training-free prior: (B, C, h, w) query and support layer4, (B, H, W) float mask ->
    (B, 1, h, w).

    For every query pixel, the highest cosine similarity with any masked support pixel, then min-max
    normalised per image, so the prior says where the query looks MOST like the object, in [0, 1].
    """
    B, C, h, w = query_feat4.shape
    m = _resized_mask(support_mask, support_feat4.shape[-2:], support_feat4.dtype)
    supp = (support_feat4 * m).flatten(2).transpose(1, 2)  # (B, Ns, C)
    query = query_feat4.flatten(2)  # (B, C, Nq)
    query_norm = query.norm(dim=1, keepdim=True)  # (B, 1, Nq)
    # Official form: dot / (|s| |q| + eps), so a zeroed (background) support pixel scores exactly 0, not
    # NaN. Such pixels are left out of the product and stand in as that 0 in the max: the same function
    # as the official all-pixel one, at the object's share of its cost (the prior's products were a fifth
    # of a 5-shot BAM / PFENet episode on CPU).
    keep = m.flatten(1) > 0  # (B, Ns)
    similarity = []
    for b in range(B):
        s = supp[b, keep[b]]  # (n, C), the masked support pixels
        sim = (s @ query[b]) / (s.norm(dim=1, keepdim=True) * query_norm[b] + COSINE_EPS)  # (n, Nq)
        best = sim.max(dim=0).values if len(s) else query_norm.new_zeros(query.shape[-1])  # (Nq,)
        similarity.append(best.clamp_min(0) if len(s) < supp.shape[1] else best)
    similarity = torch.stack(similarity)  # (B, Nq)
    low = similarity.min(dim=1, keepdim=True).values
    high = similarity.max(dim=1, keepdim=True).values
    return ((similarity - low) / (high - low + COSINE_EPS)).view(B, 1, h, w)


def gram_matrix(feat: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, C) channel-normalised Gram matrix (BAM's get_gram_matrix): the cosine
    similarity of every pair of channel vectors over the pixels; in [0, 1] for post-ReLU features."""
    B, C = feat.shape[:2]
    f = feat.reshape(B, C, -1)  # (B, C, N)
    norm = f.norm(dim=2, keepdim=True)  # (B, C, 1)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + COSINE_EPS)


def gram_distance(query_feat: Tensor, support_feat: Tensor) -> Tensor:
    """BAM's psi: (B, C, h, w) query and support features -> (B, 1) = ||G_q - G_s||_F / ||1_{CxC}||_F.

    ||1_{CxC}||_F = C (BAM computes it as `torch.ones_like(gram).norm()`): psi is the RMS of the Gram
    difference, 0 for identical styles and at most 1 for non-negative features.
    """
    return gram_psi(gram_matrix(query_feat), gram_matrix(support_feat))


def gram_psi(query_gram: Tensor, support_gram: Tensor) -> Tensor:
    """`gram_distance` from (B, C, C) Gram matrices -> (B, 1); lets a k-shot episode compute its query's
    Gram once (as BAM does) rather than once per shot."""
    diff = query_gram - support_gram  # (B, C, C)
    return (diff.norm(dim=(1, 2)) / query_gram.shape[1]).unsqueeze(1)


class ASPP(nn.Module):
    """BAM's ASPP (model/ASPP.py): image pooling, a 1x1 and one 3x3 per dilation, each `in_dim -> out_dim`
    conv with bias + ReLU and no BN; outputs their CONCATENATION, `out_channels` = (2 + len(dilations)) *
    out_dim. BAM reduces it with a separate 1x1 (`res1_meta`), which the method owns."""

    def __init__(self, in_dim: int, out_dim: int, dilations: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.image_pool = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1), nn.ReLU())
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(in_dim, out_dim, 1), nn.ReLU())])
        for d in dilations:
            dilated = nn.Conv2d(in_dim, out_dim, 3, padding=d, dilation=d)
            self.branches.append(nn.Sequential(dilated, nn.ReLU()))
        self.out_channels = out_dim * (2 + len(dilations))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # BAM's _init_weight (biases keep PyTorch's default)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim, h, w) -> (B, out_channels, h, w)."""
        h, w = x.shape[-2:]
        pooled = self.image_pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, h, w)  # (B, out_dim, h, w)
        return torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1)


class PPM(nn.Module):
    """PSPNet's pyramid pooling: per bin, adaptive average pool -> 1x1 conv (no bias) -> BN -> ReLU ->
    bilinear upsample; concatenated after the input. `out_channels` = in_dim + len(bins) * reduction_dim."""

    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.features = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                          nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True))
            for b in bins
        ])
        self.out_channels = in_dim + len(bins) * reduction_dim

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim, h, w) -> (B, out_channels, h, w)."""
        size = x.shape[-2:]
        pooled = [F.interpolate(f(x), size=size, mode="bilinear", align_corners=True) for f in self.features]
        return torch.cat([x, *pooled], dim=1)
