"""ResNet backbones in the two layouts the method families use (PSPNet deep stem, torchvision), local weight
loading, freezing, and the support-masking switch (feature / input / hybrid)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BackboneName = Literal["resnet50", "resnet101", "small"]
Variant = Literal["deep_stem", "torchvision"]
SupportMasking = Literal["feature", "input", "hybrid"]

LAYER_NAMES = ("layer0", "layer1", "layer2", "layer3", "layer4")
ModuleT = TypeVar("ModuleT", bound=nn.Module)

# name -> (base width, bottleneck blocks per stage). `small` keeps the full structure and key layout at a
# quarter of the width with 2 blocks per stage: a 2x3x161x161 eval forward takes ~11 ms (deep stem) on 2
# CPU cores, so [2, 2, 2, 2] costs little over [1, 1, 1, 1] and keeps a non-first block in every stage.
SPECS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet50": (64, (3, 4, 6, 3)),
    "resnet101": (64, (3, 4, 23, 3)),
    "small": (16, (2, 2, 2, 2)),
}


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 expansion) with the stride on the 3x3 conv, as torchvision and PSPNet do."""

    expansion = 4

    def __init__(self, in_dim: int, width: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_dim = width * self.expansion
        self.conv1 = nn.Conv2d(in_dim, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_dim)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def pre_relu(self, x: Tensor) -> Tensor:
        """The residual sum before the block's final ReLU (what HSNet correlates)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)  # in place, as torchvision's Bottleneck
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.pre_relu(x))


def _stage(in_dim: int, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    out_dim = width * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_dim != out_dim:
        downsample = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_dim))
    # PSPNet (hszhao/semseg) dilates EVERY 3x3 conv of a dilated stage, the first block's included, and moves
    # no stride there; followed exactly, so the released resnet50_v2 weights see the receptive fields they
    # were fine-tuned with.
    layers = [Bottleneck(in_dim, width, stride, dilation, downsample)]
    layers += [Bottleneck(out_dim, width, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """A bottleneck ResNet whose state-dict keys are those of the PSPNet release (`deep_stem`) or torchvision.

    `deep_stem`: three 3x3 convs (3->w, w->w, w->2w; BN + ReLU each) + max-pool; layer3 dilation 2 and layer4
    dilation 4 at stride 1 (output stride 8), or with `dilated=False` the strides 2 of the torchvision layout
    instead (output stride 32; same parameters, so a stage-1 PSPNet encoder loads into it: the HSNet family's
    backbone on the synthetic default). `torchvision`: 7x7 conv + max-pool, output stride 32.
    `layer0` is a view over the stem modules built on access, so no key appears twice in `state_dict()`.
    """

    def __init__(self, *, blocks: Sequence[int], width: int = 64, variant: Variant = "deep_stem",
                 dilated: bool = True) -> None:
        super().__init__()
        if variant not in ("deep_stem", "torchvision"):
            raise ValueError(f"unknown backbone variant {variant!r}; expected 'deep_stem' or 'torchvision'")
        self.variant = variant
        if variant == "deep_stem":
            stem_dim = 2 * width
            self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, stem_dim, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(stem_dim)
            dilations = (1, 1, 2, 4) if dilated else (1, 1, 1, 1)
        else:
            stem_dim = width
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            dilations = (1, 1, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.channels: dict[str, int] = {"layer0": stem_dim}
        in_dim = stem_dim
        for i, (n_blocks, dilation) in enumerate(zip(blocks, dilations)):
            stride = 1 if i == 0 or dilation > 1 else 2
            stage = _stage(in_dim, width * 2**i, n_blocks, stride, dilation)
            setattr(self, f"layer{i + 1}", stage)
            in_dim = width * 2**i * Bottleneck.expansion
            self.channels[f"layer{i + 1}"] = in_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init as torchvision / semseg: kaiming (fan_out) convs, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def layer0(self) -> nn.Sequential:
        """The stem up to and including the max-pool, over the SAME modules as conv1/bn1/... (not registered:
        registering it would save every stem tensor a second time under `layer0.*`)."""
        if self.variant == "deep_stem":
            mods = [self.conv1, self.bn1, self.relu, self.conv2, self.bn2, self.relu,
                    self.conv3, self.bn3, self.relu]
        else:
            mods = [self.conv1, self.bn1, self.relu]
        return nn.Sequential(*mods, self.maxpool)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) -> {"layer0": (B, C0, H/4, W/4), ..., "layer4": (B, C4, H/8 or H/32, ...)}."""
        feats = {}
        for name in LAYER_NAMES:
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def bottleneck_features(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> every bottleneck output of layer2..layer4 before its final ReLU, in one pass
        (HSNet's `extract_feat_res`; ResNet-50: 4 + 6 + 3 = 13 tensors)."""
        x = self.layer1(self.layer0(x))
        feats = []
        for stage in (self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block.pre_relu(x)
                feats.append(x)
                x = F.relu(x)  # not in place: `feats` keeps the pre-ReLU tensor
        return feats

    @property
    def bottleneck_ids(self) -> list[int]:
        """The stage (2, 3 or 4) of each tensor `bottleneck_features` returns."""
        return [i for i in (2, 3, 4) for _ in getattr(self, f"layer{i}")]


def build_backbone(name: BackboneName, variant: Variant, weights: str | Path = "", *, dilated: bool = True) -> ResNet:
    """A ResNet-50/101 or the CPU-sized `small` (width 16, blocks [2, 2, 2, 2]) in the given layout
    (`dilated`: see `ResNet`, deep stem only).

    `weights`: a local file loaded with `load_backbone_weights`; "" = random init. Nothing is downloaded.
    """
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(SPECS)}")
    width, blocks = SPECS[name]
    model = ResNet(blocks=blocks, width=width, variant=variant, dilated=dilated)
    if weights:
        load_backbone_weights(model, weights)
    return model


class BackboneWeightsError(ValueError):
    """A backbone weights file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class LoadReport:
    """Model keys the file did not provide, and file keys the model does not have (`fc.*` excluded)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _state_dict_in(obj: object) -> dict[str, Tensor] | None:
    # Training scripts wrap the weights: {"state_dict": ...} (semseg, PFENet, BAM) or {"model": ...}.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        return None
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return None
    return dict(obj)


def _first(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else "") if keys else "(no keys)"


def load_backbone_weights(model: ResNet, path: str | Path) -> LoadReport:
    """Load a local ImageNet (or PSPNet `resnet50_v2`) weights file into `model`, in place.

    Accepts a plain state dict or one wrapped under "state_dict" / "model"; strips a DataParallel `module.`
    prefix and ignores the ImageNet classifier (`fc.*`). Raises `BackboneWeightsError` for a missing,
    unreadable or non-state-dict file, a shape mismatch, or a file none of whose keys fit this backbone;
    warns (and reports) when only some keys are missing or unexpected.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: backbone weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, bad pickle, a non-tensor payload: all mean "unusable file"
        raise BackboneWeightsError(
            f"{path}: cannot read backbone weights ({type(exc).__name__}: {exc})") from exc
    state = _state_dict_in(obj)
    if state is None:
        raise BackboneWeightsError(f"{path}: not a state dict (a mapping of names to tensors), "
                                   f"got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}

    expected = model.state_dict()
    matched = [k for k in state if k in expected]
    if not matched:
        raise BackboneWeightsError(
            f"{path}: no key fits this {model.variant} backbone (a file for another model?); "
            f"the file has {_first(list(state))}; expected {_first(list(expected))}")
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in matched if state[k].shape != expected[k].shape]
    if wrong:
        raise BackboneWeightsError(f"{path}: shape mismatch for {len(wrong)} key(s) "
                                   f"(a {model.variant} backbone of another size?): " + "; ".join(wrong[:5]))

    result = model.load_state_dict(state, strict=False)
    # Old releases (torchvision's 2017 files, resnet50_v2) predate BN's `num_batches_tracked`: not a weight.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    report = LoadReport(missing=missing, unexpected=list(result.unexpected_keys))
    if report.missing or report.unexpected:
        warnings.warn(f"{path}: backbone weights loaded partially; {len(report.missing)} missing "
                      f"({_first(report.missing, 3)}), {len(report.unexpected)} unexpected "
                      f"({_first(report.unexpected, 3)})", stacklevel=2)
    return report


def freeze_(module: ModuleT) -> ModuleT:
    """Stop gradients to every parameter and switch to eval mode, in place; returns `module`.

    `model.train()` recurses into children and would put the frozen BN layers back in training mode (their
    running statistics would drift with every batch), so a method that keeps a frozen backbone overrides
    `train(mode)`: call `super().train(mode)`, then `self.backbone.eval()`.
    """
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def _foreground(support_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) 0/1/255 -> (B, 1, h, w) float; 255 (ignore) counts as background, as PFENet's `mask == 1`."""
    fg = (support_mask == 1).float().unsqueeze(1)  # (B, 1, H, W)
    if fg.shape[-2:] != size:
        fg = F.interpolate(fg, size=size, mode="bilinear", align_corners=True)
    return fg


def _masked(extract: Callable[[Tensor], list[Tensor]], support_img: Tensor, support_mask: Tensor,
            mode: SupportMasking) -> list[Tensor]:
    if mode not in ("feature", "input", "hybrid"):
        raise ValueError(f"unknown support masking {mode!r}; expected feature, input or hybrid")
    fm = im = None
    if mode in ("feature", "hybrid"):
        feats = extract(support_img)
        fm = [f * _foreground(support_mask, f.shape[-2:]).to(f.dtype) for f in feats]  # (B, C, h, w) each
    if mode in ("input", "hybrid"):
        fg = _foreground(support_mask, support_img.shape[-2:]).to(support_img.dtype)  # (B, 1, H, W)
        im = extract(support_img * fg)
    if fm is None:
        return im
    if im is None:
        return fm
    # Hybrid masking: keep the feature-masked activations where they survive, fill the rest (background,
    # and foreground units the mask zeroed) from the input-masked pass.
    return [torch.where(f > 0, f, i) for f, i in zip(fm, im)]


def masked_features(backbone: ResNet, support_img: Tensor, support_mask: Tensor, mode: SupportMasking,
                    layers: Sequence[str]) -> dict[str, Tensor]:
    """Support features of `layers` under `support_masking` (docs/methods.md, "Hybrid masking").

    support_img (B, 3, H, W); support_mask (B, H, W) 0/1/255. `feature`: backbone(img) * mask resized to each
    layer; `input`: backbone(img * mask); `hybrid`: where(FM > 0, FM, IM).
    """
    layers = list(layers)

    def extract(x: Tensor) -> list[Tensor]:
        feats = backbone(x)
        return [feats[name] for name in layers]

    return dict(zip(layers, _masked(extract, support_img, support_mask, mode)))


def masked_bottleneck_features(backbone: ResNet, support_img: Tensor, support_mask: Tensor,
                               mode: SupportMasking,
                               extract: Callable[[Tensor], list[Tensor]] | None = None) -> list[Tensor]:
    """`masked_features` for the HSNet family: the masked `bottleneck_features` (pre-ReLU, layer2..4).
    `extract` stands in for `backbone.bottleneck_features` (the same values, e.g. through a feature cache)."""
    return _masked(extract or backbone.bottleneck_features, support_img, support_mask, mode)
