"""HDMNet's hierarchical transformer (Peng et al., CVPR 2023), plain PyTorch: SegFormer-style stages
(spatial-reduction self-attention, Mix-FFN) on query and supports alike, then per stage the query-to-support
matching whose correlation maps HDMNet distils, coarsest first. Written from the official release
(Pbihao/HDMNet: `model/Transformer.py`, `MaskMultiHeadAttention.py`), which builds it from mmcv / mmseg parts;
`fssmeta/models/hdmnet.py` is the method around it (tests/fixtures/oracle/hdmnet.pt pins the whole forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # every LayerNorm of the official transformer (norm_cfg LN, eps 1e-6)
SCORE_EPS = 1e-9  # official: scores / (sqrt(d) + 1e-9); correlation / (foreground tokens + 1e-9)


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) tokens -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


class Attention(nn.Module):
    """Multi-head attention of HDMNet (official `MaskMultiHeadAttention` in `EfficientMultiheadAttention`):
    bias-free q / k / v / output projections; two forms.

    - `forward(x, hw)`: self-attention, softmax over the keys, scaled by 1 / (sqrt(d) + 1e-9); with
      `sr_ratio` > 1 the keys and values come from the token map reduced by a `sr_ratio` x `sr_ratio` strided
      conv and a LayerNorm (SegFormer's spatial reduction).
    - `match(x, source, source_fg, temperature)`: query-to-support matching, cosine / temperature, softmax over
      the QUERY axis (each support token distributes itself over the query), then background support tokens
      zeroed. It also returns the correlation map: per query token the mean logit over foreground support
      tokens, averaged over the heads (what the distillation compares).
    """

    def __init__(self, dim: int, heads: int, sr_ratio: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.sr: nn.Conv2d | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=LN_EPS)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        B, N, C = x.shape
        return x.view(B, N, self.heads, C // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> the output projection of (B, N, heads * d)."""
        return self.out(x.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) tokens of an (h, w) map -> (B, N, C)."""
        kv = x
        if self.sr is not None:
            kv = self.sr_norm(self.sr(tokens_to_map(x, hw)).flatten(2).transpose(1, 2))  # (B, N / sr^2, C)
        q, k, v = self._split(self.q(x)), self._split(self.k(kv)), self._split(self.v(kv))
        scale = 1.0 / (math.sqrt(q.shape[-1]) + SCORE_EPS)
        return self._merge(F.scaled_dot_product_attention(q, k, v, scale=scale))

    def match(self, x: torch.Tensor, source: torch.Tensor, source_fg: torch.Tensor, temperature: float,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Nq, C) query tokens, (B, Ns, C) support tokens (every shot's), (B, Ns) float 0/1 foreground ->
        (B, Nq, C) attended, (B, Nq) correlation."""
        q, k, v = self._split(self.q(x)), self._split(self.k(source)), self._split(self.v(source))
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / temperature  # (B, h, Nq, Ns)
        fg = source_fg[:, None, None, :]  # (B, 1, 1, Ns)
        attention = scores.softmax(dim=-2) * fg
        correlation = (scores * fg).sum(-1) / (fg.sum(-1) + SCORE_EPS)  # (B, h, Nq)
        return self._merge(attention @ v), correlation.mean(1)


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN: 1x1 conv -> 3x3 depthwise conv (the positional information) -> GELU -> dropout ->
    1x1 conv -> dropout, on the token map."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.position = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) -> (B, N, C), the residual branch only."""
        y = self.drop(F.gelu(self.position(self.fc1(tokens_to_map(x, hw)))))
        return self.drop(self.fc2(y)).flatten(2).transpose(1, 2)


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + dropout(attention(LN(x))), then x + MixFFN(LN(x)). In matching the support tokens
    go through the same first LayerNorm as the query's (official)."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, sr_ratio)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = MixFFN(dim, mlp_ratio * dim, dropout)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), hw))
        return x + self.ffn(self.norm2(x), hw)

    def match(self, x: torch.Tensor, hw: tuple[int, int], source: torch.Tensor, source_fg: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        attended, correlation = self.attn.match(self.norm1(x), self.norm1(source), source_fg, temperature)
        x = x + self.drop(attended)
        return x + self.ffn(self.norm2(x), hw), correlation


class Stage(nn.Module):
    """One downsampling stage, shared by query and support: patch embedding (conv + LayerNorm: 1x1 stride 1
    for the first stage, 3x3 stride 2 after), two self-attention layers, a LayerNorm."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, dropout: float, first: bool) -> None:
        super().__init__()
        kernel, stride = (1, 1) if first else (3, 2)
        self.embed = nn.Conv2d(dim, dim, kernel, stride=stride, padding=stride // 2)
        self.embed_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.layers = nn.ModuleList([TransformerLayer(dim, heads, sr_ratio, mlp_ratio, dropout) for _ in range(2)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, C, H, W) -> (N, h*w, C) tokens and (h, w)."""
        x = self.embed(x)
        hw = (x.shape[2], x.shape[3])
        x = self.embed_norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            x = layer(x, hw)
        return self.norm(x), hw


def bottleneck_head(dim: int, out: int) -> list[nn.Module]:
    """1x1 conv to 4 dim -> BN -> 3x3 conv -> BN -> 1x1 conv to `out` (official `parse_layers` / `cls`; no
    activation between them)."""
    return [nn.Conv2d(dim, 4 * dim, 1), nn.BatchNorm2d(4 * dim), nn.Conv2d(4 * dim, 4 * dim, 3, padding=1),
            nn.BatchNorm2d(4 * dim), nn.Conv2d(4 * dim, out, 1)]


class HierarchicalTransformer(nn.Module):
    """The official `MixVisionTransformer`: stages 60 -> 30 -> 15 (at 473) on query and supports alike, then
    from the coarsest stage up: matching, a 3x3 conv (+BN+ReLU) on [matched, the two priors], a residual
    bottleneck (`parse`) merged with the upsampled coarser result, and a classifier to 2 channels."""

    def __init__(self, dim: int, num_heads: tuple[int, ...], sr_ratios: tuple[int, ...], match_heads: int,
                 mlp_ratio: int, dropout: float, temperature: float, prior_channels: int = 2) -> None:
        super().__init__()
        self.temperature = temperature
        self.stages = nn.ModuleList([Stage(dim, heads, sr, mlp_ratio, dropout, first=i == 0)
                                     for i, (heads, sr) in enumerate(zip(num_heads, sr_ratios, strict=True))])
        self.matchers = nn.ModuleList([TransformerLayer(dim, match_heads, 1, mlp_ratio, dropout) for _ in num_heads])
        self.fuse = nn.ModuleList()
        for _ in num_heads:  # mmcv ConvModule: bias-free conv, BN, ReLU; its conv He-initialised (fan_out)
            conv = nn.Conv2d(dim + prior_channels, dim, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.fuse.append(nn.Sequential(conv, nn.BatchNorm2d(dim), nn.ReLU(inplace=True)))
        self.parse = nn.ModuleList([nn.Sequential(*bottleneck_head(dim, dim)[:-1], nn.Conv2d(4 * dim, dim, 1),
                                                  nn.BatchNorm2d(dim), nn.ReLU()) for _ in num_heads])
        self.cls = nn.Sequential(*bottleneck_head(dim, 2))

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_fg: torch.Tensor, priors: torch.Tensor,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, h, w) query, (B*S, C, h, w) supports (shot-major per episode), (B*S, H, W) float foreground,
        (B, 2, h, w) priors -> (B, 2, h, w) meta logits and the stages' (B, h_i, w_i) correlation maps,
        coarsest first."""
        B = query.shape[0]
        levels = []  # per stage: query tokens, its (h, w), support tokens (B, S*h*w, C), foreground (B, S*h*w)
        for stage in self.stages:
            query, hw = stage(query)
            support, support_hw = stage(support)
            fg = F.interpolate(support_fg[:, None], size=support_hw, mode="nearest")  # (B*S, 1, h, w)
            levels.append((query, hw, support.reshape(B, -1, support.shape[-1]), fg.reshape(B, -1)))
            query, support = tokens_to_map(query, hw), tokens_to_map(support, support_hw)

        out, correlations = None, []
        for i in reversed(range(len(self.stages))):
            query_tokens, hw, support_tokens, fg = levels[i]
            matched, correlation = self.matchers[i].match(query_tokens, hw, support_tokens, fg, self.temperature)
            correlations.append(correlation.view(B, *hw))
            prior = F.interpolate(priors, size=hw, mode="bilinear", align_corners=True)
            matched = self.fuse[i](torch.cat([tokens_to_map(matched, hw), prior], 1))  # (B, C, h, w)
            if out is None:
                out = self.parse[i](matched)
            else:
                out = F.interpolate(out, size=hw, mode="bilinear", align_corners=False)
                out = out + self.parse[i](matched + out)
        return self.cls(out), correlations
