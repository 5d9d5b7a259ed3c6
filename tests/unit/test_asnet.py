"""ASNet's parts on small hand-checkable cases: the attentive squeeze layer against a brute-force one, the
masked attention (masked keys ignored, a key-less row uniform), the per-stage shapes at the ResNet-50 400
layout, the FS-CS merge and presence rule, the k-shot rule with the query encoded once, its options, its loss
and its learnable count; and `fssmeta train` / `evaluate` with `model.method: asnet`.
(Its forward against the official one: tests/unit/test_oracle_parity.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fssmeta.cli import main
from fssmeta.config import ModelConfig
from fssmeta.episode import Episode
from fssmeta.models import build_model, count_learnable, get_method
from fssmeta.models.asnet import HEADS, AttentiveSqueeze, attend, class_presence, merge_ways
from tests.cli_data import tiny_cli_data
from tests.unit.test_hsnet import assert_hsnet_family_recipe
from tests.unit.test_models import make_episode, make_model


def brute_force_squeeze(layer: AttentiveSqueeze, corr: torch.Tensor, fg: torch.Tensor | None) -> torch.Tensor:
    """The attentive squeeze layer written out: per query position a 2D conv over its support map, per head
    a softmax over the (unmasked) support keys of q . k, then the norms and the FFN on the whole tensor."""
    B, C, Hq, Wq, Hs, Ws = corr.shape
    maps = corr.reshape(B, C, Hq * Wq, Hs, Ws)

    def conv(module: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:  # (B, C, Hs, Ws) -> (B, C', h, w)
        return F.conv2d(x, module.weight[:, :, 0], module.bias, stride=module.stride[1:], padding=module.padding[1:])

    outs, shortcuts = [], []
    for t in range(Hq * Wq):
        x = maps[:, :, t]
        q, k, v = conv(layer.query_embed, x), conv(layer.key_embed, x), conv(layer.value_embed, x)
        hs, ws = q.shape[-2:]
        keep = torch.ones(B, k.shape[-2] * k.shape[-1], dtype=torch.bool)
        if fg is not None:  # the key grid's foreground: bilinear, align_corners, as official
            keep = F.interpolate(fg[:, None], size=k.shape[-2:], mode="bilinear", align_corners=True).flatten(1) != 0
        head_outs = []
        for h in range(HEADS):
            d = q.shape[1] // HEADS
            qh, kh, vh = (z[:, h * d : (h + 1) * d].flatten(2) for z in (q, k, v))  # (B, d, positions)
            logits = torch.einsum("bdl,bdm->blm", qh, kh)
            logits = torch.where(keep[:, None], logits, torch.full_like(logits, -1e9))
            head_outs.append(torch.einsum("blm,bdm->bdl", logits.softmax(-1), vh))
        outs.append(torch.cat(head_outs, 1).view(B, -1, hs, ws))
        if isinstance(layer.shortcut, torch.nn.Identity):
            shortcuts.append(x)
        else:
            s = conv(layer.shortcut[0], x)
            shortcuts.append(s)
    out = torch.stack(outs, 2)  # (B, D, T, hs, ws)
    shortcut = torch.stack(shortcuts, 2)
    if not isinstance(layer.shortcut, torch.nn.Identity):
        shortcut = F.relu(layer.shortcut[1](shortcut))
    out = layer.attn_norm(layer.aggregate(out) + shortcut)
    out = layer.ffn_norm(layer.ffn(out) + out)
    return out.view(B, -1, Hq, Wq, *out.shape[-2:])


@pytest.mark.parametrize(("channels", "kernel", "stride", "pool_kv"),
                         [((3, 32), 5, 4, False), ((4, 32), 5, 4, True), ((32, 32), 1, 1, False), ((16, 32), 2, 1, False)])
def test_attentive_squeeze_is_the_brute_force_layer(channels: tuple[int, int], kernel: int, stride: int, pool_kv: bool):
    torch.manual_seed(0)
    layer = AttentiveSqueeze(*channels, kernel, stride, pool_kv).double()
    for module in layer.modules():  # GroupNorm affine off its constant init, so a mix-up would show
        if isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, std=0.1)
    corr = torch.rand(2, channels[0], 3, 2, 7, 6, dtype=torch.float64)
    fg = torch.zeros(2, 40, 40, dtype=torch.float64)
    fg[0, 5:30, 8:35] = 1
    fg[1, 20:, :] = 1
    assert isinstance(layer.shortcut, torch.nn.Identity) == (kernel == 1)  # the official identity rule
    for mask in (fg, None):
        with torch.no_grad():
            out, expected = layer(corr, mask), brute_force_squeeze(layer, corr, mask)
        hs = math.floor((7 + 2 * (kernel // 2 if kernel > 2 else 0) - kernel) / stride) + 1
        assert out.shape[:5] == (2, 32, 3, 2, hs)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        assert not torch.allclose(layer(corr, fg), layer(corr, None))  # the mask matters here


def test_masked_attention_ignores_masked_out_support_positions():
    torch.manual_seed(0)
    B, D, T = 2, 16, 3
    query = torch.randn(B, D, T, 2, 2, dtype=torch.float64)
    key, value = torch.randn(2, B, D, T, 5, 5, dtype=torch.float64)
    fg = torch.zeros(B, 5, 5, dtype=torch.float64)  # at the key grid's own size: resizing is the identity
    fg[0, 1:4, 0:2] = 1
    fg[1, 4, 4] = 1
    out = attend(query, key, value, fg)
    masked = (fg == 0)[:, None, None].expand_as(key)  # (B, D, T, 5, 5)
    noise = torch.randn_like(key)
    # changing keys and values at masked-out positions changes nothing ...
    torch.testing.assert_close(attend(query, key + noise * masked, value + 10 * noise * masked, fg), out,
                               rtol=0, atol=1e-12)
    # ... at a kept one it does
    assert not torch.allclose(attend(query, key, value + noise * ~masked, fg), out)
    # episode 1 keeps one key: every query position returns its value
    torch.testing.assert_close(out[1], value[1, :, :, 4, 4, None, None].expand(D, T, 2, 2))
    # no key kept (the official -1e9, not -inf): a uniform softmax, the mean of the values, no NaN
    empty = attend(query, key, value, torch.zeros_like(fg))
    torch.testing.assert_close(empty, value.mean((-2, -1), keepdim=True).expand_as(empty))
    # every key kept = no mask
    torch.testing.assert_close(attend(query, key, value, torch.ones_like(fg)), attend(query, key, value, None))


def test_stage_shapes_at_the_resnet50_400_layout():
    """Shape inference on the meta device: at 400 px the supports' layer2 (50x50) is pooled to 25x25, every
    stage squeezes its support dims to 2x2 (layer4's then averaged), the mixing blocks to 1x1."""
    with torch.device("meta"):
        model = build_model(ModelConfig(method="asnet", backbone="resnet50"), shot=1, base_classes=[]).eval()
        episode = Episode(torch.zeros(2, 1, 3, 400, 400), torch.ones(2, 1, 400, 400, dtype=torch.long),
                          torch.zeros(2, 3, 400, 400), torch.zeros(2, 400, 400, dtype=torch.long), torch.tensor([1, 2]))
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        return lambda module, args, out: shapes.__setitem__(name, tuple(out.shape))

    for name in ("squeeze4", "squeeze3", "squeeze2", "mix43", "mix32"):
        getattr(model, name)[-1].register_forward_hook(hook(name))
    model.decoder2.register_forward_hook(hook("decoder2"))
    with torch.no_grad():
        log_probs = model.shot_log_probs(episode)
        logits = model(episode).logits
    assert shapes == {"squeeze4": (2, 128, 13, 13, 2, 2), "squeeze3": (2, 128, 25, 25, 2, 2),
                      "squeeze2": (2, 128, 50, 50, 2, 2), "mix43": (2, 128, 25, 25, 1, 1),
                      "mix32": (2, 128, 50, 50, 1, 1), "decoder2": (2, 2, 100, 100)}
    assert log_probs.shape == (2, 1, 2, 100, 100) and logits.shape == (2, 2, 400, 400)


def test_merge_ways_on_a_hand_case():
    p = torch.tensor([[[0.9, 0.1], [0.3, 0.7]],  # way 1: (bg, fg) probabilities at pixel 0, pixel 1
                      [[0.6, 0.4], [0.8, 0.2]]])  # way 2
    log_probs = p.log().permute(0, 2, 1)[None, :, :, None]  # (B=1, N=2, 2, H=1, W=2)
    merged = merge_ways(log_probs)
    assert merged.shape == (1, 3, 1, 2)
    expected = torch.tensor([[(math.log(0.9) + math.log(0.6)) / 2, (math.log(0.3) + math.log(0.8)) / 2],
                             [math.log(0.1), math.log(0.7)], [math.log(0.4), math.log(0.2)]])
    torch.testing.assert_close(merged[0, :, 0], expected)
    # pixel 0: background (exp of the mean bg log-prob 0.73 beats 0.1 and 0.4); pixel 1: way 1 (0.7 beats 0.49)
    assert merged.argmax(1).tolist() == [[[0, 1]]]
    one_way = log_probs[:, :1]
    assert torch.equal(merge_ways(one_way), one_way[:, 0])  # one way: its own two maps


def test_class_presence_on_hand_cases():
    def shots(*maxima: float) -> torch.Tensor:  # (B=1, S, N=1, 2, 1, 2): each shot's largest fg probability
        fg = torch.tensor([[m, 0.1] for m in maxima])
        return torch.stack([1 - fg, fg], 1).log()[None, :, None, :, None, :]

    assert class_presence(shots(0.5)).tolist() == [[True]]  # >= 0.5, as official
    assert class_presence(shots(0.49)).tolist() == [[False]]
    assert class_presence(shots(0.9, 0.2)).tolist() == [[True]]  # half the shots: mean 0.5 >= 0.5
    assert class_presence(shots(0.9, 0.2, 0.3)).tolist() == [[False]]  # 1 of 3
    assert class_presence(shots(0.6, 0.7, 0.1, 0.2, 0.3)).tolist() == [[False]]  # 2 of 5
    two_ways = torch.cat([shots(0.9, 0.8), shots(0.1, 0.6)], 2)  # (1, 2 shots, 2 ways, ...)
    assert class_presence(two_ways).tolist() == [[True, True]]
    assert class_presence(torch.cat([shots(0.9, 0.8), shots(0.1, 0.2)], 2)).tolist() == [[True, False]]


def test_query_encoded_once_equals_the_official_per_shot_loop(monkeypatch: pytest.MonkeyPatch):
    """The official `predict_mask_nshot`: one 1-shot forward per shot (the query re-encoded each time), the
    merged maps upsampled and averaged. fssmeta encodes the query once; the maps are the same."""
    model = make_model("asnet", shot=3).eval()
    episode = make_episode(3, batch=2, seed=3)
    passes = []
    real = model.backbone.bottleneck_features
    monkeypatch.setattr(model.backbone, "bottleneck_features", lambda x: passes.append(x.shape[-1]) or real(x))
    with torch.no_grad():
        shot_log_probs = model.shot_log_probs(episode)
        logits = model(episode).logits
    # the query once at 65 px, each 400-px support twice (hybrid masking: feature and input passes)
    assert passes == [65] + [400] * 6 + [65] + [400] * 6
    per_shot = []
    with torch.no_grad():
        for s in range(3):
            one = episode._replace(support_imgs=episode.support_imgs[:, s : s + 1],
                                   support_masks=episode.support_masks[:, s : s + 1])
            per_shot.append(model(one).logits)
    torch.testing.assert_close(logits, torch.stack(per_shot).mean(0), rtol=0, atol=1e-6)
    assert shot_log_probs.shape == (2, 3, 2, 18, 18)  # twice the query's 9x9 layer2
    torch.testing.assert_close(shot_log_probs.exp().sum(2), torch.ones(2, 3, 18, 18))


def test_loss_is_the_nll_of_the_upsampled_log_probs():
    model = make_model("asnet", shot=2).train()
    episode = make_episode(2)
    with torch.no_grad():
        loss = get_method("asnet").loss(model, episode)
        shot_log_probs = model.shot_log_probs(episode)
    assert set(loss) == {"nll"}
    per_shot = [F.nll_loss(F.interpolate(shot_log_probs[:, s], size=(65, 65), mode="bilinear", align_corners=True),
                           episode.query_mask, ignore_index=255) for s in range(2)]
    torch.testing.assert_close(loss["nll"], torch.stack(per_shot).mean())


def test_support_masking_and_the_attention_mask_are_honoured():
    episode = make_episode(1, seed=2)
    moved = episode._replace(support_masks=make_episode(1, seed=5).support_masks)
    logits = {}
    for masking in ("none", "feature", "input", "hybrid"):
        for attention in (True, False):
            torch.manual_seed(0)
            model = build_model(ModelConfig(method="asnet", backbone="small",
                                            asnet={"support_masking": masking, "mask_attention": attention}),
                                shot=1, base_classes=[]).eval()
            with torch.no_grad():
                logits[masking, attention] = model(episode).logits
                if masking == "none" and not attention:  # the official --weak model: the mask is never read
                    assert torch.equal(model(moved).logits, logits[masking, attention])
    values = list(logits.values())
    assert all(not torch.allclose(a, b) for i, a in enumerate(values) for b in values[i + 1 :])
    record = get_method("asnet")
    for bad in ({"support_masking": "both"}, {"support_size": 392}, {"support_size": 513}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            record.options_of(ModelConfig(method="asnet", asnet=bad))


def test_supports_are_resized_to_the_support_size():
    model = make_model("asnet")
    img, mask = torch.randn(2, 3, 161, 161), torch.zeros(2, 161, 161, dtype=torch.long)
    mask[:, 40:120, 50:100] = 1
    mask[:, 40, 50:100] = 255
    big_img, big_mask = model.resized_support(img, mask)
    assert big_img.shape == (2, 3, 400, 400) and big_mask.shape == (2, 400, 400) and big_mask.dtype == torch.long
    assert set(big_mask.unique().tolist()) == {0, 1, 255}  # nearest: labels stay labels
    assert abs(float((big_mask == 1).float().mean()) - float((mask == 1).float().mean())) < 0.01
    img400 = torch.randn(1, 3, 400, 400)
    assert model.resized_support(img400, mask[:1])[0] is img400  # already there: untouched


def test_mixing_keys_read_the_mask_at_its_corners():
    """Why the tiny layout turns the attention mask off: at 400-px supports the keys of squeeze3 / squeeze2's
    second layers and of both mixing blocks form a 2x2 grid, whose bilinear (align_corners) mask is the support
    mask's four corner pixels. With an object away from the corners every such key is masked, the softmax is
    uniform and those layers' query / key embeddings get no gradient, in the official model as here."""
    dead = {}
    for attention in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelConfig(method="asnet", backbone="small", asnet={"mask_attention": attention}),
                            shot=1, base_classes=[]).train()
        get_method("asnet").loss(model, make_episode(1))["nll"].backward()
        dead[attention] = {n.rsplit(".", 2)[0] + "." + n.rsplit(".", 2)[1] for n, p in model.named_parameters()
                           if p.requires_grad and (p.grad is None or not p.grad.any())}
    layers = ("squeeze3.1", "squeeze2.1", "mix43.0", "mix43.1", "mix32.0", "mix32.1")
    assert dead[True] == {f"{layer}.{embed}" for layer in layers for embed in ("query_embed", "key_embed")}
    assert dead[False] == set()


def test_learnable_count_and_record():
    record = get_method("asnet")
    with torch.device("meta"):
        r50 = build_model(ModelConfig(method="asnet", backbone="resnet50"), shot=1, base_classes=[])
        r101 = build_model(ModelConfig(method="asnet", backbone="resnet101"), shot=1, base_classes=[])
    assert count_learnable(r50) == record.reference.count == 1_320_610  # the official R50 learner: 1.32M
    assert count_learnable(r101) == 1_354_610
    assert not any(p.requires_grad for p in r50.backbone.parameters())
    assert [r50.squeeze4[0].query_embed.in_channels, r50.squeeze3[0].query_embed.in_channels,
            r50.squeeze2[0].query_embed.in_channels] == [3, 6, 4]
    assert_hsnet_family_recipe(record)
    assert record.options_of(ModelConfig(method="asnet")).model_dump() == {
        "support_masking": "none", "mask_attention": True, "support_size": 400}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny synthetic dataset with fold-0 lists and 1- and 2-shot episodes; no stage 1 anywhere."""
    root = tmp_path_factory.mktemp("asnet")
    return root, tiny_cli_data(root, "asnet", (1, 2), **{
        "synthesize.train_images": 40, "synthesize.test_images": 60, "synthesize.val_images": 40,
        "episodes.test_episodes": 4, "episodes.val_episodes": 2, "eval.episodes": 4,
        "train.episodes_per_epoch": 4, "train.batch_size": 2, "train.val_episodes": 2})


def test_asnet_trains_1shot_and_evaluates_at_1_and_2_shots(data):
    root, args = data
    assert main(["train", *args, "--shot", "2"]) == 0
    run = root / "runs" / "fold0" / "asnet-1shot"
    assert (run / "best.pt").is_file()
    history = json.loads((run / "history.json").read_text())["history"]
    assert set(history[0]) >= {"train_nll", "train_loss", "val_miou"}
    assert main(["evaluate", *args, "--method", "asnet"]) == 0
    result = json.loads((root / "results" / "fold0" / "asnet.json").read_text())
    assert set(result["results"]["fold0"]) == {"1shot", "2shot"}
    for shot in ("1shot", "2shot"):
        assert 0.0 <= result["results"]["fold0"][shot]["miou_mean"] <= 1.0
