"""HSNet (Min et al., ICCV 2021): the cosine correlation of every bottleneck feature pair, squeezed by
center-pivot 4D convolutions, mixed l4 -> l3 -> l2 and decoded to 2 channels; at k shots the shots vote.

Faithful to the official release (juhongm999/hsnet: `model/hsnet.py`, `learner.py`, `base/conv4d.py`,
`base/correlation.py`; tests/fixtures/oracle/hsnet.pt pins its forward), except where a comment says otherwise:
the query is encoded once per episode, not once per shot; square maps are assumed where it assumes them.
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
from fssmeta.models.feature_cache import FeatureCache, active_cache, digest
from fssmeta.models.method import Method, Reference, Stage1

# Adam at a constant 1e-3, no weight decay (the official train.py); `momentum` is Adam's beta1 here.
ADAM_RECIPE = OptimConfig(optimizer="adam", lr=1.0e-3, momentum=0.9, weight_decay=0.0, power=0.0, warmup_steps=0)
NORM_EPS = 1e-5  # added to the L2 norm before the cosine (official `Correlation`), not a clamp as F.normalize's
WIDTHS = (16, 64, 128)  # the squeezing blocks' output channels (official `outch1..3`)
GROUPS = 4  # GroupNorm groups after every 4D convolution
SMALL_MAP = 4  # support maps of at most this many positions (the mixing blocks' 2 x 2) convolve as one product
SPARSE_BELOW = 0.75  # the correlation multiplies only the live support positions below this share of them


class HSNetOptions(Section):
    """`model.hsnet`."""

    # How the support features are masked (docs/methods.md, "Hybrid masking"): `feature` is HSNet's own.
    support_masking: Literal["feature", "input", "hybrid"] = "feature"


class CenterPivotConv4d(nn.Module):
    """A 4D convolution over (query h, w, support h, w) whose kernel is non-zero only on its two center-pivot
    planes: a 2D kernel over the query dims at the support center plus one over the support dims at the query
    center (the center tap counted by both). The support dims are strided, the query dims never."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int) -> None:
        super().__init__()
        self.support_stride = support_stride
        self.query_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.support_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=support_stride,
                                      padding=kernel_size // 2)

    def forward(self, corr: torch.Tensor) -> torch.Tensor:
        """(B, C, Hq, Wq, Hs, Ws) -> (B, C', Hq, Wq, hs, ws), hs = ceil(Hs / stride)."""
        B, C, Hq, Wq, Hs, Ws = corr.shape
        # The query-dims kernel is needed only where the strided support-dims kernel is centred: support
        # positions 0, s, 2s, ... (odd kernels, padding k // 2).
        stride = self.support_stride
        pivots = corr[..., ::stride, ::stride] if stride > 1 else corr  # (B, C, Hq, Wq, hs, ws)
        hs, ws = pivots.shape[-2:]
        by_query = self.query_conv(pivots.permute(0, 4, 5, 1, 2, 3).reshape(B * hs * ws, C, Hq, Wq))
        by_query = by_query.view(B, hs, ws, -1, Hq, Wq).permute(0, 3, 4, 5, 1, 2)
        support = corr.permute(0, 2, 3, 1, 4, 5).reshape(B * Hq * Wq, C, Hs, Ws)
        by_support = (small_map_conv(support, self.support_conv) if stride == 1 and Hs * Ws <= SMALL_MAP
                      else self.support_conv(support))
        by_support = by_support.view(B, Hq, Wq, -1, hs, ws).permute(0, 3, 1, 2, 4, 5)
        return (by_query + by_support).contiguous()


