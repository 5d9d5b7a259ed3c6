"""NTRENet's non-target mining (Liu et al., CVPR 2022), reusable by any PFENet-family model: the background
mining / elimination modules, the distracting-object mask and elimination, and the prototypical contrastive
loss with its per-class queue of distractor prototypes.

The background map's channel 1 is "background" and channel 0 "not background". NTRENet trains it towards
"background" everywhere and towards "not background" on the episode's class, so "background" reads as "not
the target"; what is neither background nor the (predicted) target is a distracting object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fssmeta.episode import IGNORE_INDEX
from fssmeta.losses import resize_logits
from fssmeta.models.ops import classifier, masked_average_pool, residual_pair

FOREGROUND_EPS = 1e-5  # NTRENet's weighted_BCE: an empty foreground gives 0, not 0 / 0
BACKGROUND_TERM_WEIGHT = 0.5  # NTRENet's `erfa`: the "background everywhere" term


def _tiled(prototype: Tensor, like: Tensor) -> Tensor:
    """(D,) or (B, D) -> (B, D, h, w), the size of `like` (B, *, h, w)."""
    B, _, h, w = like.shape
    prototype = prototype.to(like.dtype)
    if prototype.dim() == 1:
        prototype = prototype[None]
    return prototype[:, :, None, None].expand(B, -1, h, w)


class BackgroundMining(nn.Module):
    """BGMM: a learnable background prototype and the head that maps a feature to a background map.

    The official `bg_prototype` is ONE vector of shape (1, 256, 1, 1), zero-initialised; the "256 x 2" in the
    method notes is the width of concat(feature, tiled prototype) that the 1x1 conv (`down_bg`, 512 -> 256)
    reads, not two prototypes. Here the parameter is stored flat as (D,), zero-initialised as officially.
    """

    def __init__(self, dim: int, *, dropout: float = 0.1, feature_dropout: float = 0.5) -> None:
        super().__init__()
        self.bg_prototype = nn.Parameter(torch.zeros(dim))  # (D,)
        # NTRENet's down_bg (with the reduce blocks' Dropout2d(0.5)), bg_res1 and bg_cls.
        self.down = nn.Sequential(
            nn.Conv2d(2 * dim, dim, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(feature_dropout)
        )
        self.residual = residual_pair(dim)
        self.head = classifier(dim, dropout)

    def prototype(self) -> Tensor:
        """(D,) the background prototype that BGEM tiles."""
        return self.bg_prototype

    def forward(self, feat: Tensor) -> Tensor:
        """(N, D, h, w) reduced features -> (N, 2, h, w) logits; channel 1 = background."""
        x = self.down(torch.cat([feat, _tiled(self.bg_prototype, feat)], 1))
        x = self.residual(x) + x
        return self.head(x)


def background_loss(bg_logits: Tensor, labels: Tensor) -> Tensor:
    """BGMM's loss: (N, 2, h, w) logits, (N, H, W) 0/1/255 labels -> scalar.

    Per image, CE towards "not background" summed over the ground-truth foreground and divided by its area
    (+1e-5), averaged over images; plus 0.5 * CE towards "background" averaged over all non-255 pixels.
    Logits are resized to the labels first (bilinear, align_corners=True). Approximate: the official
    "background" term also covers 255 pixels (its targets are all ones, so nothing is ignored).
    """
    logits = resize_logits(bg_logits, labels.shape[-2:]).float()  # (N, 2, H, W)
    log_prob = logits.log_softmax(dim=1)
    fg = (labels == 1).to(log_prob.dtype)  # (N, H, W)
    valid = (labels != IGNORE_INDEX).to(log_prob.dtype)
    not_bg = -(log_prob[:, 0] * fg).sum(dim=(1, 2)) / (fg.sum(dim=(1, 2)) + FOREGROUND_EPS)  # (N,)
    # Summed over valid pixels over their count (at least 1): an all-255 batch contributes 0, not NaN.
    bg = -(log_prob[:, 1] * valid).sum() / valid.sum().clamp_min(1.0)
    return not_bg.mean() + BACKGROUND_TERM_WEIGHT * bg


class BackgroundElimination(nn.Module):
    """BGEM's merge: concat(feature, tiled background prototype) -> 1x1 conv (no bias) -> ReLU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.merge = nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), nn.ReLU(inplace=True))

    def forward(self, feat: Tensor, bg_prototype: Tensor) -> Tensor:
        """(B, D, h, w) feature, (D,) or (B, D) prototype -> (B, D, h, w)."""
        return self.merge(torch.cat([feat, _tiled(bg_prototype, feat)], 1))


@torch.no_grad()
def distractor_mask(bg_logits: Tensor, init_logits: Tensor) -> Tensor:
    """(B, 2, h, w) background map and initial prediction -> (B, 1, h, w) float 0/1.

    relu(1 - argmax(background map) - argmax(initial prediction)): 1 where the pixel is neither background
    nor the predicted target. No gradient (argmax).
    """
    bg = bg_logits.argmax(dim=1, keepdim=True)
    target = init_logits.argmax(dim=1, keepdim=True)
    return (1 - bg - target).clamp_min(0).to(bg_logits.dtype)


