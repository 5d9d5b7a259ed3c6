"""Oracle parity fixtures: the official PFENet / BAM / NTRENet / HSNet / ASNet / SCCAN forward on fssmeta's seeded
weights, recorded.

    python tools/oracle.py --method pfenet --official /tmp/official/PFENet --out tests/fixtures/oracle/pfenet.pt
    python tools/oracle.py --method bam --official /tmp/official/BAM --out tests/fixtures/oracle/bam.pt
    python tools/oracle.py --method ntrenet --official /tmp/official/NERTNet --out tests/fixtures/oracle/ntrenet.pt
    python tools/oracle.py --method hsnet --official /tmp/official/hsnet --torchvision /tmp/tvpkg \
        --out tests/fixtures/oracle/hsnet.pt
    python tools/oracle.py --method asnet --official /tmp/official/ifsl --torchvision /tmp/tvpkg \
        --einops /tmp/einopspkg --out tests/fixtures/oracle/asnet.pt
    python tools/oracle.py --method sccan --official /tmp/official/SCCAN --torchvision /tmp/tvpkg \
        --timm /tmp/timmpkg --out tests/fixtures/oracle/sccan.pt
    python tools/oracle.py --method hdmnet --official /tmp/official/hdmnet --torchvision /tmp/tvpkg \
        --einops /tmp/einopspkg --mmcv /tmp/mmpkg --out tests/fixtures/oracle/hdmnet.pt

`--official` is a local checkout of the pinned commit (`OFFICIAL` below). Its code is imported from that path
and run in a scratch directory (its constructors load `initmodel/...` weight files relative to the working
directory; fssmeta's weights, renamed to the official keys, are written there), with `.cuda()` made a no-op
on CPU. NTRENet's release does not import as published: its files are copied into the scratch directory and the
explicit text substitutions in `PATCHES` (recorded in the fixture) are applied there. HSNet builds its
backbone with torchvision's `resnet50`: `--torchvision` names a directory holding the torchvision package (its
model code is imported from there, its compiled extension never loaded); so does ASNet, which also needs einops
(`--einops`: a directory holding that package) and subclasses a PyTorch Lightning module (a stub `nn.Module`
stands in: the forward never reaches Lightning). SCCAN imports timm 0.5.4 (`--timm`; its transformer blocks take
only `to_2tuple` from it) and torchvision's `IntermediateLayerGetter` (`--torchvision`), and its backbone file
imports `torchvision.models.utils`, gone from torchvision since: a stub re-exporting `torch.hub`'s
`load_state_dict_from_url` (what that module was) stands in; nothing calls it. HDMNet builds its transformer
from mmcv 1.6.1 and mmsegmentation 0.27.0 (`--mmcv`: a directory holding their pure-Python packages, mmcv from
its source release without the compiled ops, with addict and yapf) and needs torchvision (mmcv's runner imports
it) and einops; `mmseg.models` is entered without its `__init__`, which imports every mmseg model, some through
mmcv's compiled ops: HDMNet imports only `mmseg.models.utils`. Nothing of it is copied into this
project. tests/unit/test_oracle_parity.py rebuilds fssmeta's model
with `fssmeta_model` and compares its forward with the recorded outputs; docs/parity.md says what is pinned.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import ModelConfig
from fssmeta.episode import Episode
from fssmeta.models import build_model, get_method
from fssmeta.models.ops import scaled_bins
from fssmeta.models.pspnet import build_pspnet

FORMAT = 1
SEED = 0
BASE_CLASSES = tuple(range(6, 21))  # PASCAL-5i fold 0: classes 1-5 are novel
TRAIN_CLASS = 9  # the episode's class in the training-mode (loss) run: a base class, so BAM leaves it out
# Official normalisation (PFENet / BAM train.py): RGB in [0, 255], ImageNet mean and std scaled by 255.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class Official:
    repo: str
    commit: str
    files: dict[str, str]  # the official files the oracle runs -> sha256 at `commit`


OFFICIAL = {
    "pfenet": Official("dvlab-research/PFENet", "a5056754d232829644e84d36b1e1d30818bd4c4f", {
        "model/PFENet.py": "0011d602797f196d190f1ac3cdf15b150b6d4ce11c99a1461168eddc6a8e2b41",
        "model/resnet.py": "f5b9f3b6094743b4f28e17f3b9dadbb4900f49d5f9e63d36d53920a25bb08131",
    }),
    "bam": Official("chunbolang/BAM", "c0f935c30e3b2b8055d5e1d65e846f6738a4a358", {
        "model/BAM.py": "68fcdb85bdff68b160178869ac7ce92f1f4e1e1f885c991221d86809781bb5aa",
        "model/PSPNet.py": "11366432c7f5fc8f681fd69706e7d8c827863ec22926376a85a5c13386e52578",
        "model/PPM.py": "bb880faf64e9585076204738565fc5e82198dbc217f4d40f97656f20b089ba04",
        "model/ASPP.py": "12bb1ffc5cd6f93f31ff4a520663f9cbae2714ba3a22e0ad1965608608c2f938",
        "model/resnet.py": "3ac40d4a757390bb983ef1c97371c7edcdef5eeba0b3bcd2735dfb788f9957bb",
        "util/config.py": "cbf78b74cb5fb715d075d19c3de3cfcd78495fbc80dccd3ec4c48756bd27244a",
        "config/pascal/pascal_split0_resnet50.yaml":
            "cd03ddfaeaa9bf2b6efe8bf4f07168f4f6dcdf545d0b6dbea23311d8a26b01a2",
    }),
    "ntrenet": Official("LIUYUANWEI98/NERTNet", "1fe13ad33ecd15eac7c752452c45c07cc4f9bbef", {
        "model/ourmodel.py": "d00a64ad64fe14a59adabab68db41587d455e162951ccfd4afd487bb6d6ec30e",
        "model/prototypical_contrast.py": "57c183b9d6a7c750cae96b303e1551fe418ffde02a01d6071113e78f3ceb7962",
        "model/base/resnet.py": "f5b9f3b6094743b4f28e17f3b9dadbb4900f49d5f9e63d36d53920a25bb08131",
        "config/pascal_split0_resnet50.yaml": "13aec87c2c24543878bed5195a893c03a6fdf27dfdad48c30a7e62d9c0d2575f",
    }),
    "hsnet": Official("juhongm999/hsnet", "6b1bc12b3ff9f3950f49c55ab6f089e8d9e0d191", {
        "model/hsnet.py": "7ea6ba75e69fe95a6b02b1c3e7d7f7a63200f674d5ac10add9fa4aca6e6b924a",
        "model/learner.py": "fc7f76bb993f04d152ce11c3d82efa48e5857bc8d15ceacf548d87b852c8e2e8",
        "model/base/conv4d.py": "3ab05e89be400539ac7abdf417d9c193535cd162beb8e1fbaeb47ed94af26aaa",
        "model/base/correlation.py": "62e1857de916034c91c38629be3351a02f37a98a3819bdd5957da761b1311db0",
        "model/base/feature.py": "558f70e8f247de8cd363539777239ba81d4ba257215969bb0c088b4b704e6681",
    }),
    "asnet": Official("dahyun-kang/ifsl", "d0b0c0d1b01c036eaae1470585764d1321ec5336", {
        "fs-cs/model/asnet.py": "2407fa505c32b465e5ce63f72e0823b879c22b0091698cc8ff65a86a44b7500a",
        "fs-cs/model/ifsl.py": "c881ba8b0d69e1f02be3305ebae12dfd0485ab1ef9001f7a898b6c94881292b8",
        "fs-cs/model/module/asnet.py": "6e9c77bb3b18d7450c772dfe0e273c936d252a22719bfb9230f4eb1ceea9c6d9",
        "fs-cs/model/base/aslayer.py": "8f445b7b1e8371bf236d8a2a5aa11b2049da0a03237b586df525948a9c5ce849",
        "fs-cs/model/base/correlation.py": "e67fa6ed7448266719a12db9f2da5a6df983b1fcea6449f7acc0e342248572ce",
        "fs-cs/model/base/feature.py": "42c70b4a971be999c0f6fa298a0d8c3cdca6c23306e375c8679bf06bc61f72b9",
    }),
    "sccan": Official("Sam1224/SCCAN", "c4e7b408f93f9944dd23872053190e6f0186af9f", {
        "model/SCCAN.py": "be44c945ba17a9d115d1bfcc1b6bdf70315ddb601159d55a47194811fcf75916",
        "model/swin_sccan.py": "95010d1ccdde3b75d534626ba2d339a368a7974d61698b30e967d28463ac926c",
        "model/ASPP.py": "12bb1ffc5cd6f93f31ff4a520663f9cbae2714ba3a22e0ad1965608608c2f938",
        "model/loss.py": "ddbda4ad25b90d76f1e8ebb1810d4edd1a4a9bfb6522b673ebe6504c1a95d9a2",
        "model/backbone_utils.py": "02bf8da6fa04e4d147efddc789efa1e446b98eed66672e22ef5ea4831e6275aa",
        "model/backbone_res.py": "bcd3e14488f95dc7d904fb19df37eb8a4ace80cc242c95c9a458fd3c6618ff67",
        "util/config.py": "cbf78b74cb5fb715d075d19c3de3cfcd78495fbc80dccd3ec4c48756bd27244a",
        "config/pascal/pascal_split0_resnet50.yaml":
            "f9310a84ecdce2a42d9a04f32f52782add3eed257bbee96b382fc57c20edd932",
    }),
    "hdmnet": Official("Pbihao/HDMNet", "39ec8b23a254a646017e687b54fc5127525c5039", {
        "model/HDMNet.py": "723b2d4a7c4f7e3d9f5cf663f797677926486dc882e132b4fad2683bf5b1ba42",
        "model/Transformer.py": "d9e7b5f7010bd70c030a03a6a1da0022af55ea1317e2ef66fe0e2f283422640e",
        "model/MaskMultiheadAttention.py": "6fb3d47ce6cb1ce076da59dc581e2bb8acc6139be3fc906e65ee7bb067b52ff2",
        "model/PSPNet.py": "d45dd15313a0bdb625a2d6bd72651af1876db3049f21170608210045c37f2baf",
        "model/PPM.py": "bb880faf64e9585076204738565fc5e82198dbc217f4d40f97656f20b089ba04",
        "model/resnet.py": "3ac40d4a757390bb983ef1c97371c7edcdef5eeba0b3bcd2735dfb788f9957bb",
        "util/config.py": "cbf78b74cb5fb715d075d19c3de3cfcd78495fbc80dccd3ec4c48756bd27244a",
        "config/pascal/pascal_split0_resnet50_manet.yaml":
            "0be8e1eb96f1a992a26bed85f956c077f6710ec325e19bee67c2bb1d3a5a88e7",
    }),
}
# HSNet's backbone is torchvision's ResNet-50 (`resnet.resnet50(pretrained=True)`): the release whose model code
# the oracle ran, and the sha256 of its `models/resnet.py` (checked; recorded in the fixture).
TORCHVISION = ("0.28.0", "9faf2f321fdaf7edbd791aedc6e3610c7edf9c892112cbd75861beae1e9518d1")
EINOPS = "0.8.1"  # ASNet's `rearrange` (pure Python; the version that ran is recorded in the fixture)
TIMM = "0.5.4"  # SCCAN's environment (env_ubuntu.yaml); swin_sccan.py imports DropPath, to_2tuple, trunc_normal_
# The methods whose official model is an HSNet-family one (torchvision's ResNet, the HSNet loader's masks).
HSNET_FAMILY = ("hsnet", "asnet")
# HDMNet's environment (its README): mmcv-full 1.6.1 and mmsegmentation 0.27.0; the oracle runs the pure-Python
# parts its transformer imports (checked; recorded in the fixture).
MMCV = {"mmcv": "1.6.1", "mmseg": "0.27.0"}
# HDMNet's PASCAL config lacks `zoom_factor`, which its PSPNet constructor reads (and train.py asserts): as
# published, train.py stops on it. The oracle sets BAM's value, which no HDMNet forward reads.
HDMNET_ZOOM_FACTOR = 8

# The smallest text substitutions that make an official release import and run its eval forward, applied to a
# copy in the scratch directory: (file, old, new, reason). None changes what the forward computes.
PATCHES = {
    "ntrenet": (
        ("model/ourmodel.py", "vgg=False\uff0cbgpro_num = 1):", "vgg=False, bgpro_num = 1):",
         "SyntaxError: a full-width comma (U+FF0C) between two keyword parameters of NTRENet.__init__"),
    ),
}
# Methods whose fixture records the eval-mode forward only (no training losses).
EVAL_ONLY = ("ntrenet",)


@dataclass(frozen=True)
class Case:
    """One recorded forward. `bins`: the official PFENet `ppm_scales` at this size, which fssmeta's default
    `pyramid_bins` (60, 30, 15, 8) scale to exactly (`ops.scaled_bins`; checked in `main`)."""

    name: str
    shot: int
    size: int  # square input; (size - 1) % 8 == 0 as the official forward asserts
    bins: tuple[int, ...]
    losses: bool  # also record the training-mode losses (BN and dropout in eval mode)


CASES = (
    Case("1-shot", 1, 225, (29, 15, 7, 4), losses=True),  # 29x29 features
    Case("5-shot", 5, 129, (17, 9, 4, 2), losses=False),  # 17x17 features
)


# ----------------------------------------------------------------------------------------------- fssmeta side

# The `model` settings each fixture is recorded at (every other option at its default: no memory, no mining):
# the ResNet-50 reference layout; PFENet borrows its backbone from the stage-1 PSPNet (fssmeta's convention
# without ImageNet weights), which the oracle then hands to the official model as its "ImageNet" file.
MODEL_CONFIG = {
    "pfenet": {"method": "pfenet", "backbone": "resnet50", "backbone_source": "stage1"},
    "bam": {"method": "bam", "backbone": "resnet50"},
    "ntrenet": {"method": "ntrenet", "backbone": "resnet50", "backbone_source": "stage1"},
    "hsnet": {"method": "hsnet", "backbone": "resnet50"},  # backbone_source weights: the official torchvision layout
    "asnet": {"method": "asnet", "backbone": "resnet50"},  # likewise; ASNet's own attention-masked learner
    # SCCAN's ImageNet backbone is the stage-1 encoder (as PFENet's), in SCCAN's own dilation layout (the default
    # `model.sccan.dilation: torchvision`).
    "sccan": {"method": "sccan", "backbone": "resnet50", "backbone_source": "stage1"},
    "hdmnet": {"method": "hdmnet", "backbone": "resnet50"},  # BAM's layout: the stage-1 PSPNet as base learner
}


@torch.no_grad()
def perturb_(model: nn.Module, seed: int) -> None:
    """Redraw every BatchNorm's affine parameters and running statistics, and BAM's two pass-through merge
    convs, from a seeded generator. At their constant initial values (BN 1 / 0 / 0 / 1, merges [1, 0]) a BN
    mapped onto the wrong official layer would still agree, and `cls_merge` = [1, 0] would hide the whole
    base learner from the output. GroupNorm (HSNet's learner) and LayerNorm (SCCAN's transformer) affine
    parameters are redrawn likewise."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.weight.shape
            module.weight.copy_(torch.rand(shape, generator=g) + 0.5)
            module.bias.copy_(0.1 * torch.randn(shape, generator=g))
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=g))
            module.running_var.copy_(torch.rand(shape, generator=g) + 0.5)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):  # none in PFENet / BAM / NTRENet: draws unchanged
            shape = module.weight.shape
            module.weight.copy_(torch.rand(shape, generator=g) + 0.5)
            module.bias.copy_(0.1 * torch.randn(shape, generator=g))
        elif name.endswith(("gram_merge", "cls_merge")):
            module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=g))
    # NTRENet's background prototype, zero-initialised: at zero neither its mapping nor the half of each
    # BGM / BGEM merge conv that reads it would be exercised. (None in PFENet / BAM: their draws are unchanged.)
    for name, param in model.named_parameters():
        if name.endswith("bg_prototype"):
            param.copy_(torch.rand(param.shape, generator=g))


