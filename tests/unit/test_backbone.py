"""Backbones (layouts, strides, keys, weights, freezing, support masking), shared ops and the PSPNet."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.config import ModelConfig
from fssmeta.episode import SegOutput
from fssmeta.models.backbone import (
    BackboneWeightsError,
    LoadReport,
    ResNet,
    build_backbone,
    freeze_,
    load_backbone_weights,
    masked_bottleneck_features,
    masked_features,
)
from fssmeta.models.ops import ASPP, PPM, gram_distance, gram_matrix, masked_average_pool, prior_mask
from fssmeta.models.pspnet import PSPNet, build_pspnet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These convolutions are tiny; with 2 OpenMP threads on a shared 2-core machine the threads' spin-waits
    made this file take 2 s to 45 s depending on the neighbours' load, with 1 thread a steady ~2 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def resnet50_tv() -> ResNet:
    torch.manual_seed(0)
    return build_backbone("resnet50", "torchvision").eval()


def small(variant: str = "deep_stem", seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return build_backbone("small", variant)


# --- layouts and strides ---------------------------------------------------------------------------------

def test_deep_stem_output_stride_8_with_dilated_layer3_and_layer4():
    model = small().eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 65, 65))
    assert list(feats) == ["layer0", "layer1", "layer2", "layer3", "layer4"]
    assert feats["layer0"].shape == (1, 32, 17, 17)  # three 3x3 convs (first stride 2) + max-pool
    for name in ("layer2", "layer3", "layer4"):
        assert feats[name].shape[-2:] == (9, 9)
    for name, dilation in (("layer3", 2), ("layer4", 4)):
        # semseg dilates every 3x3 conv of the stage, the first block's included, with no stride left.
        for block in getattr(model, name):
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.stride == (1, 1)
        assert getattr(model, name)[0].downsample[0].stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)


def test_torchvision_output_stride_32():
    model = small("torchvision").eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 65, 65))
    assert model.conv1.kernel_size == (7, 7)
    assert [feats[f"layer{i}"].shape[-1] for i in range(5)] == [17, 17, 9, 5, 3]


def test_undilated_deep_stem_reads_the_dilated_layers_on_a_coarser_grid():
    """`dilated=False` (the HSNet family's stage-1 encoder): the deep stem at torchvision's strides, with the
    same parameters. Every block after the first of a stage gives, on the coarser grid, the dilated block's
    output subsampled there (it reads the same image positions); the first block does not."""
    dilated = small().eval()
    torch.manual_seed(1)
    strided = build_backbone("small", "deep_stem", dilated=False).eval()
    strided.load_state_dict(dilated.state_dict())  # same keys and shapes
    assert strided.layer3[0].conv2.stride == (2, 2) and strided.layer3[0].downsample[0].stride == (2, 2)
    assert all(block.conv2.dilation == (1, 1) for stage in (strided.layer3, strided.layer4) for block in stage)
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        feats = strided(x)
        assert [feats[f"layer{i}"].shape[-1] for i in range(5)] == [25, 25, 13, 7, 4]
        # (stage, the stage before it, the coarse grid's step on the stride-8 grid)
        for name, before, step in (("layer3", "layer2", 2), ("layer4", "layer3", 4)):
            fine = getattr(dilated, name)[0](dilated(x)[before])  # the first block's output at stride 8
            later = getattr(dilated, name)[1](fine)[..., ::step, ::step]
            torch.testing.assert_close(getattr(strided, name)[1](fine[..., ::step, ::step]), later, rtol=0, atol=1e-5)
        first = dilated.layer3[0](feats["layer2"])[..., ::2, ::2]
        assert not torch.allclose(strided.layer3[0](feats["layer2"]), first, atol=1e-3)


def test_channels(resnet50_tv):
    expected = {"layer0": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert resnet50_tv.channels == expected
    with torch.device("meta"):
        assert build_backbone("resnet50", "deep_stem").channels["layer0"] == 128
    for variant, stem in (("deep_stem", 32), ("torchvision", 16)):
        model = small(variant).eval()
        assert model.channels == {"layer0": stem, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
        with torch.no_grad():
            feats = model(torch.randn(1, 3, 33, 33))
        assert {k: v.shape[1] for k, v in feats.items()} == model.channels
    assert [len(getattr(small(), f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]


def test_bottleneck_features_are_every_block_before_its_last_relu(resnet50_tv):
    model = resnet50_tv
    inputs, outputs = [], []
    blocks = [b for stage in (model.layer2, model.layer3, model.layer4) for b in stage]

    def record(module: nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
        inputs.append(args[0].clone())
        outputs.append(output.clone())

    hooks = [b.register_forward_hook(record) for b in blocks]
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():
            feats = model.bottleneck_features(x)  # calls `pre_relu`, so the forward hooks stay silent
            reference = model(x)  # records each block's input and (post-ReLU) output
    finally:
        for h in hooks:
            h.remove()
    assert len(feats) == 13 and model.bottleneck_ids == [2] * 4 + [3] * 6 + [4] * 3
    assert [f.shape[1] for f in feats] == [512] * 4 + [1024] * 6 + [2048] * 3
    assert reference["layer4"].shape == feats[-1].shape
    with torch.no_grad():
        for k, (block, x, feat) in enumerate(zip(blocks, inputs, feats)):
            out = F.relu(block.bn1(block.conv1(x)))
            out = F.relu(block.bn2(block.conv2(out)))
            identity = block.downsample(x) if block.downsample is not None else x
            torch.testing.assert_close(feat, block.bn3(block.conv3(out)) + identity, msg=f"block {k}")
            torch.testing.assert_close(F.relu(feat), outputs[k])
    assert any((f < 0).any() for f in feats)  # pre-ReLU: a post-ReLU tensor could not be negative


# --- state-dict keys ---------------------------------------------------------------------------------------

def torchvision_keys(blocks: tuple[int, ...]) -> set[str]:
    """torchvision's resnet key layout, written out by hand (minus fc)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", *(f"bn1.{s}" for s in bn)}
    for i, n in enumerate(blocks, start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            for c in (1, 2, 3):
                keys |= {f"{p}.conv{c}.weight", *(f"{p}.bn{c}.{s}" for s in bn)}
            if j == 0:
                keys |= {f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{s}" for s in bn)}
    return keys


def test_torchvision_state_dict_keys(resnet50_tv):
    keys = list(resnet50_tv.state_dict())
    assert set(keys) == torchvision_keys((3, 4, 6, 3))
    assert len(keys) == 318  # torchvision's resnet50 has 320: these plus fc.weight, fc.bias
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight"):
        assert key in keys
    assert not any(k.startswith(("fc.", "layer0.")) for k in keys)


def test_deep_stem_keys_are_the_pspnet_release_names_without_layer0_duplicates():
    with torch.device("meta"):
        model = build_backbone("resnet50", "deep_stem")
    keys = list(model.state_dict())
    assert keys[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert {"conv2.weight", "bn2.weight", "conv3.weight", "bn3.weight", "bn3.running_var"} <= set(keys)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    stem = {"conv1.weight", "conv2.weight", "conv3.weight", *(f"bn{i}.{s}" for i in (1, 2, 3) for s in bn)}
    assert set(keys) == torchvision_keys((3, 4, 6, 3)) | stem
    assert not any(k.startswith("layer0") for k in keys)
    # layer0 is a view over the same modules: no tensor is stored twice, and training it trains conv1.
    state = small().state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)
    model = small()
    assert model.layer0[0] is model.conv1 and model.layer0[6] is model.conv3
    assert {id(p) for p in model.layer0.parameters()} <= {id(p) for p in model.parameters()}
    model.double()
    assert model.layer0[0].weight.dtype == torch.float64


# --- weight loading ---------------------------------------------------------------------------------------

@pytest.fixture
def trained_small(tmp_path: Path) -> tuple[ResNet, dict[str, torch.Tensor]]:
    model = small(seed=1)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 33, 33))  # move the BN running statistics off their init values
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}