class DistractorElimination(nn.Module):
    """DOEM's merge: concat(feature, tiled distracting-object prototype) -> 1x1 conv (no bias) -> ReLU.

    `prototype`: "average" (NTRENet's: the mean of mask x feature over ALL pixels, so it shrinks with the
    distractor's area) or "masked" (sum / (area + 5e-4), `model.mining.do_prototype: masked`)."""

    def __init__(self, dim: int, prototype: str = "average") -> None:
        super().__init__()
        self.merge = nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.prototype = prototype

    def forward(self, feat: Tensor, query_feat: Tensor, do_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, h, w) feature to merge into, (B, D, h, w) query feature, (B, 1, h, w) 0/1 mask ->
        ((B, D, h, w) merged feature, (B, D) distractor prototype; zero where the mask is empty)."""
        if self.prototype == "average":
            do_prototype = (query_feat * do_mask).mean(dim=(2, 3))  # (B, D)
        else:
            do_prototype = masked_average_pool(query_feat, do_mask)
        merged = self.merge(torch.cat([feat, _tiled(do_prototype, feat)], 1))
        return merged, do_prototype


class DistractorQueue:
    """Per class id, a FIFO of the newest `size` distractor prototypes: PCL's negatives.

    Deliberately a plain object, not an nn.Module and not buffers: it is a training-time cache, so it stays
    out of `state_dict` (checkpoints do not carry it; it refills within a few hundred steps after a resume)
    and out of DDP's buffer broadcast, which would overwrite each rank's own writes with rank 0's. Each
    process keeps the prototypes it saw, as the official per-process dictionary does.
    """

    def __init__(self, dim: int, size: int = 2000, sample: int = 1000) -> None:
        self.dim = dim
        self.size = size
        self.sample = sample
        self._store: dict[int, Tensor] = {}  # class id -> (n, D), newest first
        self._device = torch.device("cpu")
        self._dtype = torch.float32

    def push(self, class_ids: Tensor, prototypes: Tensor, valid: Tensor) -> None:
        """(B,) class ids, (B, D) prototypes, (B,) bool: store detached copies of the valid rows."""
        prototypes = prototypes.detach()
        self._device, self._dtype = prototypes.device, prototypes.dtype
        keep = valid.to(torch.bool).cpu()
        ids = class_ids.cpu()[keep].tolist()
        rows = prototypes[keep.to(prototypes.device)]
        # Row by row, so that within one push a later row counts as newer than an earlier one.
        for class_id, row in zip(ids, rows, strict=True):
            old = self._store.get(class_id)
            new = row[None].clone()
            stacked = new if old is None else torch.cat([new, old.to(new.device, new.dtype)], 0)
            self._store[class_id] = stacked[: self.size]

    def negatives(self, class_id: int, generator: torch.Generator | None = None) -> Tensor:
        """(k, D) stored prototypes of `class_id`, k <= `sample` (a random subset when more are stored);
        (0, D) when none. On the device and dtype of the last push."""
        stored = self._store.get(int(class_id))
        if stored is None:
            return torch.zeros(0, self.dim, device=self._device, dtype=self._dtype)
        stored = stored.to(self._device, self._dtype)
        if stored.shape[0] > self.sample:
            order = torch.randperm(stored.shape[0], generator=generator)[: self.sample]
            stored = stored[order.to(stored.device)]
        return stored

    def __len__(self) -> int:
        """Prototypes stored over all classes."""
        return sum(t.shape[0] for t in self._store.values())


PCL_EPS = 1e-8  # NTRENet's: inside the log of the paper form


def prototypical_contrastive_loss(anchor: Tensor, positive: Tensor, negatives: list[Tensor],
                                  temperature: float = 1.0, form: str = "paper") -> Tensor:
    """PCL over cosine similarities: (B, D) anchors, (B, D) positives, B tensors (k_b, D) -> scalar, the
    mean over b, s = cosine / temperature, of
    - "paper" (NTRENet's paper and release): -log(exp(s_pos) / sum_k exp(s_neg_k) + 1e-8), the positive
      left out of the denominator;
    - "infonce": -log(exp(s_pos) / (exp(s_pos) + sum_k exp(s_neg_k))), the standard form.
    With no negatives a term is exactly 0 (still part of the graph).
    """
    anchor_unit = F.normalize(anchor.float(), dim=-1)  # (B, D); a zero vector stays zero, no NaN
    positive_unit = F.normalize(positive.float(), dim=-1)
    terms = []
    for b, neg in enumerate(negatives):
        pos = (anchor_unit[b] * positive_unit[b]).sum()[None]  # (1,)
        neg_sim = F.normalize(neg.to(anchor_unit), dim=-1) @ anchor_unit[b]  # (k_b,)
        logits = torch.cat([pos, neg_sim]) / temperature  # (1 + k_b,)
        if form == "infonce":
            terms.append(torch.logsumexp(logits, dim=0) - logits[0])
        elif neg.shape[0] == 0:
            terms.append(logits[0] * 0)
        else:
            ratio = torch.exp(logits[0] - torch.logsumexp(logits[1:], dim=0))
            terms.append(-torch.log(ratio + PCL_EPS))
    return torch.stack(terms).mean()