def fssmeta_model(config: dict, shot: int, seed: int = SEED) -> nn.Module:
    """fssmeta's model as a fixture pins it, from its `model` settings (`MODEL_CONFIG`): a random stage-1
    PSPNet (seed) loaded through the method's stage-1 record (BAM: the base learner; PFENet: its encoder as
    the backbone), the method under seed + 1, then `perturb_` (seed + 2). Eval mode, CPU, fp32. A method
    that takes nothing from stage 1 here (HSNet at `backbone_source: weights`, its official torchvision
    layout) is built under seed + 1 alone, its backbone random too (handed to the official model)."""
    cfg = ModelConfig(**config)
    record = get_method(cfg.method)
    if record.stage1 is None or (record.stage1.part == "backbone" and cfg.backbone_source == "weights"):
        torch.manual_seed(seed + 1)
        model = build_model(cfg, shot=shot, base_classes=list(BASE_CLASSES))
        perturb_(model, seed + 2)
        return model.eval()
    torch.manual_seed(seed)
    pspnet = build_pspnet(cfg, 1 + len(BASE_CLASSES))
    torch.manual_seed(seed + 1)
    model = build_model(cfg, shot=shot, base_classes=list(BASE_CLASSES))
    get_method(cfg.method).stage1_for(cfg).load(model, pspnet.state_dict())
    perturb_(model, seed + 2)
    return model.eval()


