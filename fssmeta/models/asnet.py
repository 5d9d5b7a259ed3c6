"""ASNet (Kang & Cho, CVPR 2022, "Integrative Few-Shot Learning for Classification and Segmentation"): HSNet's
hypercorrelation squeezed by attentive squeeze layers (the support mask as an attention mask), mixed l4 -> l3 ->
l2 and decoded by HSNet's decoder into per-way log-probabilities; the FS-CS merge and presence rule.

Faithful to the official release (dahyun-kang/ifsl: `fs-cs/model/asnet.py`, `module/asnet.py`, `base/aslayer.py`,
`base/correlation.py`, `base/feature.py`, `ifsl.py`; tests/fixtures/oracle/asnet.pt pins its forward), except
where a comment says otherwise: the query is encoded once per episode; supports are resized to `support_size`.
The weak-label objective (`presence_loss`) is official `compute_cls_objective` (`ifsl.py`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fssmeta.config import ModelConfig, Section
from fssmeta.episode import IGNORE_INDEX, Episode, FSCSEpisode, SegOutput
from fssmeta.losses import resize_logits
from fssmeta.metrics import presence_from_probs
from fssmeta.models.backbone import ResNet, freeze_, masked_bottleneck_features
from fssmeta.models.family import FrozenBackboneModel
from fssmeta.models.feature_cache import active_cache
from fssmeta.models.hsnet import (
    ADAM_RECIPE,
    GROUPS,
    bottleneck_features,
    decode,
    decoder,
    frozen_backbone,
    multilayer_correlation,
    resize_query_dims,
    unit_features,
)
from fssmeta.models.method import Method, Reference, Stage1, WeakLabels

HEADS = 8  # attention heads of every attentive squeeze layer
MASKED_LOGIT = -1e9  # the attention logit of a masked-out key (official): a key-less row softmaxes to uniform
POOL_WIDTH = 50  # support features at least this wide are average-pooled 3x3 / 2 (official `pool_thr`: 400 px)
# The official learner squeezes the support dims to 2x2 (then 1x1 in the mixing blocks' kernel-2 layers) only
# when the support's layer2 map is 50-64 wide after pooling to 25-32: support images of 393-512 px.
SUPPORT_SIZES = (393, 512)


class ASNetOptions(Section):
    """`model.asnet`."""

    # How the support features are masked before the correlation: `none` is ASNet's own (the mask enters as the
    # attention mask only); `feature` / `input` / `hybrid` as HSNet's option (`hybrid` = the HM paper's ASNet).
    support_masking: Literal["none", "feature", "input", "hybrid"] = "none"
    # False: the learner never sees the support mask (no key masked): the official `--weak` model, which
    # `train.supervision: presence` trains on presence labels alone (with `support_masking: none`).
    mask_attention: bool = True
    # Support images (and masks, nearest) are resized to this square before the backbone when they differ: the
    # official learner runs only on 393-512 px supports (`SUPPORT_SIZES`); the query keeps its size.
    support_size: Annotated[int, Field(ge=SUPPORT_SIZES[0], le=SUPPORT_SIZES[1])] = 400


class AttentiveSqueeze(nn.Module):
    """One attentive squeeze layer (official `AttentiveSqueezeLayer`) over a (B, C, Hq, Wq, Hs, Ws) correlation:
    global multi-head attention over the support dims, each query position its own batch row; conv embeddings
    (kernels over the support dims only, strided for the queries, and for keys and values with `pool_kv`);
    attention output -> GroupNorm, ReLU, 1x1 conv, GroupNorm, ReLU, + shortcut, GroupNorm; then a 1x1 FFN
    (halving the channels) with its residual and GroupNorm. Stored as Conv3d with (1, k, k) kernels over
    (query positions, support h, w), as the official layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int,
                 pool_kv: bool) -> None:
        super().__init__()
        padding = kernel_size // 2 if kernel_size > 2 else 0  # kernels 1 and 2 (the mixing blocks) pad nothing
        hidden = out_channels // 2
        if hidden % HEADS:
            raise ValueError(f"AttentiveSqueeze: {out_channels} output channels give {hidden} attention channels, "
                             f"not a multiple of {HEADS} heads")

        def conv(cin: int, cout: int, bias: bool = True) -> nn.Conv3d:
            return nn.Conv3d(cin, cout, (1, kernel_size, kernel_size), stride=(1, support_stride, support_stride),
                             padding=(0, padding, padding), bias=bias)

        # The official shortcut is the identity only where the embedding conv keeps the channels and the size.
        keeps_shape = in_channels == out_channels and (2 * padding - kernel_size) // support_stride == -1
        self.shortcut = nn.Identity() if keeps_shape else nn.Sequential(
            conv(in_channels, out_channels, bias=False), nn.GroupNorm(GROUPS, out_channels), nn.ReLU(inplace=True))
        self.query_embed = conv(in_channels, hidden)
        self.key_embed = conv(in_channels, hidden) if pool_kv else nn.Conv3d(in_channels, hidden, 1)
        self.value_embed = conv(in_channels, hidden) if pool_kv else nn.Conv3d(in_channels, hidden, 1)
        self.aggregate = nn.Sequential(
            nn.GroupNorm(GROUPS, hidden), nn.ReLU(inplace=True), nn.Conv3d(hidden, out_channels, 1, bias=False),
            nn.GroupNorm(GROUPS, out_channels), nn.ReLU(inplace=True))
        self.attn_norm = nn.GroupNorm(GROUPS, out_channels)
        self.ffn = nn.Sequential(
            nn.Conv3d(out_channels, hidden, 1, bias=False), nn.GroupNorm(GROUPS, hidden), nn.ReLU(inplace=True),
            nn.Conv3d(hidden, out_channels, 1, bias=False))
        self.ffn_norm = nn.GroupNorm(GROUPS, out_channels)

    def forward(self, corr: torch.Tensor, support_fg: torch.Tensor | None) -> torch.Tensor:
        """(B, C, Hq, Wq, Hs, Ws), (B, H, W) float 0/1 support foreground or None -> (B, C', Hq, Wq, hs, ws).
        A key is masked out where the foreground, resized bilinearly (align_corners) to the key map, is 0."""
        B, _, Hq, Wq = corr.shape[:4]
        x = corr.flatten(2, 3)  # (B, C, T, Hs, Ws), T = Hq * Wq query positions
        shortcut = self.shortcut(x)
        out = attend(self.query_embed(x), self.key_embed(x), self.value_embed(x), support_fg)  # (B, D, T, hs, ws)
        out = self.attn_norm(self.aggregate(out) + shortcut)
        out = self.ffn_norm(self.ffn(out) + out)
        return out.view(B, -1, Hq, Wq, *out.shape[-2:])


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           support_fg: torch.Tensor | None) -> torch.Tensor:
    """HEADS-head attention of each query position's support map over its own support map (official
    `Attention.forward` after the embeddings). query (B, D, T, hs, ws); key, value (B, D, T, hk, wk); support_fg
    (B, H, W) float 0/1 or None -> (B, D, T, hs, ws). Channels split head-major; the dot products are not
    scaled (no 1 / sqrt(d), as official). A key is masked out (its logit set to MASKED_LOGIT) where the
    foreground, resized bilinearly with align_corners to (hk, wk), is exactly 0."""
    B, _, T, hs, ws = query.shape

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, D, T, h, w) -> (B, heads, D / heads, T, h * w)
        return t.reshape(B, HEADS, -1, T, t.shape[-2] * t.shape[-1])

    attn = torch.einsum("bgctl,bgctm->bgtlm", heads(query), heads(key))  # (B, heads, T, hs * ws, hk * wk)
    if support_fg is not None:
        keep = F.interpolate(support_fg[:, None], size=key.shape[-2:], mode="bilinear", align_corners=True)
        attn = attn.masked_fill(keep.view(B, 1, 1, 1, -1) == 0, MASKED_LOGIT)
    out = torch.einsum("bgtlm,bgctm->bgctl", attn.softmax(-1), heads(value))
    return out.reshape(B, -1, T, hs, ws)


