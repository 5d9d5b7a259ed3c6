"""SCCAN (Xu et al., ICCV 2023, "Self-Calibrated Cross Attention Network for Few-Shot Segmentation"): a frozen
deep-stem backbone, a soft-mask-transfer prior, eight Swin-style blocks whose query attention also looks at the
best-matching support window (patch alignment + self-calibrated cross attention), BAM's ASPP head, Dice loss.

Follows Sam1224/SCCAN `model/SCCAN.py`, `model/swin_sccan.py`, `model/ASPP.py`, `model/loss.py` and
`train_sccan.py`, written in plain PyTorch (the release builds on timm). Departures (docs/methods.md, SCCAN): the
last block's support update, whose output the release computes and discards, is not built (394,752 parameters
that never receive a gradient; under DDP without `find_unused_parameters` they would fail the step); the memory
restyles at scope `mid` only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from fssmeta.config import SGD_RECIPE, ModelConfig, OptimConfig, Positive, Section
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import resize_logits
from fssmeta.models import ops
from fssmeta.models.backbone import ResNet, build_backbone, freeze_
from fssmeta.models.family import FrozenBackboneModel, memory_losses, mid_channels, query_features
from fssmeta.models.feature_cache import FeatureCache, active_cache, digest
from fssmeta.models.memory import MemoryTransfer, build_memory
from fssmeta.models.method import Method, OptimizerSpec, Reference, Stage1, trainable

# The attention blocks' optimiser (train_sccan.py `get_optim`): AdamW at a constant 6e-5 with PyTorch's default
# weight decay 0.01; the release's poly schedule steps only the SGD optimiser of the conv heads.
ATTENTION_RECIPE = SGD_RECIPE.model_copy(update={"optimizer": "adamw", "lr": 6.0e-5, "weight_decay": 0.01,
                                                 "power": 0.0, "warmup_steps": 0})


class SCCANOptions(Section):
    """`model.sccan`: widths, the transformer layout and the attention optimiser (docs/methods.md, SCCAN)."""

    reduce_dim: Positive = 256  # the reduced features and the transformer's embedding
    feature_size: Positive = 64  # every feature map is resized to this square (60 -> 64 at 473)
    depth: Positive = 8  # Swin-style blocks; odd ones shifted by half a window
    num_heads: Positive = 8
    window_size: int = Field(default=8, ge=2)
    mlp_ratio: float = Field(default=1.0, gt=0)
    aspp_dilations: tuple[int, ...] = (6, 12, 18)
    dropout: float = 0.1  # classifier head
    feature_dropout: float = 0.5  # down_query / down_supp
    # The frozen backbone's dilated stages: "torchvision" = SCCAN's (torchvision's replace_stride_with_dilation:
    # the first block of layer3 / layer4 at dilation 1 / 2); "pspnet" = every block dilated (2 / 4), the layout
    # of fssmeta's ResNet and of the stage-1 PSPNet encoder.
    dilation: Literal["torchvision", "pspnet"] = "torchvision"
    attention_lr: float = Field(default=6.0e-5, gt=0)  # AdamW of the transformer (constant)
    attention_weight_decay: float = Field(default=0.01, ge=0)

    @model_validator(mode="after")
    def _layout(self) -> SCCANOptions:
        if self.feature_size % self.window_size:
            raise ValueError(f"feature_size {self.feature_size} must be a multiple of window_size {self.window_size}")
        if self.reduce_dim % self.num_heads:
            raise ValueError(f"reduce_dim {self.reduce_dim} must be a multiple of num_heads {self.num_heads}")
        return self


def torchvision_dilation_(backbone: ResNet) -> ResNet:
    """Give the first block of layer3 and layer4 half its stage's dilation (1 and 2), as torchvision's
    `replace_stride_with_dilation` builds SCCAN's backbone; fssmeta's (PSPNet's) dilates every block. Only the
    convs' dilation and padding change: the weights, and the stage-1 load, are the same."""
    for stage in (backbone.layer3, backbone.layer4):
        conv = stage[0].conv2
        if conv.dilation[0] > 1:
            half = conv.dilation[0] // 2
            conv.dilation, conv.padding = (half, half), (half, half)
    return backbone


def soft_mask_prior(query_layer4: torch.Tensor, support_layer4: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SCCAN's prior by soft mask transfer: (B, C, h, w) query and (B, C, hs, ws) support layer4 (the whole
    support image, unmasked), (B, 1, hs, ws) support mask -> (B, 1, h, w).

    Per query pixel: softmax over every support pixel of their cosine similarity, used to average the support
    mask; then min-max normalised per image. Unlike PFENet's max over masked pixels, the background of the
    support takes part and pulls the prior down where the query resembles it.
    """
    B, _, h, w = query_layer4.shape
    query = query_layer4.flatten(2)  # (B, C, Nq)
    supp = support_layer4.flatten(2).transpose(1, 2)  # (B, Ns, C)
    norms = supp.norm(dim=2, keepdim=True) @ query.norm(dim=1, keepdim=True)  # (B, Ns, Nq)
    weights = (supp @ query / (norms + ops.COSINE_EPS)).transpose(1, 2).softmax(-1)  # (B, Nq, Ns)
    prior = (weights @ mask.flatten(2).transpose(1, 2)).squeeze(-1)  # (B, Nq)
    low, high = prior.min(1, keepdim=True).values, prior.max(1, keepdim=True).values
    return ((prior - low) / (high - low + ops.COSINE_EPS)).view(B, 1, h, w)


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/size * W/size, size * size, C): windows in row-major order, tokens likewise."""
    B, H, W, C = x.shape
    x = x.view(B, H // size, size, W // size, size, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, C)


def window_reverse(windows: torch.Tensor, size: int, H: int, W: int) -> torch.Tensor:
    """The inverse of `window_partition`: (B * H/size * W/size, size * size, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // size, W // size, size, size, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def align_windows(query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """Patch alignment: for every query window, the support window whose foreground prototype is most like it.

    (B, H, W, C) query and support, (B, H, W, 1) soft support mask -> the chosen support windows (B * L, size *
    size, C), in `window_partition`'s order. Score = (cosine + 1) / 2 between the query window's mean and the
    support window's masked mean sum(f m) / (sum(m) + 5e-4), zero for a window without foreground; argmax over
    support windows (window 0 when none has foreground, as the release's `torch.max`).
    """
    B, C = query.shape[0], query.shape[-1]
    q_windows = window_partition(query, size).view(B, -1, size * size, C)  # (B, L, N, C)
    s_windows = window_partition(support, size).view(B, -1, size * size, C)
    m_windows = window_partition(mask, size).view(B, -1, size * size, 1)
    q_protos = q_windows.mean(2)  # (B, L, C)
    area = m_windows.sum(2) + ops.AREA_EPS  # (B, L, 1); exactly AREA_EPS where a window has no foreground
    s_protos = (s_windows * m_windows).sum(2) / area
    norms = s_protos.norm(dim=2, keepdim=True) @ q_protos.norm(dim=2, keepdim=True).transpose(1, 2)
    cosine = s_protos @ q_protos.transpose(1, 2) / (norms + ops.COSINE_EPS)  # (B, Ls, Lq)
    score = (cosine + 1) / 2 * (area != ops.AREA_EPS).to(cosine.dtype)
    index = score.max(dim=1).indices  # (B, Lq)
    return s_windows[torch.arange(B, device=index.device)[:, None], index].flatten(0, 1)


class WindowAttention(nn.Module):
    """Multi-head window attention; with `aligned` support windows, SCCAN's self-calibrated cross attention:
    K, V = [query window ; aligned support window], query-query logits scaled dot products, query-support
    logits cosines (the release leaves them unscaled), one softmax over both."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, aligned: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n, C) windows [, (N, n, C) aligned support windows] -> (N, n, C)."""
        N, n, C = x.shape
        heads = self.num_heads
        context = x if aligned is None else torch.cat([x, aligned], 1)  # (N, m, C)
        q = self.q(x).view(N, n, heads, C // heads).transpose(1, 2)  # (N, h, n, d)
        k, v = self.kv(context).view(N, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4)  # (N, h, m, d) each
        logits = q @ k.transpose(-2, -1)  # (N, h, n, m)
        attn = logits[..., :n] * self.scale
        if aligned is not None:
            norms = q.norm(dim=-1, keepdim=True) @ k[:, :, n:].norm(dim=-1, keepdim=True).transpose(-2, -1)
            attn = torch.cat([attn, logits[..., n:] / (norms + ops.COSINE_EPS)], -1)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(N, n, C)
        return self.proj(out)


def mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SCCABlock(nn.Module):
    """One Swin-style block on (B, H, W, C) maps. The query attends within its window and to the aligned support
    window; the support (unless `update_support` is off: the last block) to its own window. A shifted block pads
    half a window of zeros before and the rest after, as the release (no cyclic roll, no attention mask: the
    padded tokens take part). LayerNorms shared by both streams, attention and MLP each its own."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, mlp_ratio: float,
                 update_support: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn_query = WindowAttention(dim, num_heads)
        self.attn_support = WindowAttention(dim, num_heads) if update_support else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_query = mlp(dim, mlp_ratio)
        self.mlp_support = mlp(dim, mlp_ratio) if update_support else None

    def forward(self, query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) query and support, (B, H, W, 1) support mask -> the updated query and support."""
        H, W = query.shape[1:3]
        size = self.window_size
        q, s, m = self.norm1(query), self.norm1(support), mask
        before = size // 2 if self.shifted else 0
        if self.shifted:
            pad = (0, 0, before, size - before, before, size - before)
            q, s, m = F.pad(q, pad), F.pad(s, pad), F.pad(m, pad)
        Hp, Wp = q.shape[1:3]

        q_windows = window_partition(q, size)
        attended = self.attn_query(q_windows, align_windows(q, s, m, size))
        query = query + window_reverse(attended, size, Hp, Wp)[:, before:before + H, before:before + W]
        query = query + self.mlp_query(self.norm2(query))
        if self.attn_support is None:
            return query, support
        attended = self.attn_support(window_partition(s, size))
        support = support + window_reverse(attended, size, Hp, Wp)[:, before:before + H, before:before + W]
        return query, support + self.mlp_support(self.norm2(support))


class SCCATransformer(nn.Module):
    """`depth` blocks (unshifted, shifted, ...) and a final LayerNorm on the query stream."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SCCABlock(dim, num_heads, window_size, shifted=i % 2 == 1, mlp_ratio=mlp_ratio,
                      update_support=i < depth - 1)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) query and support, (B, 1, H, W) support mask -> (B, C, H, W) query."""
        q, s, m = (t.permute(0, 2, 3, 1) for t in (query, support, mask))
        for block in self.blocks:
            q, s = block(q, s, m)
        return self.norm(q).permute(0, 3, 1, 2)


class SCCAN(FrozenBackboneModel):
    """Self-calibrated cross attention network over a frozen backbone (BN in eval mode, the release's
    FrozenBatchNorm2d). k shots: the masked support features, masks, prototypes and priors averaged."""

    def __init__(self, *, backbone: ResNet, reduce_dim: int = 256, feature_size: int = 64, depth: int = 8,
                 num_heads: int = 8, window_size: int = 8, mlp_ratio: float = 1.0,
                 aspp_dilations: tuple[int, ...] = (6, 12, 18), dropout: float = 0.1, feature_dropout: float = 0.5,
                 attention_lr: float = 6.0e-5, attention_weight_decay: float = 0.01, shot: int = 1,
                 memory: MemoryTransfer | None = None) -> None:
        super().__init__()
        if memory is not None and memory.scope != "mid":
            raise ValueError("model.memory.restyle: sccan restyles `mid` only (its prior reads the whole support "
                             "image's layer4, which the `backbone` scope of family.meta_inputs does not give)")
        self.backbone = freeze_(backbone)
        self.shot = shot  # shots it is trained for; forward averages over however many an episode has
        self.feature_size = feature_size
        self.memory = memory  # RMT restyling of the reduction's input (models/memory.py), or None
        # Read by `optimizers` (the record's), not saved: they come from the options.
        self.attention_recipe = ATTENTION_RECIPE.model_copy(
            update={"lr": attention_lr, "weight_decay": attention_weight_decay})
        mid_dim = mid_channels(backbone)
        self.down_query = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.down_supp = ops.reduce_block(mid_dim, reduce_dim, feature_dropout)
        self.init_merge_query = nn.Conv2d(2 * reduce_dim + 1, reduce_dim, 1, bias=False)  # no ReLU (release)
        self.init_merge_supp = nn.Conv2d(2 * reduce_dim + 1, reduce_dim, 1, bias=False)
        self.transformer = SCCATransformer(reduce_dim, depth, num_heads, window_size, mlp_ratio)
        self.aspp = ops.ASPP(reduce_dim, reduce_dim, tuple(aspp_dilations))
        self.res1_meta = ops.merge_conv(self.aspp.out_channels, reduce_dim)
        self.res2_meta = ops.residual_pair(reduce_dim)
        self.cls_meta = ops.classifier(reduce_dim, dropout)

    def _features(self, img: torch.Tensor, cache: FeatureCache | None) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) -> frozen layer2..layer4 of the whole image (supports too: SCCAN masks no layer)."""
        with torch.no_grad():
            if cache is None:
                return {k: v for k, v in self.backbone(img).items() if k in ("layer2", "layer3", "layer4")}
            return query_features(self.backbone, img, digest(img), cache)

    def _reduce(self, down: nn.Module, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw concat(layer2, layer3) (SCCAN's order) and its reduction, memory-restyled when there is one."""
        mid = torch.cat([feats["layer2"], feats["layer3"]], 1)
        return mid, down(mid if self.memory is None else self.memory.restyle(mid))

    def forward(self, episode: Episode) -> SegOutput:
        size = (self.feature_size, self.feature_size)
        cache = active_cache(self, episode)
        query = self._features(episode.query_img, cache)
        query_mid, query_reduced = self._reduce(self.down_query, query)  # (B, C2 + C3, h, w), (B, D, h, w)
        query_feat = F.interpolate(query_reduced, size=size, mode="bilinear", align_corners=True)
        fg = ops.foreground(episode.support_masks)  # (B, S, H, W)
        keep = self.memory is not None and self.memory.training  # the memory's training terms read these
        masks, feats, prototypes, priors, mids, reduced = [], [], [], [], [], []
        # Shot by shot: each shot's layer4 (the prior's input, 268 MB at ResNet-50 473, batch 8) let go before the next.
        for s in range(episode.support_imgs.shape[1]):
            support = self._features(episode.support_imgs[:, s], cache)
            mid, supp_reduced = self._reduce(self.down_supp, support)
            supp_feat = F.interpolate(supp_reduced, size=size, mode="bilinear", align_corners=True)
            mask = F.interpolate(fg[:, s, None], size=size, mode="bilinear", align_corners=True)  # (B, 1, F, F)
            layer4 = F.interpolate(support["layer4"], size=size, mode="bilinear", align_corners=True)
            with torch.no_grad():
                prior = soft_mask_prior(query["layer4"], layer4, mask)  # (B, 1, h, w)
            priors.append(F.interpolate(prior, size=size, mode="bilinear", align_corners=True))
            masks.append(mask)
            feats.append(supp_feat * mask)
            prototypes.append(ops.masked_average_pool(supp_feat, mask))  # (B, D)
            if keep:
                mids.append(mid)
                reduced.append(supp_reduced)
        supp_mask = torch.stack(masks).mean(0)  # (B, 1, F, F)
        prototype = torch.stack(prototypes).mean(0)[:, :, None, None].expand(-1, -1, *size)  # (B, D, F, F)
        query_x = self.init_merge_query(torch.cat([query_feat, prototype, torch.stack(priors).mean(0)], 1))
        supp_x = self.init_merge_supp(torch.cat([torch.stack(feats).mean(0), prototype, supp_mask], 1))

        feat = F.relu(self.transformer(query_x, supp_x, supp_mask))  # (B, D, F, F)
        feat = self.res1_meta(self.aspp(feat))
        feat = self.res2_meta(feat) + feat
        logits = resize_logits(self.cls_meta(feat), episode.query_img.shape[-2:])  # (B, 2, H, W)
        losses = self._memory_losses(episode, query_mid, query_reduced, mids, reduced)
        return SegOutput(logits, [], memory_losses(self.memory, losses))

    def _memory_losses(self, episode: Episode, query_mid: torch.Tensor, query_reduced: torch.Tensor,
                       supp_mids: list[torch.Tensor], supp_reduced: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The memory's training terms, as `family.meta_inputs` computes them at scope `mid` (shots stacked
        episode-major, its order), then this step's raw statistics written: after every read (the contract)."""
        memory = self.memory
        if memory is None or not memory.training:
            return {}
        supp_feat = torch.stack(supp_reduced, 1).flatten(0, 1)  # (B*S, D, h, w)
        losses = memory.step_losses(episode, self.down_query, query_mid, query_reduced, supp_feat,
                                    ops.foreground(episode.support_masks.flatten(0, 1)))
        memory.observe(query_mid, *supp_mids)
        return losses


def weighted_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """SCCAN's loss (model/loss.py, from CyCTR): (B, 2, h, w) logits, (B, H, W) 0/1/255 labels -> scalar.

    Logits are resized to the labels; each channel's sigmoid (not a softmax) is compared with its one-hot map
    (background = label 0, foreground = 1; 255 is in neither, though its predictions still count in the
    denominator): 1 - 2 sum(p t) / max(sum(p^2) + sum(t^2), 1e-8) per image and channel, times `weight`, summed
    over the channels and averaged over the images.
    """
    prob = torch.sigmoid(resize_logits(logits, target.shape[-2:]).float()).flatten(2)  # (B, 2, HW)
    onehot = torch.stack([target == 0, target == 1], 1).flatten(2).to(prob.dtype)
    denominator = (prob ** 2).sum(-1) + (onehot ** 2).sum(-1)
    loss = 1 - 2 * (prob * onehot).sum(-1) / denominator.clamp_min(1e-8)  # (B, 2)
    return (weight * loss).sum() / logits.shape[0]


def sccan_losses(model: nn.Module, episode: Episode) -> dict[str, torch.Tensor]:
    """The weighted Dice loss of the final logits (no auxiliary heads, no CE), plus the memory's terms."""
    output = model(episode)
    return {"dice": weighted_dice_loss(output.logits, episode.query_mask), **output.extra_losses}


def build(cfg: ModelConfig, options: SCCANOptions, *, shot: int, base_classes: list[int]) -> SCCAN:
    """SCCAN on a frozen deep-stem backbone; `base_classes` is unused (no base learner)."""
    backbone = build_backbone(cfg.backbone, "deep_stem", cfg.weights)
    if options.dilation == "torchvision":
        torchvision_dilation_(backbone)
    return SCCAN(backbone=backbone, reduce_dim=options.reduce_dim, feature_size=options.feature_size,
                 depth=options.depth, num_heads=options.num_heads, window_size=options.window_size,
                 mlp_ratio=options.mlp_ratio, aspp_dilations=options.aspp_dilations, dropout=options.dropout,
                 feature_dropout=options.feature_dropout, attention_lr=options.attention_lr,
                 attention_weight_decay=options.attention_weight_decay, shot=shot,
                 memory=build_memory(cfg.memory, mid_channels(backbone)))


def optimizers(model: SCCAN, recipe: OptimConfig) -> list[OptimizerSpec]:
    """Two optimisers, as train_sccan.py: the run's recipe (SGD, 0.05 effective) for every learnable parameter
    outside the transformer (reductions, merges, ASPP head; the memory's, if any), and AdamW at
    `model.sccan.attention_lr` (constant) for the transformer."""
    attention = trainable(model.transformer)
    taken = {id(p) for p in attention}
    heads = [p for p in trainable(model) if id(p) not in taken]
    return [OptimizerSpec("heads", [{"params": heads}], recipe),
            OptimizerSpec("attention", [{"params": attention}], model.attention_recipe)]


METHOD = Method(
    key="sccan", build=build, options=SCCANOptions, stage1=Stage1("backbone"), parts=frozenset({"memory"}),
    optimizers=optimizers, loss=sccan_losses, canvas="bam",  # its test loader is BAM's Resize
    summary="self-calibrated cross attention: Swin-style windows, patch alignment, soft-mask prior (ICCV 2023)",
    tiny={"backbone": "small", "pspnet": {"ppm_dim": 32},
          "sccan": {"reduce_dim": 32, "feature_size": 8, "depth": 2, "num_heads": 2, "window_size": 4,
                    "aspp_dilations": (1, 2, 3), "dilation": "pspnet"}},  # pspnet: the stage-1 encoder as trained
    # The release counts 11,373,314 learnable (the paper's 11.4M); 394,752 of them, the last block's support
    # attention and MLP, are not built here (module docstring).
    reference=Reference(10_978_562, {"backbone": "resnet50"},
                        published="11.4M (11,373,314 in the release, incl. 394,752 never trained; not built here)"),
)