def outputs_equal(a: ResNet, b: ResNet) -> bool:
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.equal(a.eval()(x)["layer4"], b.eval()(x)["layer4"])


def test_weights_round_trip(tmp_path, trained_small):
    source, state = trained_small
    path = tmp_path / "small.pth"
    torch.save(state, path)
    fresh = small(seed=2)
    assert not outputs_equal(source, fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_backbone_weights(fresh, path)
    assert report == LoadReport([], []) and outputs_equal(source, fresh)
    assert outputs_equal(source, build_backbone("small", "deep_stem", weights=str(path)))


def test_weights_wrapped_with_module_prefix_and_fc(tmp_path, trained_small):
    source, state = trained_small
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped |= {"module.fc.weight": torch.zeros(1000, 512), "module.fc.bias": torch.zeros(1000)}
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": wrapped, "epoch": torch.tensor(3)}, path)
    fresh = small(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_backbone_weights(fresh, path) == LoadReport([], [])
    assert outputs_equal(source, fresh)
    # Releases older than BN's `num_batches_tracked` (torchvision 2017, PSPNet resnet50_v2) load silently.
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_backbone_weights(small(seed=2), path) == LoadReport([], [])


def test_renamed_key_is_reported_and_warned(tmp_path, trained_small):
    _, state = trained_small
    state["layer1.0.convA.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="renamed.pth") as record:
        report = load_backbone_weights(small(seed=2), path)
    assert report.missing == ["layer1.0.conv1.weight"] and report.unexpected == ["layer1.0.convA.weight"]
    assert "layer1.0.convA.weight" in str(record[0].message)


def test_unusable_files_raise_naming_the_file(tmp_path, trained_small):
    _, state = trained_small
    cases = {}
    bad_shape = dict(state, **{"layer2.0.conv1.weight": torch.zeros(32, 64, 3, 3)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    cases["shape.pth"] = ["layer2.0.conv1.weight", "(32, 64, 3, 3)", "(32, 64, 1, 1)"]
    (tmp_path / "corrupt.pth").write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    cases["corrupt.pth"] = ["cannot read"]
    cases["absent.pth"] = ["not found"]
    torch.save({"encoder.weight": torch.zeros(3), "head.bias": torch.zeros(2)}, tmp_path / "other.pth")
    cases["other.pth"] = ["encoder.weight", "conv1.weight"]  # the file's keys and the expected ones
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["list.pth"] = ["not a state dict"]
    for name, fragments in cases.items():
        with pytest.raises(BackboneWeightsError) as info:
            load_backbone_weights(small(), tmp_path / name)
        for text in [name, *fragments]:
            assert text in str(info.value), (name, str(info.value))
        assert isinstance(info.value, ValueError)


# --- parameter counts -------------------------------------------------------------------------------------

def bottleneck_stack_params(stem_dim: int, width: int, blocks: tuple[int, ...]) -> int:
    """layer1..4 by hand: a block is 1x1 (in*w) + 3x3 (9w^2) + 1x1 (w*4w) + three BN (2w + 2w + 8w
    weights and biases), plus a 1x1 (in*4w) + BN (8w) downsample on each stage's first block."""
    total, in_dim = 0, stem_dim
    for i, n in enumerate(blocks):
        w = width * 2**i
        for j in range(n):
            total += in_dim * w + 9 * w * w + 4 * w * w + 12 * w
            if j == 0:
                total += in_dim * 4 * w + 8 * w
            in_dim = 4 * w
    return total


def test_parameter_counts():
    with torch.device("meta"):
        tv50, ds50 = build_backbone("resnet50", "torchvision"), build_backbone("resnet50", "deep_stem")
        tv101 = build_backbone("resnet101", "torchvision")
    # torchvision: resnet50 25,557,032 and resnet101 44,549,160 including the 2048x1000 + 1000 fc.
    assert n_params(tv50) == 25_557_032 - 2_049_000 == 23_508_032
    assert n_params(tv101) == 44_549_160 - 2_049_000
    assert n_params(tv50) == 3 * 64 * 49 + 2 * 64 + bottleneck_stack_params(64, 64, (3, 4, 6, 3))
    # Deep stem: 3x3 3->64 (1,728) + BN (128) + 3x3 64->64 (36,864) + BN (128) + 3x3 64->128 (73,728)
    # + BN (256) = 112,832; the stages take 128 channels in, so layer1.0.conv1 and its downsample grow
    # by 4,096 + 16,384:
    # 23,508,032 - 9,536 (7x7 stem + BN) + 112,832 + 20,480 = 23,631,808.
    stem = 3 * 64 * 9 + 128 + 64 * 64 * 9 + 128 + 64 * 128 * 9 + 256
    assert n_params(ds50) == stem + bottleneck_stack_params(128, 64, (3, 4, 6, 3)) == 23_631_808


# --- freezing ---------------------------------------------------------------------------------------------

class FrozenBackboneModel(nn.Module):
    """The pattern every method with a frozen backbone follows."""

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        self.backbone = freeze_(backbone)
        self.head = nn.Conv2d(backbone.channels["layer4"], 2, 1)

    def train(self, mode: bool = True) -> FrozenBackboneModel:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)["layer4"])


def test_freeze_keeps_bn_statistics_fixed():
    model = FrozenBackboneModel(small()).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not model.backbone.training and not model.backbone.layer1[0].bn1.training and model.head.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.randn(2, 3, 33, 33) * 5 + 3).sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None


# --- support masking --------------------------------------------------------------------------------------

def support_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    img = torch.randn(2, 3, 33, 33)
    mask = torch.zeros(2, 33, 33, dtype=torch.long)
    mask[:, 4:20, 6:24] = 1
    mask[:, 4, 6:24] = 255  # ignored pixels count as background
    mask[1, :, 25:] = 255
    return img, mask


def test_masked_features_feature_input_hybrid():
    model = small().eval()
    img, mask = support_batch()
    layers = ["layer2", "layer4"]
    with torch.no_grad():
        plain = model(img)
        fm = masked_features(model, img, mask, "feature", layers)
        im = masked_features(model, img, mask, "input", layers)
        hm = masked_features(model, img, mask, "hybrid", layers)
        reference_im = model(img * (mask == 1).float()[:, None])
    fg = (mask == 1).float()[:, None]
    for name in layers:
        resized = F.interpolate(fg, size=plain[name].shape[-2:], mode="bilinear", align_corners=True)
        assert (resized == 0).any() and (resized > 0).any()
        torch.testing.assert_close(fm[name], plain[name] * resized)
        assert (fm[name] * (resized == 0)).abs().sum() == 0  # zero wherever the mask is 0
        torch.testing.assert_close(im[name], reference_im[name])
        torch.testing.assert_close(hm[name], torch.where(fm[name] > 0, fm[name], im[name]))
        assert not torch.equal(hm[name], fm[name]) and not torch.equal(hm[name], im[name])
    with pytest.raises(ValueError, match="support masking"):
        masked_features(model, img, mask, "both", layers)  # type: ignore[arg-type]


def test_masked_bottleneck_features():
    model = small("torchvision").eval()
    img, mask = support_batch()
    with torch.no_grad():
        feats = masked_bottleneck_features(model, img, mask, "hybrid")
        plain = model.bottleneck_features(img)
    assert [f.shape for f in feats] == [f.shape for f in plain] and len(feats) == 6


# --- ops --------------------------------------------------------------------------------------------------

def test_masked_average_pool_hand_case():
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # (1, 2, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # left column
    expected = torch.tensor([[4.0, 40.0]]) / (2 + 5e-4)
    torch.testing.assert_close(masked_average_pool(feat, mask), expected)
    # A 3x3 mask resized (bilinear, align_corners) to 2x2 samples its corners: the same left column.
    big = torch.tensor([[[1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]])
    torch.testing.assert_close(masked_average_pool(feat, big), expected)
    assert masked_average_pool(feat, torch.zeros(1, 2, 2)).abs().max() == 0


def test_prior_mask():
    g = torch.Generator().manual_seed(0)
    query = torch.rand(2, 8, 5, 5, generator=g)
    support = torch.rand(2, 8, 5, 5, generator=g)
    mask = torch.zeros(2, 5, 5)
    mask[:, 1:3, 1:3] = 1
    query[:, :, 2, 3] = support[:, :, 1, 1] * 3  # same direction as a masked support pixel
    prior = prior_mask(query, support, mask)
    assert prior.shape == (2, 1, 5, 5)
    assert prior.min() >= 0 and prior.max() <= 1
    for b in range(2):
        assert prior[b].max() == pytest.approx(1, abs=1e-5) and prior[b].min() == pytest.approx(0, abs=1e-6)
        assert prior[b, 0, 2, 3] == pytest.approx(1, abs=1e-5)
    # A support pixel outside the mask does not count: copying it gives no perfect match.
    query[:, :, 2, 3] = support[:, :, 4, 4]
    assert prior_mask(query, support, mask)[:, 0, 2, 3].max() < 1


def test_prior_mask_equals_the_official_all_pixel_form():
    """The masked-pixels-only product gives PFENet's all-pixel prior (zeroed pixels score 0 in the max), also
    for signed features (where that 0 can win), an empty mask, a full one, and the soft edge of a resized one."""
    def official(query, support, mask):  # PFENet's formula over every support pixel
        m = F.interpolate(mask[:, None], size=support.shape[-2:], mode="bilinear", align_corners=True)
        s = (support * m).flatten(2).transpose(1, 2)
        q = query.flatten(2)
        sim = torch.bmm(s, q) / (torch.bmm(s.norm(dim=2, keepdim=True), q.norm(dim=1, keepdim=True)) + 1e-7)
        sim = sim.max(1).values
        low, high = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
        return ((sim - low) / (high - low + 1e-7)).view(query.shape[0], 1, *query.shape[-2:])

    g = torch.Generator().manual_seed(1)
    query, support = torch.randn(4, 16, 6, 6, generator=g), torch.randn(4, 16, 6, 6, generator=g)
    mask = (torch.rand(4, 11, 11, generator=g) > 0.6).float()
    mask[1] = 0  # no object: a prior of zeros
    mask[2] = 1  # all object: nothing left out
    mask[3] = 0
    mask[3, 0, 0] = 1  # one corner pixel: after resizing, one support pixel, so the left-out 0s win often
    torch.testing.assert_close(prior_mask(query, support, mask), official(query, support, mask), atol=1e-6, rtol=0)
    assert prior_mask(query, support, mask)[1].abs().max() == 0


def test_gram_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 6, 7, 7, generator=g)
    b = torch.rand(2, 6, 7, 7, generator=g) ** 4
    gram = gram_matrix(a)
    assert gram.shape == (2, 6, 6)
    torch.testing.assert_close(torch.diagonal(gram, dim1=1, dim2=2), torch.ones(2, 6))
    assert torch.equal(gram_distance(a, a), torch.zeros(2, 1))
    psi = gram_distance(a, b)
    assert psi.shape == (2, 1) and (psi > 0).all() and (psi <= 1).all()
    expected = (gram_matrix(a) - gram_matrix(b)).pow(2).sum((1, 2)).sqrt() / torch.ones(6, 6).norm()
    torch.testing.assert_close(psi[:, 0], expected)


def test_aspp_and_ppm():
    x = torch.randn(2, 32, 9, 9)
    aspp = ASPP(32, 16, (2, 4, 6))
    assert aspp(x).shape == (2, 80, 9, 9) == (2, aspp.out_channels, 9, 9)
    ppm = PPM(32, 8, (1, 2, 3, 6))
    assert ppm(x).shape == (2, 64, 9, 9) and ppm.out_channels == 64
    with torch.device("meta"):
        # BAM's ASPP_meta at 256: two 1x1 (65,536 + 256 each) and three 3x3 (589,824 + 256 each).
        assert n_params(ASPP(256, 256)) == 2 * 65_792 + 3 * 590_080 == 1_901_824


# --- PSPNet -----------------------------------------------------------------------------------------------

def test_pspnet_without_aux_head_by_default():
    """BAM's stage-1 PSPNet has no layer3 head (`model.pspnet.aux_head` false, the default)."""
    model = build_pspnet(ModelConfig(backbone="small"), num_classes=16)
    assert model.aux is None and not any(k.startswith("aux.") for k in model.state_dict())
    assert model.train()(torch.randn(2, 3, 65, 65)).aux_logits == []


def test_pspnet_shapes_and_gradients():
    torch.manual_seed(0)
    model = build_pspnet(ModelConfig(backbone="small", pspnet={"aux_head": True}), num_classes=16)
    assert isinstance(model, PSPNet) and model.num_classes == 16
    image = torch.randn(2, 3, 65, 65)  # batch 2: the 1x1 pyramid bin's BN needs > 1 value in training
    out = model.train()(image)
    assert isinstance(out, SegOutput) and out.extra_losses == {}
    assert out.logits.shape == (2, 16, 65, 65)
    assert [a.shape for a in out.aux_logits] == [(2, 16, 65, 65)]
    (out.logits.mean() + out.aux_logits[0].mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        out = model(image[:1])
        layer4 = model.backbone(image[:1])["layer4"]
        assert out.logits.shape == (1, 16, 65, 65) and out.aux_logits == []
        assert model.classify(layer4).shape == (1, 16, 9, 9)
        assert model.head_features(layer4).shape == (1, 128, 9, 9)  # small: ppm_dim 512 * 512 / 2048


def test_pspnet_resnet50_parameter_count():
    with torch.device("meta"):
        model = build_pspnet(ModelConfig(backbone="resnet50", pspnet={"aux_head": True}), num_classes=16)
    ppm = 4 * (2048 * 512 + 2 * 512)
    cls = 4096 * 512 * 9 + 2 * 512 + 512 * 16 + 16
    aux = 1024 * 256 * 9 + 2 * 256 + 256 * 16 + 16
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert learnable == 23_631_808 + ppm + cls + aux == 49_077_728
    print(f"PSPNet ResNet-50, 16 classes: {learnable:,} learnable parameters")
