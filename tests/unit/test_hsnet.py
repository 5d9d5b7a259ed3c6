"""HSNet's parts on small hand-checkable cases: the center-pivot 4D convolution against a brute-force 4D
convolution, the clamped multilayer correlation, the k-shot vote (the official rule, the query encoded once),
its loss, its options and its learnable count; and `fssmeta train` / `evaluate` with `model.method: hsnet`.
(Its forward against the official one: tests/unit/test_oracle_parity.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fssmeta.checkpoint import read_checkpoint
from fssmeta.cli import main
from fssmeta.config import ModelConfig
from fssmeta.episode import Episode
from fssmeta.losses import cross_entropy
from fssmeta.models import build_model, count_learnable, get_method
from fssmeta.models.hsnet import (
    CenterPivotConv4d,
    multilayer_correlation,
    small_map_conv,
    stage_correlation,
    unit_features,
    vote,
)
from tests.cli_data import tiny_cli_data
from tests.unit.test_models import PASCAL_FOLD0_BASE, make_episode, make_model


def brute_force_conv4d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, support_stride: int) -> torch.Tensor:
    """A dense 4D convolution, (B, C, Hq, Wq, Hs, Ws) x (O, C, k, k, k, k) -> (B, O, Hq, Wq, hs, ws): zero
    padding k // 2 on every dim, stride 1 over the query dims and `support_stride` over the support dims."""
    k = weight.shape[-1]
    p = k // 2
    padded = F.pad(x, (p, p) * 4)
    B, _, Hq, Wq, Hs, Ws = x.shape
    hs, ws = math.ceil(Hs / support_stride), math.ceil(Ws / support_stride)
    out = torch.empty(B, weight.shape[0], Hq, Wq, hs, ws, dtype=x.dtype)
    for i in range(Hq):
        for j in range(Wq):
            for m in range(hs):
                for n in range(ws):
                    a, b = m * support_stride, n * support_stride
                    window = padded[:, :, i : i + k, j : j + k, a : a + k, b : b + k]  # (B, C, k, k, k, k)
                    out[:, :, i, j, m, n] = torch.einsum("bcijmn,ocijmn->bo", window, weight) + bias
    return out


@pytest.mark.parametrize(("kernel", "stride", "support"), [(3, 1, (6, 5)), (3, 2, (6, 5)), (5, 4, (6, 5)),
                                                         (3, 1, (2, 2)), (3, 1, (1, 2))])
def test_center_pivot_conv4d_is_a_4d_conv_on_its_two_pivot_planes(kernel: int, stride: int, support: tuple[int, int]):
    """Also on the mixing blocks' tiny support maps (2 x 2 and smaller), where the support-dims kernel runs as
    one matrix product (`small_map_conv`)."""
    torch.manual_seed(0)
    conv = CenterPivotConv4d(2, 3, kernel, stride).double()
    x = torch.randn(2, 2, 5, 4, *support, dtype=torch.float64)
    c = kernel // 2
    weight = torch.zeros(3, 2, *(kernel,) * 4, dtype=torch.float64)  # (O, C, kq, kq, ks, ks)
    weight[:, :, :, :, c, c] += conv.query_conv.weight.detach()  # over the query dims, at the support center
    weight[:, :, c, c, :, :] += conv.support_conv.weight.detach()  # over the support dims, at the query center
    bias = (conv.query_conv.bias + conv.support_conv.bias).detach()
    expected = brute_force_conv4d(x, weight, bias, stride)
    with torch.no_grad():
        out = conv(x)
    assert out.shape == expected.shape == (2, 3, 5, 4, math.ceil(support[0] / stride), math.ceil(support[1] / stride))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # and it is not the dense 4D conv: an off-pivot weight would change the output
    weight[:, :, 0, 0, c, c + 1] = 1.0  # off both pivot planes, inside every support map tested
    assert not torch.allclose(brute_force_conv4d(x, weight, bias, stride), out)