def fingerprint(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """State-dict names and (N, 2) float64 [sum, sum of squares] per entry: a cheap check that fssmeta's
    initialisation (or `perturb_`) has not changed since the fixture was recorded."""
    names, values = [], []
    for name, tensor in model.state_dict().items():
        t = tensor.double()
        names.append(name)
        values.append(torch.stack([t.sum(), t.pow(2).sum()]))
    return names, torch.stack(values)


def make_inputs(seed: int, size: int, shot: int) -> dict[str, torch.Tensor]:
    """A query and `shot` supports of one synthetic "class": an ellipse of a shared colour with pixel noise
    on a smooth random background. Images (uint8 RGB), masks (uint8: 1 inside, 255 on a thin ring outside
    the ellipse as VOC's boundaries, 0 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(3, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, masks = [], []
    for _ in range(1 + shot):
        background = F.interpolate(torch.rand(1, 3, 5, 5, generator=g), size=(size, size), mode="bilinear",
                                   align_corners=True)[0]
        cy, cx = (torch.rand(2, generator=g) - 0.5) * 0.8
        ry, rx = 0.25 + 0.3 * torch.rand(2, generator=g)
        radius = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        inside = radius <= 1
        texture = colour[:, None, None] + 0.15 * torch.randn(3, size, size, generator=g)
        image = torch.where(inside, texture, background)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
        mask = inside.to(torch.uint8)
        mask[(radius > 1) & (radius <= 1.2)] = 255
        masks.append(mask)
    return {"query_img": images[0][None], "query_mask": masks[0][None],  # (1, 3, H, W), (1, H, W)
            "support_imgs": torch.stack(images[1:])[None],  # (1, S, 3, H, W)
            "support_masks": torch.stack(masks[1:])[None]}  # (1, S, H, W)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> float32 as the official loaders feed the models."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (images.float() - mean) / std


def episode(inputs: dict[str, torch.Tensor], class_id: int) -> Episode:
    """fssmeta's batch of one episode from a case's uint8 inputs (an all-background query mask where the
    case stores none: only the loss run reads it)."""
    query_img = normalise(inputs["query_img"])
    query_mask = inputs.get("query_mask", torch.zeros(1, *query_img.shape[-2:], dtype=torch.uint8))
    return Episode(support_imgs=normalise(inputs["support_imgs"]), support_masks=inputs["support_masks"].long(),
                   query_img=query_img, query_mask=query_mask.long(), class_id=torch.tensor([class_id]))


def train_mode_(model: nn.Module, fix_bn: bool = False) -> nn.Module:
    """Training mode for the loss comparison with every dropout off (deterministic); `fix_bn` puts every BN
    in eval mode as BAM's trainer does (`model.apply(fix_bn)`: every class named *BatchNorm*, so HDMNet's
    SyncBatchNorm too). fssmeta's own `train()` decides its BN (`model.backbone_bn: method`: PFENet's backbone
    BN in train mode, BAM's fixed, as the official trainers)."""
    model.train()
    for module in model.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout2d)) or (
                fix_bn and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            module.eval()
    return model


def fssmeta_losses(model: nn.Module, method: str, batch: Episode) -> dict[str, float]:
    """The method record's loss dict (CE of the final logits, `aux` = mean CE of the deep-supervision
    heads: PFENet's 4 scale heads, BAM's meta head) in `train_mode_`. Run it last: in PFENet's convention
    the backbone BN running statistics move."""
    with torch.no_grad():
        losses = get_method(method).loss(train_mode_(model), batch)
    model.eval()
    values = {k: float(v) for k, v in losses.items()}
    if "ce" in values and "aux" in values:  # HDMNet's forward returns only their sum (main_loss + aux_loss1)
        values["ce+aux"] = values["ce"] + values["aux"]
    return values


def hsnet_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HSNet's case inputs: the query mask as its loader gives it (`extract_ignore_idx`: the class 1, every
    other pixel, the 255 ring included, 0), so that both losses see the same target; the support masks keep
    their 255 ring (fssmeta reads it as background; the official model gets `mask == 1`, as its loader)."""
    return {**inputs, "query_mask": (inputs["query_mask"] == 1).to(torch.uint8)}


def hsnet_outputs(model: nn.Module, batch: Episode) -> dict[str, torch.Tensor]:
    """fssmeta's HSNet outputs under the fixture's names: 1 shot, the forward's logits; k shots, each shot's
    logits (`shot_logits`, the query encoded once) and the voted mask (argmax of the forward's logits)."""
    with torch.no_grad():
        if batch.support_imgs.shape[1] == 1:
            return {"logits": model(batch).logits}
        return {"shot_logits": model.shot_logits(batch), "vote": model(batch).logits.argmax(1).float()}


def asnet_outputs(model: nn.Module, batch: Episode) -> dict[str, torch.Tensor]:
    """fssmeta's ASNet outputs under the fixture's names. 1 shot: the learner's log-probs (B, 1 way, 2, h, w),
    the forward's logits at the query size and the presence (B, 1); k shots: each shot's log-probs
    (B, S, 1, 2, h, w), the presence over the shots and the forward's argmax (the official `pred_seg`)."""
    from fssmeta.models.asnet import class_presence

    with torch.no_grad():
        shot_log_probs = model.shot_log_probs(batch)[:, :, None]  # (B, S, 1 way, 2, h, w)
        logits = model(batch).logits
    presence = class_presence(shot_log_probs).float()
    if batch.support_imgs.shape[1] == 1:
        return {"log_probs": shot_log_probs[:, 0], "logits": logits, "presence": presence}
    return {"shot_log_probs": shot_log_probs, "presence": presence, "pred_seg": logits.argmax(1).float()}


def hdmnet_outputs(model: nn.Module, batch: Episode) -> dict[str, torch.Tensor]:
    """fssmeta's HDMNet outputs under the fixture's names: the final logits; the meta (transformer) and base
    learners' logits at feature size; each stage's matching correlation (B, h_i, w_i) as `correlation_<stage>`,
    stage 0 the finest."""
    captured: dict[str, object] = {}
    hooks = [model.transformer.register_forward_hook(lambda m, i, o: captured.update(meta=o[0], correlations=o[1])),
             model.base_learner.cls[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("base", o))]
    with torch.no_grad():
        logits = model(batch).logits
    for hook in hooks:
        hook.remove()
    stages = list(reversed(captured["correlations"]))  # the model lists them coarsest first
    return {"logits": logits, "meta_logits": captured["meta"], "base_logits": captured["base"],
            **{f"correlation_{i}": c for i, c in enumerate(stages)}}


# ---------------------------------------------------------------------------------------------- official side

@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """Make the official code's hard-wired CUDA calls run on CPU: `Tensor.cuda` / `Module.cuda` return self
    (PFENet's forward has `.cuda()` tensors as default arguments, built at import) and
    `torch.arange(..., device='cuda')` (BAM's training-mode base map) allocates on CPU."""
    saved = torch.Tensor.cuda, nn.Module.cuda, torch.arange

    def arange(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return saved[2](*args, **kwargs)

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.arange = arange
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.arange = saved


def check_checkout(method: str, path: Path) -> dict[str, str]:
    """The checkout's files must be those of the pinned commit; returns their sha256."""
    pinned = OFFICIAL[method]
    if (path / ".git").exists():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        if head != pinned.commit:
            sys.exit(f"{path}: HEAD is {head}, the oracle pins {pinned.repo}@{pinned.commit}")
    hashes = {}
    for rel, expected in pinned.files.items():
        if not (path / rel).is_file():
            sys.exit(f"{path}: no {rel}; is this a checkout of {pinned.repo}@{pinned.commit}?")
        digest = hashlib.sha256((path / rel).read_bytes()).hexdigest()
        if digest != expected:
            sys.exit(f"{path / rel}: sha256 {digest} is not that of {pinned.repo}@{pinned.commit} ({expected})")
        hashes[rel] = digest
    return hashes


def patched_copy(method: str, path: Path, scratch: Path) -> tuple[Path, dict[str, str]]:
    """Copy the official files into `scratch/official` and apply `PATCHES[method]` (each must match exactly
    once); returns the copy and the sha256 of each patched file."""
    root = scratch / "official"
    for rel in OFFICIAL[method].files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path / rel, root / rel)
    hashes = {}
    for rel, old, new, _ in PATCHES.get(method, ()):
        text = (root / rel).read_text(encoding="utf-8")
        if text.count(old) != 1:
            sys.exit(f"{rel}: patch {old!r} matches {text.count(old)} times, not once")
        (root / rel).write_text(text.replace(old, new), encoding="utf-8")
    for rel, *_ in PATCHES.get(method, ()):
        hashes[rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    return root, hashes


def import_official(method: str, path: Path) -> types.ModuleType:
    """Import the official model module from the checkout (the caller has entered `cpu_only`)."""
    sys.path.insert(0, str(path))
    if method == "ntrenet":
        # ourmodel.py imports model.base.vgg for its VGG-16 option only; the stub keeps torchvision's VGG
        # weights out (the ResNet-50 path never reads it).
        stub = types.ModuleType("model.base.vgg")
        sys.modules["model.base.vgg"] = stub
        import model.ourmodel as official
        return official
    if method == "hsnet":
        import model.hsnet as official  # torchvision is importable: `torchvision_models` has run
        return official
    if method == "asnet":
        # iFSLModule subclasses pl.LightningModule for its training loop only; the forward, the merge and the
        # k-shot prediction are plain torch. A stub package stands in for Lightning (not installed here).
        stub = types.ModuleType("pytorch_lightning")
        stub.LightningModule = nn.Module
        sys.modules["pytorch_lightning"] = stub
        sys.path.insert(0, str(path / "fs-cs"))
        import model.asnet as official
        return official
    if method == "sccan":
        # backbone_res.py imports `load_state_dict_from_url` from torchvision.models.utils, a module later
        # torchvision removed; in the release's torchvision (0.8) it re-exported torch.hub's. Never called.
        stub = types.ModuleType("torchvision.models.utils")
        stub.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = stub
        import model.SCCAN as official
        return official
    if method == "bam":
        # BAM's model imports util.util for a data helper only; that module pulls in seaborn, pandas, scipy,
        # matplotlib, which the model never uses. A stub stands in for it.
        stub = types.ModuleType("util.util")
        stub.get_train_val_set = None
        sys.modules["util.util"] = stub
        import model.BAM as official
    elif method == "hdmnet":
        import model.HDMNet as official  # mmcv, mmseg, einops and torchvision: made importable by `main`
    else:
        import model.PFENet as official
    return official


def mm_packages(path: Path | None) -> dict[str, str]:
    """Make mmcv and mmseg importable for HDMNet from `path` (a directory holding mmcv's pure-Python package,
    mmseg, addict and yapf), else the installed ones; `mmseg.models` as a bare package (its `__init__` imports
    every mmseg model, some through mmcv's compiled ops, which a pure-Python mmcv lacks: HDMNet reads only
    `mmseg.models.utils`). Torchvision must be importable first (mmcv's runner imports it). Returns the
    versions, which must be `MMCV`'s."""
    if path is not None:
        sys.path.insert(0, str(path))
    import mmcv
    import mmseg

    models = types.ModuleType("mmseg.models")
    models.__path__ = [str(Path(mmseg.__file__).parent / "models")]
    sys.modules["mmseg.models"] = models
    found = {"mmcv": mmcv.__version__, "mmseg": mmseg.__version__}
    if found != MMCV:
        sys.exit(f"{mmcv.__file__}, {mmseg.__file__}: {found}, the oracle pins {MMCV}")
    return found


def torchvision_models(path: Path | None) -> dict[str, str]:
    """Make `torchvision.models` importable for HSNet: from `path`, a directory holding the torchvision
    package, as bare packages (its `__init__` loads a compiled extension that a CPU torch of another build
    refuses; the model code needs none of it), else the installed one. `resnet50(pretrained=True)` is made to
    build the random-init model: nothing is downloaded, the weights are fssmeta's (strict load). Returns the
    version and sha256 of `models/resnet.py`, which must be `TORCHVISION`'s."""
    if path is not None:
        for name, sub in (("torchvision", ""), ("torchvision.models", "models")):
            package = types.ModuleType(name)
            package.__path__ = [str(path / "torchvision" / sub)]
            sys.modules[name] = package
    from torchvision.models import resnet

    source = Path(resnet.__file__)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    found = re.search(r"__version__ = '([^']+)'", (source.parents[1] / "version.py").read_text())
    version = found.group(1) if found else "?"  # e.g. 0.28.0+cu130: the wheel's build, same model code
    if not version.startswith(TORCHVISION[0]) or digest != TORCHVISION[1]:
        sys.exit(f"{source}: torchvision {version} ({digest}), the oracle pins {TORCHVISION}")
    build = resnet.resnet50
    resnet.resnet50 = lambda pretrained=False, **kwargs: build(weights=None, **kwargs)
    return {"version": version, "models/resnet.py": digest}


def einops_package(path: Path | None) -> dict[str, str]:
    """Make einops importable for ASNet from `path` (a directory holding the package), else the installed
    one; returns its version, which must be `EINOPS`."""
    if path is not None:
        sys.path.insert(0, str(path))
    import einops

    if einops.__version__ != EINOPS:
        sys.exit(f"{einops.__file__}: einops {einops.__version__}, the oracle pins {EINOPS}")
    return {"version": einops.__version__}


def timm_package(path: Path | None) -> dict[str, str]:
    """Make timm importable for SCCAN from `path` (a directory holding the package; it imports torchvision,
    which `torchvision_models` has made importable), else the installed one; returns its version, which must
    be `TIMM`."""
    if path is not None:
        sys.path.insert(0, str(path))
    import timm

    if timm.__version__ != TIMM:
        sys.exit(f"{timm.__file__}: timm {timm.__version__}, the oracle pins {TIMM}")
    return {"version": timm.__version__}


def bam_args(path: Path, shot: int, config_file: str = "config/pascal/pascal_split0_resnet50.yaml"):
    """BAM's args, as its train.py builds them from its PASCAL config (HDMNet: `config_file`, its own)."""
    from util import config

    args = config.load_cfg_from_cfg_file(str(path / config_file))
    args.shot = shot
    return args


def official_key(method: str, key: str) -> str:
    """The fssmeta state-dict key that fills official `key` (PFENet, BAM, or BAM's stage-1 PSPNet file)."""
    if method == "hsnet":
        return hsnet_key(key)
    if method == "asnet":
        return asnet_key(key)
    if method == "sccan":
        return sccan_key(key)
    if method == "hdmnet":
        return hdmnet_key(key)
    stem = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}  # layer0.<i>
    backbone = "backbone." if method in ("pfenet", "ntrenet") else "base_learner.backbone."
    head, _, rest = key.partition(".")
    if head == "encoder":  # PSPNet's encoder = Sequential(layer0, ..., layer4), the same modules again
        index, _, rest = rest.partition(".")
        head = f"layer{index}"
    if head == "layer0":
        index, _, param = rest.partition(".")
        return f"{backbone}{stem[index]}.{param}"
    if head in ("layer1", "layer2", "layer3", "layer4"):
        return f"{backbone}{head}.{rest}"
    if head in ("ppm", "cls") and method == "pspnet":
        return f"base_learner.{key}"
    if head == "learner_base":  # Sequential(PSPNet.ppm, PSPNet.cls)
        index, _, rest = rest.partition(".")
        return f"base_learner.{('ppm', 'cls')[int(index)]}.{rest}"
    if head == "ASPP_meta":  # layer6_0 = image pooling, layer6_1 = 1x1, layer6_2..4 = dilations 6, 12, 18
        branch, _, rest = rest.partition(".")
        index = int(branch.removeprefix("layer6_"))
        return f"aspp.image_pool.{rest}" if index == 0 else f"aspp.branches.{index - 1}.{rest}"
    if head in ("gram_merge", "cls_merge", "kshot_rw"):
        return f"ensemble.{key}"
    if method == "ntrenet":
        if key == "bg_prototype":
            return "background.bg_prototype"
        index, _, rest = rest.partition(".")
        renamed = {"down_bg": "background.down", "bg_res1": "background.residual", "bg_cls": "background.head"}
        if head in renamed:
            return f"{renamed[head]}.{index}.{rest}"
        per_scale = {"init_merge1": "bg_merge.{}.merge", "init_merge2": "init_merge.{}",
                     "inital_beta_conv": "initial_conv.{}", "inital_inner_cls": "initial_cls.{}",
                     "init_merge3": "do_merge.{}.merge"}
        if head in per_scale:
            return f"{per_scale[head].format(index)}.{rest}"
    return key


def hsnet_key(key: str) -> str:
    """HSNet: the torchvision backbone keys are fssmeta's; `hpn_learner.<block>.<i>.conv1 / conv2` (the
    center-pivot kernels over the query / support dims) are `<block>.<i>.query_conv / support_conv`."""
    if not key.startswith("hpn_learner."):
        return key
    block, _, rest = key.removeprefix("hpn_learner.").partition(".")
    block = {"encoder_layer4": "squeeze4", "encoder_layer3": "squeeze3", "encoder_layer2": "squeeze2",
             "encoder_layer4to3": "mix43", "encoder_layer3to2": "mix32"}.get(block, block)
    rest = rest.replace(".conv1.", ".query_conv.").replace(".conv2.", ".support_conv.")
    return f"{block}.{rest}"


def asnet_key(key: str) -> str:
    """ASNet: the torchvision backbone keys are fssmeta's; `learner.<block>.<i>.attn.*` / `.ff.*` (an attentive
    squeeze layer's attention and FFN) are `<block>.<i>.*` with fssmeta's names; the decoders keep theirs."""
    if not key.startswith("learner."):
        return key
    block, _, rest = key.removeprefix("learner.").partition(".")
    block = {"encoder_layer4": "squeeze4", "encoder_layer3": "squeeze3", "encoder_layer2": "squeeze2",
             "encoder_layer4to3": "mix43", "encoder_layer3to2": "mix32"}.get(block, block)
    if block.startswith("decoder"):
        return f"{block}.{rest}"
    index, _, rest = rest.partition(".")
    for official, ours in (("attn.short_cut.", "shortcut."), ("attn.qhead.", "query_embed."),
                           ("attn.khead.", "key_embed."), ("attn.vhead.", "value_embed."),
                           ("attn.agg.", "aggregate."), ("attn.out_norm.", "attn_norm."), ("ff.ff.", "ffn."),
                           ("ff.out_norm.", "ffn_norm.")):
        if rest.startswith(official):
            return f"{block}.{index}.{ours}{rest.removeprefix(official)}"
    return key


def sccan_key(key: str) -> str:
    """SCCAN: `backbone.body.*` (torchvision's IntermediateLayerGetter over the deep-stem ResNet) is fssmeta's
    `backbone.*`; `transformer.layers.0.blocks.<i>` is `transformer.blocks.<i>` with `attn_q / attn_s / mlp_q /
    mlp_s` = `attn_query / attn_support / mlp_query / mlp_support` (each MLP's `fc1 / fc2` = `0 / 2`) and
    `norm0` = `norm`; `ASPP_meta` as BAM's; `init_merge_query / supp.0` are plain convs here."""
    if key.startswith("backbone.body."):
        return "backbone." + key.removeprefix("backbone.body.")
    if key.startswith("init_merge_"):
        return key.replace(".0.", ".", 1)
    if key.startswith("transformer.norm0."):
        return "transformer.norm." + key.removeprefix("transformer.norm0.")
    if key.startswith("transformer.layers.0.blocks."):
        rest = key.removeprefix("transformer.layers.0.blocks.")
        for official, ours in (("attn_q.", "attn_query."), ("attn_s.", "attn_support."), ("mlp_q.", "mlp_query."),
                               ("mlp_s.", "mlp_support.")):
            rest = rest.replace(f".{official}", f".{ours}", 1)
        return "transformer.blocks." + rest.replace(".fc1.", ".0.").replace(".fc2.", ".2.")
    return official_key("bam", key)  # ASPP_meta; the heads keep the release's names


# HDMNet's transformer layer (mmcv / mmseg names) -> fssmeta's; `norm1`, `norm2` and `attn.sr` keep theirs.
HDMNET_LAYER = (("attn.attn.linear_q.", "attn.q."), ("attn.attn.linear_k.", "attn.k."),
                ("attn.attn.linear_v.", "attn.v."), ("attn.attn.linear_o.", "attn.out."),
                ("attn.norm.", "attn.sr_norm."), ("ffn.layers.0.", "ffn.fc1."), ("ffn.layers.1.", "ffn.position."),
                ("ffn.layers.4.", "ffn.fc2."))


def hdmnet_key(key: str) -> str:
    """HDMNet: `ppm`, `cls` (the PSPNet head's conv + BN) and `base_learnear` (its ReLU, dropout, classifier:
    `cls.2..4`) are the base learner's, the backbone and the merges as BAM's. In `transformer.mix_transformer`:
    `down_sample_layers.<i>.0` (mmseg PatchEmbed `projection`, `norm`) is `stages.<i>.embed`, `embed_norm`;
    `.1`, `.2` are `stages.<i>.layers.0`, `.1`; `.3` is `stages.<i>.norm`; `match_layers.<i>.0` is
    `matchers.<i>`, `.1` (mmcv ConvModule `conv`, `bn`) is `fuse.<i>.0`, `.1`; `parse_layers` is `parse`; in
    each layer `HDMNET_LAYER`."""
    head, _, rest = key.partition(".")
    if head in ("ppm", "cls"):
        return f"base_learner.{key}"
    if head == "base_learnear":  # Sequential(PSPNet.cls[2], cls[3], cls[4])
        index, _, rest = rest.partition(".")
        return f"base_learner.cls.{int(index) + 2}.{rest}"
    if not key.startswith("transformer.mix_transformer."):
        return official_key("bam", key)
    block, _, rest = key.removeprefix("transformer.mix_transformer.").partition(".")
    if block in ("parse_layers", "cls"):
        return f"transformer.{'parse' if block == 'parse_layers' else 'cls'}.{rest}"
    stage, _, rest = rest.partition(".")
    part, _, rest = rest.partition(".")
    layer = next((new + rest.removeprefix(old) for old, new in HDMNET_LAYER if rest.startswith(old)), rest)
    if block == "match_layers":
        if part == "0":
            return f"transformer.matchers.{stage}.{layer}"
        module, _, param = rest.partition(".")
        return f"transformer.fuse.{stage}.{ {'conv': 0, 'bn': 1}[module]}.{param}"
    if part == "0":
        module, _, param = rest.partition(".")
        return f"transformer.stages.{stage}.{ {'projection': 'embed', 'norm': 'embed_norm'}[module]}.{param}"
    if part == "3":
        return f"transformer.stages.{stage}.norm.{rest}"
    return f"transformer.stages.{stage}.layers.{int(part) - 1}.{layer}"


# Official entries no fssmeta entry fills, kept at the official model's own values: torchvision's ImageNet
# classifier, which HSNet and ASNet build with their backbone and never run; SCCAN's last-block support update
# (block 7 of 8), computed and discarded by the release, not built by fssmeta (docs/methods.md, SCCAN).
OFFICIAL_ONLY = {"hsnet": ("backbone.fc.",), "asnet": ("backbone.fc.",),
                 "sccan": ("transformer.layers.0.blocks.7.attn_s.", "transformer.layers.0.blocks.7.mlp_s.")}
# fssmeta entries with no official counterpart: PSPNet's layer3 auxiliary head (semseg's; BAM's PSPNet has
# none; it is not used in BAM's forward) and BAM's sorted base-class ids.
UNMAPPED = ("base_learner.aux.", "base_classes")
# ... and by their ending: BN's step counter, which SCCAN's FrozenBatchNorm2d does not have.
UNMAPPED_ENDINGS = {"sccan": ("num_batches_tracked",)}
# fssmeta entries stored in another layout than their official counterpart: NTRENet's background prototype
# is (D,) here, (1, D, 1, 1) officially.
RESHAPED = ("background.bg_prototype",)


def to_official(method: str, official: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fssmeta's `state` renamed onto `official`'s keys; every official key filled with a tensor of its shape."""
    mapped, used = {}, set()
    for key, target in official.state_dict().items():
        if key.startswith(OFFICIAL_ONLY.get(method, ())):
            mapped[key] = target.clone()
            continue
        source = official_key(method, key)
        if source not in state:
            raise KeyError(f"official {key}: no fssmeta entry {source}")
        if source in RESHAPED and state[source].numel() == target.numel():
            mapped[key] = state[source].reshape(target.shape).clone()  # same values, official layout
            used.add(source)
            continue
        if state[source].shape != target.shape:
            raise ValueError(f"official {key} {tuple(target.shape)} vs fssmeta {source} {tuple(state[source].shape)}")
        mapped[key] = state[source].clone()
        used.add(source)
    left = [k for k in state if k not in used and not k.startswith(UNMAPPED)
            and not k.endswith(UNMAPPED_ENDINGS.get(method, ()))]
    if method != "pspnet" and left:
        raise ValueError(f"fssmeta entries with no official counterpart: {left}")
    return mapped


def official_model(method: str, module: types.ModuleType, path: Path, case: Case, state: dict[str, torch.Tensor],
                   scratch: Path) -> nn.Module:
    """Construct the official model as its train.py does, loading from `initmodel/` in `scratch` the files
    its constructors read, then fssmeta's whole state mapped onto its keys (strict)."""
    if method == "hsnet":  # as train.py / test.py: resnet50, logits upsampled to the 400 canvas
        model = module.HypercorrSqueezeNetwork("resnet50", False)
        model.load_state_dict(to_official(method, model, state), strict=True)
        return model.eval()
    if method == "asnet":  # as main.py: resnet50, 1 way, masks given (not --weak)
        args = argparse.Namespace(backbone="resnet50", way=1, shot=case.shot, weak=False, lr=1e-3)
        model = module.AttentiveSqueezeNetwork(args)
        model.load_state_dict(to_official(method, model, state), strict=True)
        return model.eval()
    initmodel = scratch / "initmodel"
    initmodel.mkdir(exist_ok=True)
    if method == "sccan":
        # Its backbone loads initmodel/resnet50_v2.pth strictly into torchvision's ResNet class (deep stem):
        # fssmeta's backbone keys, and an ImageNet classifier it never runs (seeded; not in its state).
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            fc = nn.Linear(2048, 1000)
        weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        torch.save({**weights, "fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()},
                   initmodel / "resnet50_v2.pth")
        args = bam_args(path, case.shot)  # train_sccan.py's args from config/pascal/pascal_split0_resnet50.yaml
        model = module.OneModel(args)
        model.load_state_dict(to_official(method, model, state), strict=True)
        return model.eval()
    # The ImageNet ResNet-50 file both constructors load (strict=False): fssmeta's backbone keys ARE the
    # PSPNet resnet50_v2 keys.
    prefix = "backbone." if method in ("pfenet", "ntrenet") else "base_learner.backbone."
    torch.save({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
               initmodel / "resnet50_v2.pth")
    if method == "pfenet":
        model = module.PFENet(layers=50, classes=2, zoom_factor=8, criterion=nn.CrossEntropyLoss(ignore_index=255),
                              BatchNorm=nn.BatchNorm2d, pretrained=True, shot=case.shot,
                              ppm_scales=list(case.bins), vgg=False)
    elif method == "ntrenet":
        # As train.py, from config/pascal_split0_resnet50.yaml (layers 50, vgg False), with the bins of the
        # case (as PFENet) and bgpro_num 1, the constructor's default: the config's bgpro_num 2 builds a
        # (1, 512, 1, 1) prototype that init_merge1 (512 input channels) cannot take with the 256-d query
        # (768 channels), so the published config does not run; 1 is the layout fssmeta follows.
        model = module.NTRENet(layers=50, classes=2, zoom_factor=8, criterion=nn.CrossEntropyLoss(ignore_index=255),
                               BatchNorm=nn.BatchNorm2d, pretrained=True, shot=case.shot,
                               ppm_scales=list(case.bins), vgg=False, bgpro_num=1)
    else:
        if method == "hdmnet":  # its train.py's args: the manet config, plus the zoom factor that config lacks
            args = bam_args(path, case.shot, "config/pascal/pascal_split0_resnet50_manet.yaml")
            args.zoom_factor = HDMNET_ZOOM_FACTOR
        else:
            args = bam_args(path, case.shot)
        # BAM's (and HDMNet's, `pre_weight`) constructor loads its fold's stage-1 PSPNet from this path (key names
        # of its PSPNet OneModel).
        pspnet = sys.modules["model.PSPNet"].OneModel(args)
        stage1 = initmodel / "PSPNet" / args.data_set / f"split{args.split}" / f"resnet{args.layers}"
        stage1.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": to_official("pspnet", pspnet, state)}, stage1 / "best.pth")
        model = module.OneModel(args, cls_type="Base")
    model.load_state_dict(to_official(method, model, state), strict=True)
    return model.eval()


def run_official(method: str, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eval-mode official forward -> the final logits (B, 2, H, W); BAM also its meta and base learners'
    outputs at feature size, taken by hooks on `cls_meta` and `learner_base`."""
    x = normalise(inputs["query_img"])
    s_x = normalise(inputs["support_imgs"])
    s_y = inputs["support_masks"].float()
    if method == "hsnet":
        return run_hsnet(model, x, s_x, (inputs["support_masks"] == 1).float())
    if method == "asnet":
        return run_asnet(model, x, *asnet_supports(s_x, inputs["support_masks"]))
    with torch.no_grad():
        if method == "pfenet":
            return {"logits": model(x, s_x, s_y)}
        captured = {}
        if method == "sccan":  # eval: meta_out upsampled to the input, and at feature size (64) `sccan_hooks`
            hooks = sccan_hooks(model, captured, official=True)
            final = model(x, s_x, s_y, None)
            for hook in hooks:
                hook.remove()
            return {"logits": final, **captured}
        if method == "hdmnet":  # eval: final_out (upsampled to the input); the transformer's and `base_learnear`'s
            # outputs at feature size; each stage's matching correlation from its attention module's (out, weight)
            # output, weight (B, h*w) -> (B, h, w) on the square maps. Keywords: forward takes x, y_m, y_b, s_x, s_y.
            hooks = [layer[0].attn.register_forward_hook(
                lambda m, i, o, idx=idx: captured.__setitem__(f"correlation_{idx}", o[1]))
                for idx, layer in enumerate(model.transformer.mix_transformer.match_layers)]
            hooks += [model.transformer.register_forward_hook(lambda m, i, o: captured.__setitem__("meta_logits", o[0])),
                      model.base_learnear.register_forward_hook(lambda m, i, o: captured.__setitem__("base_logits", o))]
            final, _, _ = model(x, s_x=s_x, s_y=s_y)
            for hook in hooks:
                hook.remove()
            for key, weight in captured.items():
                if key.startswith("correlation_"):
                    side = math.isqrt(weight.shape[1])
                    captured[key] = weight.view(weight.shape[0], side, side)
            return {"logits": final, **captured}
        if method == "ntrenet":
            # The background map (bg_cls, run once on the query in eval mode) and each scale's initial
            # prediction (inital_inner_cls), at feature / bin size. Keywords of forward's own signature:
            # train.py's validation call passes `neg_dict=`, which forward does not take (TypeError).
            hooks = [model.bg_cls.register_forward_hook(lambda m, i, o: captured.__setitem__("bg_logits", o))]
            for idx, head in enumerate(model.inital_inner_cls):
                hooks.append(head.register_forward_hook(
                    lambda m, i, o, idx=idx: captured.__setitem__(f"initial_logits_{idx}", o)))
            final = model(s_x=s_x, s_y=s_y, x=x, y=inputs["query_mask"].float(), classes=None)
            for hook in hooks:
                hook.remove()
            return {"logits": final, **captured}
        hooks = [model.cls_meta.register_forward_hook(lambda m, i, o: captured.__setitem__("meta_logits", o)),
                 model.learner_base.register_forward_hook(lambda m, i, o: captured.__setitem__("base_logits", o))]
        final, _, _ = model(x, s_x, s_y, None, None, cat_idx=None)
        for hook in hooks:
            hook.remove()
    return {"logits": final, **captured}


# SCCAN's transformer output is recorded in its first channels only: all 256 at 64x64 are 4 MB per case.
SCCAN_CHANNELS = 8


def sccan_hooks(model: nn.Module, captured: dict[str, torch.Tensor], official: bool = False) -> list:
    """Hooks recording SCCAN's intermediates at feature size, under the same names on both sides: the prior
    (the last input channel of `init_merge_query`: the shots' mean soft-mask prior, (B, 1, 64, 64)), the
    transformer's query output (its first `SCCAN_CHANNELS` channels, before the ReLU) and `cls_meta`'s logits."""
    def transformer(m: nn.Module, i: tuple, o: torch.Tensor | tuple) -> None:
        captured["transformer"] = (o[0] if official else o)[:, :SCCAN_CHANNELS].clone()  # not a view: saved alone

    return [model.init_merge_query.register_forward_pre_hook(
                lambda m, i: captured.__setitem__("prior", i[0][:, -1:].clone())),
            model.transformer.register_forward_hook(transformer),
            model.cls_meta.register_forward_hook(lambda m, i, o: captured.__setitem__("meta_logits", o))]


def run_hsnet(model: nn.Module, x: torch.Tensor, s_x: torch.Tensor, s_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """HSNet: 1 shot, the forward's logits (B, 2, H, W); k shots, each shot's logits (B, S, 2, H, W), one
    official forward per shot, and `predict_mask_nshot`'s voted mask (B, H, W) as test.py computes it."""
    with torch.no_grad():
        if s_x.shape[1] == 1:
            return {"logits": model(x, s_x[:, 0], s_y[:, 0])}
        shot_logits = torch.stack([model(x, s_x[:, s], s_y[:, s]) for s in range(s_x.shape[1])], 1)
        batch = {"query_img": x, "support_imgs": s_x, "support_masks": s_y}
        return {"shot_logits": shot_logits, "vote": model.predict_mask_nshot(batch, nshot=s_x.shape[1]).float()}


def asnet_supports(s_x: torch.Tensor, s_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ASNet's supports as its 400x400 loader would give them: fssmeta's own resizing (`ASNet.resized_support`,
    bilinear / nearest to `support_size`) of the case's normalised images and 0/1/255 masks, the masks then
    `mask == 1` as float. The fixture stores the small supports; fssmeta resizes them itself."""
    from fssmeta.models.asnet import ASNet

    resizer = ASNet.__new__(ASNet)  # the resizing needs no weights: only `support_size`
    resizer.support_size = get_method("asnet").options_of(ModelConfig(**MODEL_CONFIG["asnet"])).support_size
    shots = [resizer.resized_support(s_x[:, s], s_y[:, s].long()) for s in range(s_x.shape[1])]
    return torch.stack([img for img, _ in shots], 1), torch.stack([(m == 1).float() for _, m in shots], 1)


def run_asnet(model: nn.Module, x: torch.Tensor, s_x: torch.Tensor, s_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """ASNet, one way. 1 shot: the forward's log-probs (B, 1, 2, h, w) and `predict_cls_and_mask`'s presence
    and merged logits upsampled to the query (eval: to `org_query_imsize`, here the query's size); k shots:
    each shot's forward (B, S, 1, 2, h, w) and `predict_mask_nshot`'s presence and mask, as test_step runs it."""
    batch = {"query_img": x, "org_query_imsize": [torch.tensor([x.shape[-1]]), torch.tensor([x.shape[-2]])]}
    with torch.no_grad():
        if s_x.shape[1] == 1:
            batch.update(support_imgs=s_x[:, None], support_masks=s_y[:, None])  # (B, way, shot, ...)
            log_probs = model(batch)
            presence, _, logits = model.predict_cls_and_mask(log_probs, batch)
            return {"log_probs": log_probs, "logits": logits, "presence": presence}
        shot_log_probs = []
        for s in range(s_x.shape[1]):
            batch.update(support_imgs=s_x[:, None, s], support_masks=s_y[:, None, s])  # (B, way, ...)
            shot_log_probs.append(model(batch))
        batch.update(support_imgs=s_x[:, None], support_masks=s_y[:, None])
        presence, pred_seg = model.predict_mask_nshot(batch, nshot=s_x.shape[1])
    return {"shot_log_probs": torch.stack(shot_log_probs, 1), "presence": presence.float(),
            "pred_seg": pred_seg.float()}


def official_losses(method: str, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """The official training-mode losses, named as fssmeta's loss dict: `ce` = main_loss, `aux` = PFENet's
    aux_loss (mean over its 4 heads) / BAM's aux_loss1 (meta head). BAM's aux_loss2 (the frozen base
    learner's own CE) carries no gradient and has no fssmeta counterpart."""
    x = normalise(inputs["query_img"])
    s_x = normalise(inputs["support_imgs"])
    s_y = inputs["support_masks"].float()
    y = inputs["query_mask"].float()
    if method == "hsnet":  # train.py: train_mode() (backbone BN fixed), 1-shot, compute_objective = CE
        with torch.no_grad():
            model.train_mode()
            loss = model.compute_objective(model(x, s_x[:, 0], (inputs["support_masks"][:, 0] == 1).float()), y)
            model.eval()
        return {"ce": float(loss)}
    if method == "asnet":  # training_step: train_mode() (backbone BN fixed), 1-shot, compute_seg_objective = NLL
        s_x, s_y = asnet_supports(s_x, inputs["support_masks"])
        batch = {"query_img": x, "support_imgs": s_x[:, None], "support_masks": s_y[:, None]}
        with torch.no_grad():
            model.train_mode()
            _, _, logits = model.predict_cls_and_mask(model(batch), batch)
            loss = model.compute_seg_objective(logits, y)
            model.eval()
        return {"nll": float(loss)}
    if method == "sccan":  # training mode, dropout off; its BN is FrozenBatchNorm2d; main_loss = weighted Dice
        with torch.no_grad():
            _, main_loss, _, _ = train_mode_(model)(x, s_x, s_y, y)
            model.eval()
        return {"dice": float(main_loss)}
    if method == "hdmnet":  # train.py: fix_bn (every BN, the transformer's SyncBatchNorm too); it returns
        # main_loss + aux_loss1 as one number and the distillation already divided by 3
        cat_idx = [torch.tensor([BASE_CLASSES.index(TRAIN_CLASS)])]
        with torch.no_grad():
            train_mode_(model, fix_bn=True)
            _, main_and_meta, distill, _ = model(x, y_m=y, y_b=y, s_x=s_x, s_y=s_y, cat_idx=cat_idx)
            model.eval()
        return {"ce+aux": float(main_and_meta), "distill": float(distill)}
    with torch.no_grad():
        train_mode_(model, fix_bn=method == "bam")  # PFENet's train.py never fixes BN; BAM's does
        if method == "pfenet":
            _, main_loss, aux_loss = model(x, s_x, s_y, y)
        else:
            cat_idx = [torch.tensor([BASE_CLASSES.index(TRAIN_CLASS)])]  # index among the base classes
            _, main_loss, aux_loss, _ = model(x, s_x, s_y, y, y, cat_idx=cat_idx)
        model.eval()
    return {"ce": float(main_loss), "aux": float(aux_loss)}


# ------------------------------------------------------------------------------------------------------- main

def record_case(method: str, case: Case, module: types.ModuleType, path: Path, scratch: Path) -> dict:
    feature = (case.size - 1) // 8 + 1
    config = MODEL_CONFIG[method]
    options = get_method(method).options_of(ModelConfig(**config))
    if method in ("pfenet", "ntrenet") and [b for b, _ in scaled_bins(options.pyramid_bins, (feature, feature))] != list(case.bins):
        raise ValueError(f"{case.name}: fssmeta's bins at {feature}x{feature} are not the official {case.bins}")
    model = fssmeta_model(config, case.shot)
    names, values = fingerprint(model)
    inputs = make_inputs(SEED + case.size + case.shot, case.size, case.shot)
    if method in HSNET_FAMILY:
        inputs = hsnet_inputs(inputs)
    official = official_model(method, module, path, case, model.state_dict(), scratch)
    outputs = run_official(method, official, inputs)
    entry = {"name": case.name, "shot": case.shot, "size": case.size, "feature_size": feature,
             "official_bins": list(case.bins) if method in ("pfenet", "ntrenet") else None,
             "fingerprint_names": names, "fingerprint": values, **inputs,
             "class_id": 1, "train_class_id": TRAIN_CLASS,  # eval: a novel class; losses: a base class
             "outputs": outputs}
    if method in (*HSNET_FAMILY, "hdmnet"):  # every output: hsnet's 5-shot case has no "logits"
        outputs_of = {"hsnet": hsnet_outputs, "asnet": asnet_outputs, "hdmnet": hdmnet_outputs}[method]
        ours = outputs_of(model, episode(inputs, 1))
        entry["max_abs_diff_at_recording"] = {k: float((ours[k] - v).abs().max()) for k, v in outputs.items()}
        print(f"{method} {case.name}: max |fssmeta - official| = {entry['max_abs_diff_at_recording']}"
              f" (|official| <= {[round(float(v.abs().max()), 3) for v in outputs.values()]})")
    else:
        with torch.no_grad():
            ours = model(episode(inputs, 1)).logits
        entry["max_abs_diff_at_recording"] = float((ours - outputs["logits"]).abs().max())
    if case.losses and method not in EVAL_ONLY:
        entry["losses"] = official_losses(method, official, inputs)
        mine = fssmeta_losses(model, method, episode(inputs, TRAIN_CLASS))
        entry["loss_diff_at_recording"] = {k: abs(mine[k] - v) for k, v in entry["losses"].items()}
    else:
        del entry["query_mask"]  # only the loss run reads it
    if method in (*HSNET_FAMILY, "hdmnet"):
        print(f"{method} {case.name}: losses {entry.get('losses')} diff {entry.get('loss_diff_at_recording')}")
    else:
        print(f"{method} {case.name}: max |fssmeta - official| = {entry['max_abs_diff_at_recording']:.3g}"
              f" (|official| <= {float(outputs['logits'].abs().max()):.3g})"
              + (f", losses {entry['losses']} diff {entry['loss_diff_at_recording']}" if "losses" in entry else ""))
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(OFFICIAL))
    parser.add_argument("--official", required=True, type=Path, help="checkout of the pinned official commit")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scratch", type=Path, help="working directory for the official run (default: a temp dir)")
    parser.add_argument("--torchvision", type=Path, help="hsnet, asnet: a directory holding the torchvision package "
                        f"{TORCHVISION[0]} (pip install --no-deps --target DIR torchvision=={TORCHVISION[0]}); "
                        "default: the installed torchvision")
    parser.add_argument("--timm", type=Path, help=f"sccan: a directory holding the timm package {TIMM} "
                        f"(pip install --no-deps --target DIR timm=={TIMM}); default: the installed one")
    parser.add_argument("--einops", type=Path, help="asnet: a directory holding the einops package "
                        f"{EINOPS} (pip install --no-deps --target DIR einops=={EINOPS}); default: the installed one")
    parser.add_argument("--mmcv", type=Path, help=f"hdmnet: a directory holding mmcv {MMCV['mmcv']} (the pure-Python "
                        "package of its source release: no compiled ops), mmseg "
                        f"{MMCV['mmseg']}, addict and yapf; default: the installed ones")
    args = parser.parse_args(argv)
    official_path = args.official.resolve()
    out = args.out.resolve()
    hashes = check_checkout(args.method, official_path)
    scratch = args.scratch.resolve() if args.scratch else Path(tempfile.mkdtemp(prefix="fssmeta-oracle-"))
    scratch.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    try:
        os.chdir(scratch)  # the official constructors read initmodel/... relative to the working directory
        run_path, patched = official_path, {}
        if args.method in PATCHES:
            run_path, patched = patched_copy(args.method, official_path, scratch)
        with cpu_only():
            torchvision = (torchvision_models(args.torchvision) if args.method in (*HSNET_FAMILY, "sccan", "hdmnet")
                           else None)
            einops = einops_package(args.einops) if args.method in ("asnet", "hdmnet") else None
            mm = mm_packages(args.mmcv) if args.method == "hdmnet" else None
            timm = timm_package(args.timm) if args.method == "sccan" else None
            if args.method == "sccan":  # the torchvision model code SCCAN runs: IntermediateLayerGetter
                from torchvision.models import _utils
                torchvision["models/_utils.py"] = hashlib.sha256(Path(_utils.__file__).read_bytes()).hexdigest()
            module = import_official(args.method, run_path)
            cases = [record_case(args.method, case, module, run_path, scratch) for case in CASES]
    finally:
        os.chdir(cwd)
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    pinned = OFFICIAL[args.method]
    fixture = {
        "format": FORMAT, "method": args.method, "seed": SEED, "base_classes": list(BASE_CLASSES),
        "model_config": MODEL_CONFIG[args.method],
        "model_config_resolved": ModelConfig(**MODEL_CONFIG[args.method]).model_dump(),  # for the record
        "official": {"repo": pinned.repo, "commit": pinned.commit, "files": hashes,
                     "patches": [{"file": rel, "old": old, "new": new, "reason": why}
                                 for rel, old, new, why in PATCHES.get(args.method, ())],
                     "patched_files": patched, **({"torchvision": torchvision} if torchvision else {}),
                     **({"einops": einops} if einops else {}), **({"timm": timm} if timm else {}),
                     **({"mmcv": mm} if mm else {})},
        "torch": str(torch.__version__), "normalise": {"mean": list(MEAN), "std": list(STD)},
        "generated_by": "tools/oracle.py", "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