def small_map_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv` (stride 1, padding k // 2, odd k) on maps of a few positions as one matrix product: on an h x w
    map the convolution is a linear map of the C * h * w inputs to the O * h * w outputs, whose matrix holds
    the kernel taps that land inside the map (on 2 x 2, 4 of the 9 taps per output; the convolution multiplies
    all 9, the other 5 by padding). The same function, in another summation order."""
    N, C, h, w = x.shape
    k = conv.kernel_size[0]
    index, inside = _tap_index(h, w, k, x.device)
    taps = conv.weight.flatten(2)[:, :, index] * inside  # (O, C, hw out, hw in)
    matrix = taps.permute(0, 2, 1, 3).reshape(conv.out_channels * h * w, C * h * w)
    out = torch.addmm(conv.bias.repeat_interleave(h * w), x.reshape(N, C * h * w), matrix.t())
    return out.view(N, conv.out_channels, h, w)


def _tap_index(h: int, w: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(hw, hw) flat kernel tap joining output position i to input position j on an h x w map (padding k // 2),
    and whether that tap is inside the kernel."""
    y, x = torch.div(torch.arange(h * w, device=device), w, rounding_mode="floor"), torch.arange(h * w, device=device) % w
    dy, dx = y[None, :] - y[:, None] + k // 2, x[None, :] - x[:, None] + k // 2  # (out, in)
    inside = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    return (dy.clamp(0, k - 1) * k + dx.clamp(0, k - 1)), inside


def squeeze_block(in_channels: int, widths: tuple[int, ...], kernels: tuple[int, ...],
                  support_strides: tuple[int, ...]) -> nn.Sequential:
    """Center-pivot 4D conv -> GroupNorm -> ReLU, once per width."""
    layers: list[nn.Module] = []
    for width, kernel, stride in zip(widths, kernels, support_strides, strict=True):
        layers += [CenterPivotConv4d(in_channels, width, kernel, stride), nn.GroupNorm(GROUPS, width),
                   nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


def resize_query_dims(corr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, Hq, Wq, Hs, Ws) -> (B, C, size, Hs, Ws): bilinear (align_corners) over the query dims (the
    official `interpolate_support_dims`, which despite its name resizes these)."""
    B, C, Hq, Wq, Hs, Ws = corr.shape
    flat = corr.permute(0, 4, 5, 1, 2, 3).reshape(B * Hs * Ws, C, Hq, Wq)
    flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=True)
    return flat.view(B, Hs, Ws, C, *size).permute(0, 3, 4, 5, 1, 2).contiguous()


def unit_features(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """(B, C, h, w) each -> the same divided by its channel L2 norm + NORM_EPS."""
    return [f / (f.norm(dim=1, keepdim=True) + NORM_EPS) for f in feats]


def multilayer_correlation(query: list[torch.Tensor], support: list[torch.Tensor],
                           stages: list[int]) -> list[torch.Tensor]:
    """Per layer the cosine of every (query, support) position pair, clamped at 0, stacked per stage.

    query, support: unit features, (B, C_l, Hq_l, Wq_l) and (B, C_l, Hs_l, Ws_l); `stages[l]` the stage of
    layer l (`ResNet.bottleneck_ids`). -> [layer4, layer3, layer2], each (B, n_stage, Hq, Wq, Hs, Ws).
    """
    return [stage_correlation([q for q, k in zip(query, stages, strict=True) if k == stage],
                              [s for s, k in zip(support, stages, strict=True) if k == stage]) for stage in (4, 3, 2)]


def stage_correlation(query: list[torch.Tensor], support: list[torch.Tensor]) -> torch.Tensor:
    """One stage's layers (the same shapes) -> (B, L, Hq, Wq, Hs, Ws), each layer's product written in place.

    On CPU: stored as (B, Hq, Wq, L, Hs, Ws) and returned as that permuted view, the layout the center-pivot
    convolution's support-dims kernel reads (one copy of the largest tensor saved). A support position whose
    feature is zero in every layer (masked out: feature masking multiplies by the resized mask, 0 away from the
    object) has cosine exactly 0 with every query position; where such positions are over a quarter of the map
    only the others are multiplied (at a support object covering a fifth of the image, a fifth of the work).
    Elsewhere (CUDA, meta) the layers run as one batched product each, without a host sync."""
    B, _, Hq, Wq = query[0].shape
    Hs, Ws = support[0].shape[-2:]
    L, Nq, Ns = len(query), Hq * Wq, Hs * Ws
    if query[0].device.type != "cpu":
        corr = torch.stack([torch.bmm(q.flatten(2).transpose(1, 2), s.flatten(2)) for q, s in zip(query, support,
                                                                                                    strict=True)], 1)
        return corr.clamp_(min=0).view(B, L, Hq, Wq, Hs, Ws)
    live = torch.stack([s.flatten(2).ne(0).any(1) for s in support], 0).any(0)  # (B, Ns)
    counts = live.sum(1).tolist()
    corr = query[0].new_empty(B, Nq, L, Ns)
    for b in range(B):
        cols = None if counts[b] > SPARSE_BELOW * Ns else live[b].nonzero().squeeze(1)
        if cols is not None:
            corr[b].zero_()
        for layer, (q, s) in enumerate(zip(query, support, strict=True)):
            q_b, s_b, out = q[b].flatten(1).t(), s[b].flatten(1), corr[b, :, layer]  # (Nq, C), (C, Ns), (Nq, Ns)
            if cols is None:
                torch.mm(q_b, s_b, out=out).clamp_(min=0)  # a masked position's column is 0 here too
            elif counts[b]:
                out[:, cols] = torch.mm(q_b, s_b[:, cols]).clamp_(min=0)
    return corr.view(B, Hq, Wq, L, Hs, Ws).permute(0, 3, 1, 2, 4, 5)


def vote(shot_logits: torch.Tensor) -> torch.Tensor:
    """(B, S, 2, H, W) per-shot logits -> (B, 2, H, W) whose argmax is the official k-shot vote: foreground
    where (shots predicting it) / max(that count's maximum over the image, 1) >= 0.5.

    The foreground channel is that vote fraction, the background one a constant just under 0.5: fractions v / m
    below 0.5 are at most 0.5 - 1 / (2m) <= 0.5 - 1 / (2S), so 0.5 - 1 / (4S) separates them and a tie at 0.5
    goes to the foreground, as the official `>= 0.5`."""
    S = shot_logits.shape[1]
    votes = shot_logits.argmax(2).sum(1).float()  # (B, H, W)
    max_vote = votes.flatten(1).amax(1).clamp(min=1).view(-1, 1, 1)  # (B, 1, 1)
    fg = votes / max_vote
    return torch.stack([torch.full_like(fg, 0.5 - 0.25 / S), fg], 1)


def decoder() -> tuple[nn.Sequential, nn.Sequential]:
    """HSNet's 2D decoder (ASNet's too): two 3x3 convs 128 -> 128 -> 64 before the x2 upsampling (`decode`),
    then 64 -> 64 -> 2 after it."""
    _, w2, w3 = WIDTHS
    return (nn.Sequential(nn.Conv2d(w3, w3, 3, padding=1), nn.ReLU(), nn.Conv2d(w3, w2, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(), nn.Conv2d(w2, 2, 3, padding=1)))


def decode(decoder1: nn.Module, decoder2: nn.Module, encoded: torch.Tensor) -> torch.Tensor:
    """(B, 128, h, w) squeezed correlation -> (B, 2, 2h, 2w) logits: `decoder1`, x2 bilinear (align_corners),
    `decoder2` (the official decoders upsample to (2w, 2w), the same on their square maps)."""
    decoded = decoder1(encoded)
    decoded = F.interpolate(decoded, size=(2 * decoded.shape[-2], 2 * decoded.shape[-1]), mode="bilinear",
                            align_corners=True)
    return decoder2(decoded)


def bottleneck_features(backbone: ResNet, img: torch.Tensor, cache: FeatureCache | None) -> list[torch.Tensor]:
    """`backbone.bottleneck_features(img)`, through the evaluation cache when one is active (keyed by the
    image's bytes: a support image masked at the input is its own entry)."""
    if cache is None:
        return backbone.bottleneck_features(img)
    return list(cache.get_or_compute(("bottleneck", digest(img)), lambda: tuple(backbone.bottleneck_features(img))))


class HSNet(FrozenBackboneModel):
    """Frozen torchvision-layout ResNet -> hypercorrelation -> squeeze (per stage) -> mix l4 -> l3 -> l2 ->
    mean over the support dims -> 2D decoder. `support_masking`: feature (HSNet), input or hybrid."""

    def __init__(self, *, backbone: ResNet, support_masking: str = "feature") -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.support_masking = support_masking
        counts = {stage: backbone.bottleneck_ids.count(stage) for stage in (2, 3, 4)}  # R50: 4, 6, 3
        w3 = WIDTHS[2]
        # Kernels and support strides per stage (official): coarser layers need less support squeezing.
        self.squeeze4 = squeeze_block(counts[4], WIDTHS, (3, 3, 3), (2, 2, 2))
        self.squeeze3 = squeeze_block(counts[3], WIDTHS, (5, 3, 3), (4, 2, 2))
        self.squeeze2 = squeeze_block(counts[2], WIDTHS, (5, 5, 3), (4, 4, 2))
        self.mix43 = squeeze_block(w3, (w3, w3, w3), (3, 3, 3), (1, 1, 1))
        self.mix32 = squeeze_block(w3, (w3, w3, w3), (3, 3, 3), (1, 1, 1))
        self.decoder1, self.decoder2 = decoder()

    def learner(self, corrs: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """[layer4, layer3, layer2] correlations -> (B, 2, size) logits (official `HPNLearner` + upsampling)."""
        sqz4, sqz3, sqz2 = self.squeeze4(corrs[0]), self.squeeze3(corrs[1]), self.squeeze2(corrs[2])
        mix = self.mix43(resize_query_dims(sqz4, sqz3.shape[2:4]) + sqz3)
        mix = self.mix32(resize_query_dims(mix, sqz2.shape[2:4]) + sqz2)  # (B, 128, Hq2, Wq2, hs, ws)
        logits = decode(self.decoder1, self.decoder2, mix.flatten(4).mean(-1))  # support dims averaged
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def shot_logits(self, episode: Episode) -> torch.Tensor:
        """(B, S, 2, H, W): each shot's own 1-shot prediction. The query is encoded once for all S shots (the
        official k-shot loop re-encodes it per shot: same numbers, S - 1 backbone passes and normalisations
        saved); the shots then run one at a time, so the peak memory is that of a 1-shot episode."""
        S = episode.support_imgs.shape[1]
        size = (episode.query_img.shape[-2], episode.query_img.shape[-1])
        cache = active_cache(self, episode)  # evaluation at batch 1 only (models/feature_cache.py)

        def extract(img: torch.Tensor) -> list[torch.Tensor]:
            return bottleneck_features(self.backbone, img, cache)

        with torch.no_grad():
            query = unit_features(extract(episode.query_img))
        logits = []
        for s in range(S):
            with torch.no_grad():  # the backbone is frozen and the correlation has no parameter
                support = masked_bottleneck_features(self.backbone, episode.support_imgs[:, s],
                                                     episode.support_masks[:, s], self.support_masking, extract)
                corrs = multilayer_correlation(query, unit_features(support), self.backbone.bottleneck_ids)
                del support
            logits.append(self.learner(corrs, size))
            del corrs
        return torch.stack(logits, 1)

    def forward(self, episode: Episode) -> SegOutput:
        """1 shot: the logits; k shots: the vote over the shots' argmax masks (`vote`), in train and eval."""
        shot_logits = self.shot_logits(episode)
        logits = shot_logits[:, 0] if shot_logits.shape[1] == 1 else vote(shot_logits)
        return SegOutput(logits, [], {})


def hsnet_loss(model: nn.Module, episode: Episode) -> dict[str, torch.Tensor]:
    """Pixel CE of each shot's logits (the vote has no gradient): a k-shot episode trains as k 1-shot episodes
    sharing the query (HSNet trains 1-shot only, where this is its loss). 255 is ignored, the project's
    contract; the official loader relabels VOC boundary pixels background and its CE counts them."""
    shot_logits = model.shot_logits(episode)  # (B, S, 2, H, W)
    S = shot_logits.shape[1]
    return {"ce": cross_entropy(shot_logits.flatten(0, 1), episode.query_mask.repeat_interleave(S, 0))}


def frozen_backbone(cfg: ModelConfig) -> ResNet:
    """The HSNet family's frozen backbone, at output stride 32 as official: the torchvision layout with
    `model.weights` (official: ImageNet), or with `model.backbone_source: stage1` the fold's stage-1 PSPNet
    encoder (loaded by the stages through the record's `Stage1("backbone")`, as the PFENet family borrows it
    where no ImageNet file exists) in its deep-stem layout at torchvision's strides instead of its dilations.
    Only the first block of layer3 and layer4 then sees other inputs than in training: every later 3x3 conv at
    dilation d on the stride-8 grid reads the same image positions as at dilation 1 on the coarser grid."""
    if cfg.backbone_source == "stage1":
        return build_backbone(cfg.backbone, "deep_stem", dilated=False)
    return build_backbone(cfg.backbone, "torchvision", cfg.weights)


def build(cfg: ModelConfig, options: HSNetOptions, *, shot: int, base_classes: list[int]) -> HSNet:
    return HSNet(backbone=frozen_backbone(cfg), support_masking=options.support_masking)


METHOD = Method(
    key="hsnet", build=build, summary="hypercorrelation squeeze: center-pivot 4D convs over multilayer correlations, k-shot voting (ICCV 2021)",
    options=HSNetOptions, stage1=Stage1("backbone"), recipe=ADAM_RECIPE, transform="resize", trains_each_shot=False,
    loss=hsnet_loss,
    # Hybrid masking at the tiny layout: a 30-px support square at 65 px leaves feature masking one non-zero
    # position of the 3x3 layer4 map, its center, which the stride-2 pivots of `squeeze4` never sample.
    tiny={"backbone": "small", "hsnet": {"support_masking": "hybrid"}},
    reference=Reference(count=2_573_794, model={"backbone": "resnet50"}, published="2.57M"),
)