@pytest.mark.parametrize(("size", "kernel"), [((2, 2), 3), ((1, 1), 3), ((2, 1), 3), ((2, 2), 5)])
def test_small_map_conv_is_the_convolution_and_its_gradients(size: tuple[int, int], kernel: int):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 5, kernel, padding=kernel // 2).double()
    x = torch.randn(3, 4, *size, dtype=torch.float64, requires_grad=True)
    expected, out = conv(x), small_map_conv(x, conv)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    wrt = [x, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(expected, wrt, grad), torch.autograd.grad(out, wrt, grad), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_multilayer_correlation_is_the_clamped_cosine_stacked_per_stage():
    torch.manual_seed(0)
    stages = [2, 2, 3, 4, 4, 4]
    shapes = {2: (8, 6, 5, 4, 3), 3: (16, 3, 3, 2, 2), 4: (32, 2, 2, 1, 2)}  # C, Hq, Wq, Hs, Ws
    query = [torch.randn(2, shapes[k][0], *shapes[k][1:3]) for k in stages]
    support = [torch.randn(2, shapes[k][0], *shapes[k][3:5]) for k in stages]
    support[1][:, :, 0, 0] = 0.0  # a masked-out support position: cosine 0, not NaN
    corr4, corr3, corr2 = multilayer_correlation(unit_features(query), unit_features(support), stages)
    assert corr4.shape == (2, 3, 2, 2, 1, 2)
    assert corr3.shape == (2, 1, 3, 3, 2, 2)
    assert corr2.shape == (2, 2, 6, 5, 4, 3)
    for corr in (corr4, corr3, corr2):
        assert corr.min() == 0 and corr.max() <= 1 + 1e-6
        assert (corr == 0).float().mean() > 0.2  # negative cosines are clamped (about half of random pairs)
    assert torch.equal(corr2[:, 1, :, :, 0, 0], torch.zeros(2, 6, 5))
    # one entry by hand: layer 5 (the third of layer4), query (1, 0), support (0, 1) of episode 1
    q, s = query[5][1, :, 1, 0], support[5][1, :, 0, 1]
    expected = (q @ s / ((q.norm() + 1e-5) * (s.norm() + 1e-5))).clamp(min=0)
    torch.testing.assert_close(corr4[1, 2, 1, 0, 0, 1], expected)


def test_stage_correlation_skips_masked_support_positions_exactly():
    """Support positions zero in every layer of a stage (masked out) are left out of the product; the result
    equals the dense clamped product, per episode of a batch: all positions live, some masked, all masked."""
    torch.manual_seed(0)
    query = [torch.randn(3, 8, 5, 4) for _ in range(2)]
    support = [torch.randn(3, 8, 6, 5) for _ in range(2)]
    for s in support:
        s[1, :, :3] = 0.0  # episode 1: the top half masked in both layers
        s[2] = 0.0  # episode 2: no object
        s[0, :, 0, 0] = 0.0  # episode 0: one position masked (multiplied densely: most are live)
    support[0][0, :, 5, 4] = 0.0  # episode 0: zero in one layer only, still multiplied
    query, support = unit_features(query), unit_features(support)
    corr = stage_correlation(query, support)
    dense = torch.stack([torch.bmm(q.flatten(2).transpose(1, 2), s.flatten(2)).clamp(min=0)
                         for q, s in zip(query, support, strict=True)], 1).view(3, 2, 5, 4, 6, 5)
    torch.testing.assert_close(corr, dense, rtol=1e-6, atol=1e-7)
    assert corr.permute(0, 2, 3, 1, 4, 5).is_contiguous()  # stored as the support-dims kernel reads it
    assert torch.equal(corr[1, :, :, :, :3], torch.zeros(2, 5, 4, 3, 5)) and torch.equal(corr[2], torch.zeros_like(corr[2]))
    assert torch.equal(corr[0, :, :, :, 0, 0], torch.zeros(2, 5, 4))
    assert (corr[1, :, :, :, 3:] > 0).float().mean() > 0.3  # the unmasked half was computed
    # on a non-CPU device (here meta) the dense batched path runs: same shape, no host sync
    meta = stage_correlation([q.to("meta") for q in query], [s.to("meta") for s in support])
    assert meta.shape == corr.shape and meta.device.type == "meta"


def official_vote(shot_masks: torch.Tensor) -> torch.Tensor:
    """HSNet's predict_mask_nshot from (B, S, H, W) 0/1 masks: sum, divide by max(the image's maximum, 1),
    foreground at >= 0.5."""
    votes = shot_masks.sum(1).float()
    max_vote = votes.flatten(1).amax(1).clamp(min=1).view(-1, 1, 1)
    return (votes / max_vote >= 0.5).long()


def test_vote_is_the_official_rule_ties_included():
    masks = torch.zeros(3, 4, 1, 5, dtype=torch.long)  # (B, S, H, W)
    masks[0, :, 0, 0] = 1  # 4 votes: the maximum
    masks[0, :2, 0, 1] = 1  # 2 of a maximum of 4: exactly 0.5, foreground
    masks[0, :1, 0, 2] = 1  # 1 of 4: background
    masks[1, :3, 0, 0] = 1  # the maximum 3 ...
    masks[1, :1, 0, 1] = 1  # ... 1 / 3 < 0.5: background
    masks[1, :2, 0, 2] = 1  # 2 / 3: foreground
    # episode 2: no shot predicts anything (max vote clamped to 1: all background)
    shot_logits = torch.stack([1 - masks, masks], 2).float()  # (B, S, 2, H, W)
    voted = vote(shot_logits).argmax(1)
    assert voted.tolist() == [[[1, 1, 0, 0, 0]], [[1, 0, 1, 0, 0]], [[0, 0, 0, 0, 0]]]
    g = torch.Generator().manual_seed(0)
    for shots in (2, 3, 5):
        logits = torch.randn(4, shots, 2, 7, 7, generator=g)
        assert torch.equal(vote(logits).argmax(1), official_vote(logits.argmax(2)))


@pytest.mark.parametrize("masking", ["feature", "hybrid"])
def test_query_encoded_once_equals_the_official_per_shot_voting(masking: str, monkeypatch: pytest.MonkeyPatch):
    """The official k-shot loop: one full 1-shot forward per shot (the query re-encoded each time), argmax,
    votes. fssmeta encodes the query once; the per-shot logits and the vote are the same."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(method="hsnet", backbone="small", hsnet={"support_masking": masking}),
                        shot=5, base_classes=[]).eval()
    episode = make_episode(5, batch=2, seed=3)
    with torch.no_grad():  # a random learner predicts one class everywhere: centre its margins, so the vote counts
        margins = model.shot_logits(episode).diff(dim=2)
        model.decoder2[-1].bias[1] -= margins.median()
    passes = []
    real = model.backbone.bottleneck_features
    monkeypatch.setattr(model.backbone, "bottleneck_features", lambda x: passes.append(x.shape[0]) or real(x))
    with torch.no_grad():
        shot_logits = model.shot_logits(episode)
        voted = model(episode).logits.argmax(1)
    # the query once (B = 2), each shot's supports once (twice with hybrid masking), per forward
    assert len(passes) == 2 * (1 + 5 * (2 if masking == "hybrid" else 1))
    per_shot = []
    with torch.no_grad():
        for s in range(5):
            one = episode._replace(support_imgs=episode.support_imgs[:, s : s + 1],
                                   support_masks=episode.support_masks[:, s : s + 1])
            per_shot.append(model(one).logits)  # the official per-shot forward
    per_shot = torch.stack(per_shot, 1)
    torch.testing.assert_close(shot_logits, per_shot, rtol=0, atol=1e-6)
    expected = official_vote(per_shot.argmax(2))
    assert torch.equal(voted, expected)
    assert 0 < expected.float().mean() < 1  # a non-trivial mask


def test_kshot_loss_is_the_mean_of_the_shots_ce():
    model = make_model("hsnet", shot=3).train()
    episode = make_episode(3)
    torch.manual_seed(0)
    with torch.no_grad():
        loss = get_method("hsnet").loss(model, episode)
        shot_logits = model.shot_logits(episode)
    assert set(loss) == {"ce"}
    per_shot = torch.stack([cross_entropy(shot_logits[:, s], episode.query_mask) for s in range(3)])
    torch.testing.assert_close(loss["ce"], per_shot.mean())  # every shot has as many labelled pixels


def test_support_masking_is_honoured():
    episode = make_episode(1, seed=2)
    logits = {}
    for masking in ("feature", "input", "hybrid"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(method="hsnet", hsnet={"support_masking": masking}), shot=1,
                            base_classes=[]).eval()
        with torch.no_grad():
            logits[masking] = model(episode).logits
    assert not torch.allclose(logits["feature"], logits["input"])
    assert not torch.allclose(logits["feature"], logits["hybrid"])
    assert not torch.allclose(logits["input"], logits["hybrid"])
    with pytest.raises(ValueError, match="support_masking"):
        get_method("hsnet").options_of(ModelConfig(method="hsnet", hsnet={"support_masking": "both"}))


def test_learnable_count_and_record():
    record = get_method("hsnet")
    with torch.device("meta"):
        r50 = build_model(ModelConfig(method="hsnet", backbone="resnet50"), shot=1, base_classes=[])
    assert count_learnable(r50) == record.reference.count == 2_573_794  # the official R50 HSNet: 2.57M
    assert not any(p.requires_grad for p in r50.backbone.parameters())
    # the learner reads as many correlation channels per stage as the backbone has bottlenecks there
    assert [r50.squeeze4[0].query_conv.in_channels, r50.squeeze3[0].query_conv.in_channels,
            r50.squeeze2[0].query_conv.in_channels] == [3, 6, 4]
    assert_hsnet_family_recipe(record)
    assert record.training_shot(5) == 1


def assert_hsnet_family_recipe(record) -> None:
    """HSNet's official recipe, shared by ASNet: Adam 1e-3 constant, resized images, trained 1-shot; from stage 1
    only the encoder, and only at `model.backbone_source: stage1` (no ImageNet file)."""
    recipe = record.training_recipe(record.recipe)
    assert (recipe.optimizer, recipe.lr, recipe.power, recipe.weight_decay) == ("adam", 1e-3, 0.0, 0.0)
    assert record.transform == "resize" and not record.trains_each_shot and record.stage1.part == "backbone"


def test_a_frozen_backbone_with_its_bn_fixed_in_training():
    model = make_model("hsnet").train()
    assert not model.backbone.training and all(m.training for n, m in model.named_children() if n != "backbone")
    assert get_method("hsnet").stage1_for(ModelConfig(method="hsnet", weights="in.pth")) is None  # official


def test_the_stage1_encoder_as_the_frozen_backbone(tmp_path):
    """`model.backbone_source: stage1`: the fold's stage-1 PSPNet encoder (deep stem) loads into the HSNet
    family's backbone, which runs it at output stride 32 (no dilation), and the learner takes its features."""
    from fssmeta.models.pspnet import build_pspnet

    cfg = ModelConfig(method="hsnet", backbone="small", backbone_source="stage1")
    torch.manual_seed(0)
    pspnet = build_pspnet(cfg, 1 + len(PASCAL_FOLD0_BASE))
    for method in ("hsnet", "asnet"):
        model = build_model(cfg.model_copy(update={"method": method}), shot=1, base_classes=PASCAL_FOLD0_BASE)
        get_method(method).stage1_for(cfg).load(model, pspnet.state_dict())
        assert model.backbone.variant == "deep_stem"
        assert all(torch.equal(v, pspnet.state_dict()["backbone." + k]) for k, v in model.backbone.state_dict().items())
        with torch.no_grad():
            feats = model.backbone(torch.randn(1, 3, 65, 65))
        assert [feats[f"layer{i}"].shape[-1] for i in (2, 3, 4)] == [9, 5, 3]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny synthetic dataset with fold-0 lists and 1- and 5-shot episodes; no stage 1 anywhere."""
    root = tmp_path_factory.mktemp("hsnet")
    return root, tiny_cli_data(root, "hsnet", (1, 5))


def test_hsnet_trains_1shot_and_evaluates_at_1_and_5_shots(data):
    root, args = data
    assert main(["train", *args, "--shot", "5", "--set", "model.hsnet.support_masking=hybrid"]) == 0
    run = root / "runs" / "fold0" / "hsnet-1shot"
    assert (run / "best.pt").is_file() and not (root / "runs" / "fold0" / "base").exists()
    payload = read_checkpoint(run / "best.pt")
    assert payload["config"]["train"]["shot"] == 1
    assert payload["config"]["model"]["hsnet"] == {"support_masking": "hybrid"}
    assert all("betas" in group and group["lr"] == pytest.approx(1e-3) for group in payload["optimizer"]["param_groups"])
    history = json.loads((run / "history.json").read_text())["history"]
    assert set(history[0]) >= {"train_ce", "train_loss", "val_miou"} and "train_aux" not in history[0]

    assert main(["evaluate", *args, "--method", "hsnet", "--set", "model.hsnet.support_masking=hybrid"]) == 0
    result = json.loads((root / "results" / "fold0" / "hsnet.json").read_text())
    assert set(result["results"]["fold0"]) == {"1shot", "5shot"}
    assert result["protocol"]["trained_shots"] == "1 (evaluated at every shot)"
    for shot in ("1shot", "5shot"):
        assert 0.0 <= result["results"]["fold0"][shot]["miou_mean"] <= 1.0

    # `fssmeta predict` rebuilds it from the checkpoint alone (its stored config names the method and options)
    voc = root / "syn" / "VOC2012"
    mask = voc / "SegmentationClassAug" / "syn_000001.png"
    value = next(int(v) for v in np.unique(np.asarray(Image.open(mask))) if 0 < v < 255)
    support = f"--support={voc / 'JPEGImages' / 'syn_000001.jpg'}:{mask}"
    assert main(["predict", "--params", "none", "--quiet", "--model", str(run / "best.pt"), support,
                 "--mask-class", str(value), "--query", str(voc / "JPEGImages" / "syn_000002.jpg"),
                 "--out", str(root / "predicted")]) == 0
    predicted = json.loads((root / "predicted" / "predictions.json").read_text())
    assert predicted["method"] == "hsnet" and (root / "predicted" / "syn_000002_mask.png").is_file()


def test_episode_contract_shapes():
    model = make_model("hsnet", shot=2).eval()
    episode: Episode = make_episode(2, batch=1)
    with torch.no_grad():
        assert model.shot_logits(episode).shape == (1, 2, 2, 65, 65)
        assert model(episode).logits.shape == (1, 2, 65, 65)