def attentive_block(in_channels: int, widths: tuple[int, ...], kernels: tuple[int, ...],
                    support_strides: tuple[int, ...], pool_kv: bool = False) -> nn.ModuleList:
    """Attentive squeeze layers in sequence (official `make_building_attentive_block`)."""
    layers = []
    for width, kernel, stride in zip(widths, kernels, support_strides, strict=True):
        layers.append(AttentiveSqueeze(in_channels, width, kernel, stride, pool_kv))
        in_channels = width
    return nn.ModuleList(layers)


def run_block(block: nn.ModuleList, corr: torch.Tensor, support_fg: torch.Tensor | None) -> torch.Tensor:
    for layer in block:
        corr = layer(corr, support_fg)
    return corr


def pool_wide(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Support features: those at least POOL_WIDTH wide average-pooled 3x3, stride 2, padding 1 (official
    `extract_feat_res(..., pool=True)`: at 400 px layer2's 50x50 map becomes 25x25)."""
    return [F.avg_pool2d(f, 3, stride=2, padding=1) if f.shape[-1] >= POOL_WIDTH else f for f in feats]


def merge_ways(log_probs: torch.Tensor) -> torch.Tensor:
    """(B, N, 2, H, W) per-way background / foreground log-probabilities -> (B, 1 + N, H, W): the episode's
    background = the mean over the ways of their background log-probs, then each way's foreground (official
    `merge_bg_masks`); its argmax is the pixel's class, 0 = background. At one way: the way's own two maps."""
    return torch.cat([log_probs[:, :, 0].mean(1, keepdim=True), log_probs[:, :, 1]], 1)


def class_presence(shot_log_probs: torch.Tensor) -> torch.Tensor:
    """(B, S, N, 2, h, w) log-probs of S shots, N ways -> (B, N) bool. Per shot, class n is present when its
    foreground probability reaches 0.5 at some pixel (`metrics.presence_from_probs`, the official
    `collect_class_presence` on the learner's maps, before any upsampling); over shots, when at least half of
    the shots say so (official `predict_mask_nshot`: the mean of the 0/1 decisions >= 0.5)."""
    per_shot = torch.stack([presence_from_probs(shot_log_probs[:, s, :, 1].exp())
                            for s in range(shot_log_probs.shape[1])], 1)  # (B, S, N)
    return per_shot.float().mean(1) >= 0.5


class ASNet(FrozenBackboneModel):
    """Frozen torchvision-layout ResNet -> hypercorrelation (supports pooled, unmasked by default) -> attentive
    squeeze (per stage; the support mask masks the attention keys) -> mix l4 -> l3 -> l2 -> HSNet decoder ->
    log-softmax, per way: a 1-way `Episode`, or an N-way `FSCSEpisode` (iFSL's FS-CS task) whose ways run
    batched; `merge_ways` / `class_presence` give the logits and the presence."""

    def __init__(self, *, backbone: ResNet, support_masking: str = "none", mask_attention: bool = True,
                 support_size: int = 400) -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.support_masking = support_masking
        self.mask_attention = mask_attention
        self.support_size = support_size
        counts = {stage: backbone.bottleneck_ids.count(stage) for stage in (2, 3, 4)}  # R50: 4, 6, 3
        # Widths, kernels and support strides (official `AttentionLearner`); layer3 / layer2 also pool keys and
        # values, layer4 (13x13 at 400) attends over every support position.
        self.squeeze4 = attentive_block(counts[4], (32, 128), (5, 3), (4, 2))
        self.squeeze3 = attentive_block(counts[3], (32, 128), (5, 5), (4, 4), pool_kv=True)
        self.squeeze2 = attentive_block(counts[2], (32, 128), (5, 5), (4, 4), pool_kv=True)
        self.mix43 = attentive_block(128, (128, 128), (1, 2), (1, 1))
        self.mix32 = attentive_block(128, (128, 128), (1, 2), (1, 1))
        self.decoder1, self.decoder2 = decoder()

    def learner(self, corrs: list[torch.Tensor], support_fg: torch.Tensor | None) -> torch.Tensor:
        """[layer4, layer3, layer2] correlations, (B, H, W) support foreground or None -> (B, 2, 2 h2, 2 w2)
        logits at twice the query's layer2 size (official `AttentionLearner.forward`, one way)."""
        sqz4 = run_block(self.squeeze4, corrs[0], support_fg).mean((-2, -1), keepdim=True)  # support dims 1x1
        sqz3 = run_block(self.squeeze3, corrs[1], support_fg)  # (B, 128, Hq3, Wq3, 2, 2) at 393-512 px
        sqz2 = run_block(self.squeeze2, corrs[2], support_fg)
        mix = run_block(self.mix43, resize_query_dims(sqz4, sqz3.shape[2:4]) + sqz3, support_fg)
        mix = run_block(self.mix32, resize_query_dims(mix, sqz2.shape[2:4]) + sqz2, support_fg)
        return decode(self.decoder1, self.decoder2, mix.flatten(4).mean(-1))  # support dims already 1x1

    def resized_support(self, img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) image, (B, H, W) 0/1/255 mask at `support_size` (bilinear / nearest); unchanged when
        already there. A departure where it resizes: the official loader makes every image 400x400."""
        size = (self.support_size, self.support_size)
        if tuple(img.shape[-2:]) == size:
            return img, mask
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        mask = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].to(mask.dtype)
        return img, mask

    def way_log_probs(self, episode: Episode | FSCSEpisode) -> torch.Tensor:
        """(B, S, N, 2, h, w): each shot's per-way log-probabilities at the learner's size (the official
        forward's output; N = 1 on an `Episode`). The query is encoded once for all shots and ways (the official
        k-shot loop re-encodes it per shot: same numbers); each shot's ways run batched, the query's features
        repeated per way, as the official correlation; the shots run one at a time, so the peak memory is that of
        a 1-shot episode. Each way's supports are encoded on their own (a batch of B), as the feature cache needs."""
        cache = active_cache(self, episode)  # evaluation at batch 1 only (models/feature_cache.py)
        support_imgs, support_masks = way_supports(episode)  # (B, N, S, 3, H, W), (B, N, S, H, W)
        B, N, S = support_imgs.shape[:3]

        def extract(img: torch.Tensor) -> list[torch.Tensor]:
            return pool_wide(bottleneck_features(self.backbone, img, cache))

        with torch.no_grad():
            query = unit_features(bottleneck_features(self.backbone, episode.query_img, cache))
            if N > 1:  # (B * N, ...) way-minor, as the official `repeat_interleave(way)` against `(b n)` supports
                query = [f.repeat_interleave(N, 0) for f in query]
        log_probs = []
        for s in range(S):
            feats, masks = [], []
            for n in range(N):
                img, mask = self.resized_support(support_imgs[:, n, s], support_masks[:, n, s])
                with torch.no_grad():  # the backbone is frozen and the correlation has no parameter
                    if self.support_masking == "none":
                        feats.append(unit_features(extract(img)))
                    else:
                        feats.append(unit_features(masked_bottleneck_features(self.backbone, img, mask,
                                                                              self.support_masking, extract)))
                masks.append(mask)
            with torch.no_grad():
                support = [torch.stack(way, 1).flatten(0, 1) for way in zip(*feats, strict=True)]  # (B * N, ...)
                corrs = multilayer_correlation(query, support, self.backbone.bottleneck_ids)
                del feats, support
            mask = torch.stack(masks, 1).flatten(0, 1)  # (B * N, H, W)
            # 255 (ignore) is background, as the official support loader's `mask == class`
            support_fg = (mask == 1).to(support_imgs.dtype) if self.mask_attention else None
            learned = self.learner(corrs, support_fg).log_softmax(1)  # (B * N, 2, h, w)
            log_probs.append(learned.view(B, N, *learned.shape[1:]))
            del corrs
        return torch.stack(log_probs, 1)

    def shot_log_probs(self, episode: Episode) -> torch.Tensor:
        """(B, S, 2, h, w): each shot's 1-shot log-probabilities of a 1-way `Episode` (`way_log_probs`)."""
        return self.way_log_probs(episode)[:, :, 0]

    def forward(self, episode: Episode | FSCSEpisode) -> SegOutput:
        """The merged log-probs (`merge_ways`: (B, 1 + N, H, W), N = 1 on an `Episode`) at the query's size,
        averaged over the shots (official `predict_mask_nshot`: the mean of the shots' upsampled maps, argmax),
        and the class presence (`class_presence`, (B, N)), in train and eval."""
        log_probs = self.way_log_probs(episode)  # (B, S, N, 2, h, w)
        B, S = log_probs.shape[:2]
        logits = resize_logits(merge_ways(log_probs.flatten(0, 1)), episode.query_img.shape[-2:])  # (B * S, 1 + N, ...)
        return SegOutput(logits.view(B, S, *logits.shape[1:]).mean(1), [], {}, class_presence(log_probs))


def way_supports(episode: Episode | FSCSEpisode) -> tuple[torch.Tensor, torch.Tensor]:
    """An episode's supports by way: (B, N, S, 3, H, W) images, (B, N, S, H, W) masks; an `Episode` is 1 way."""
    if isinstance(episode, FSCSEpisode):
        return episode.support_imgs, episode.support_masks
    return episode.support_imgs[:, None], episode.support_masks[:, None]


def asnet_loss(model: nn.Module, episode: Episode | FSCSEpisode) -> dict[str, torch.Tensor]:
    """NLL of each shot's merged log-probs, upsampled to the query (official `compute_seg_objective`; ASNet
    trains 1-shot only, where this is its loss; at k shots, k 1-shot episodes sharing the query). The target
    is the query mask, 0..N on an `FSCSEpisode` (all background when no way's class is in the query). 255 is
    ignored, the project's contract; the official loader relabels VOC boundary pixels background."""
    log_probs = model.way_log_probs(episode)  # (B, S, N, 2, h, w)
    S = log_probs.shape[1]
    merged = merge_ways(log_probs.flatten(0, 1))  # (B * S, 1 + N, h, w)
    target = episode.query_mask.repeat_interleave(S, 0)
    log_probs = resize_logits(resize_logits(merged, episode.query_img.shape[-2:]), target.shape[-2:])
    return {"nll": F.nll_loss(log_probs.float(), target.long(), ignore_index=IGNORE_INDEX)}


def presence_loss(model: nn.Module, episode: FSCSEpisode) -> dict[str, torch.Tensor]:
    """The weak-label objective (official `compute_cls_objective`, `--weak`): each way's log-probs averaged
    over the learner's map, (B, N, 2), read as the log-likelihood of "absent" / "present" and scored by NLL
    against the query's presence. Official at 1 way and 1 shot; here every (shot, way) is one such term,
    averaged. The learner never sees a support mask here (`WeakLabels.options`, checked at load)."""
    log_probs = model.way_log_probs(episode)  # (B, S, N, 2, h, w)
    S = log_probs.shape[1]
    scores = log_probs.float().mean((-2, -1)).flatten(0, 2)  # (B * S * N, 2): not normalised, as official
    target = episode.presence.long().repeat_interleave(S, 0).flatten()  # (B * S * N,)
    return {"presence_nll": F.nll_loss(scores, target)}


def build(cfg: ModelConfig, options: ASNetOptions, *, shot: int, base_classes: list[int]) -> ASNet:
    return ASNet(backbone=frozen_backbone(cfg),
                 support_masking=options.support_masking, mask_attention=options.mask_attention,
                 support_size=options.support_size)


METHOD = Method(
    key="asnet", build=build, options=ASNetOptions, stage1=Stage1("backbone"), recipe=ADAM_RECIPE, transform="resize",
    summary="attentive squeeze: masked multi-head attention over the support dims of the hypercorrelation (CVPR 2022)",
    trains_each_shot=False, loss=asnet_loss, fscs=True,
    # Weak labels: no support mask may reach the learner, neither as the attention mask nor through the features.
    weak=WeakLabels(loss=presence_loss, options={"mask_attention": False, "support_masking": "none"}),
    # The tiny layout runs the learner on 400-px supports, where every attention has several keys; without the
    # attention mask, because the mixing blocks' keys (2x2) take the mask at its four corner pixels, background
    # in the test episodes: all masked, a uniform softmax, and no gradient to their query / key embeddings.
    # Hybrid masking lets the support mask in through the features instead.
    tiny={"backbone": "small", "asnet": {"support_masking": "hybrid", "mask_attention": False}},
    reference=Reference(count=1_320_610, model={"backbone": "resnet50"}, published="1.32M"),
)
