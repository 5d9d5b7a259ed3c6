"""fssmeta's PFENet, BAM, NTRENet, HSNet, ASNet, SCCAN and HDMNet against the official forward passes recorded by tools/oracle.py.

Each fixture (tests/fixtures/oracle/<method>.pt) holds the inputs, the seed, a fingerprint of fssmeta's weights
and the official outputs on those weights, with the official repository and commit. The official code is
never imported here. docs/parity.md says what is pinned and how to regenerate a fixture (never by hand).

Tolerance, fp32 on CPU: max |fssmeta - official| <= 1e-4 + 1e-4 * max |official| over every output element
(recorded differences are about 1e-6); losses within 1e-5 + 1e-5 * |official|.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fssmeta.config import ModelConfig
from fssmeta.models import get_method
from fssmeta.models.ops import scaled_bins
from tools import oracle  # the one definition of the fixture's model, inputs and fingerprint

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "oracle"
ATOL = RTOL = 1e-4
LOSS_TOL = 1e-5
REGENERATE = "regenerate it with tools/oracle.py (docs/parity.md) if the change is intended"


_fixtures: dict[str, dict] = {}


def fixture_of(method: str) -> dict:
    if method not in _fixtures:
        fixture = torch.load(FIXTURES / f"{method}.pt", weights_only=True)
        assert fixture["format"] == oracle.FORMAT and fixture["generated_by"] == "tools/oracle.py"
        assert fixture["official"]["commit"] == oracle.OFFICIAL[method].commit, f"{method}.pt: {REGENERATE}"
        assert fixture["normalise"] == {"mean": list(oracle.MEAN), "std": list(oracle.STD)}
        assert tuple(fixture["base_classes"]) == oracle.BASE_CLASSES
        _fixtures[method] = fixture
    return _fixtures[method]


def case_of(method: str, name: str) -> dict:
    return next(c for c in fixture_of(method)["cases"] if c["name"] == name)


def check_fingerprint(method: str, case: dict, model: torch.nn.Module) -> None:
    """Fail with the first drifted entry when fssmeta's initial weights are not those recorded."""
    names, values = oracle.fingerprint(model)
    recorded = case["fingerprint_names"]
    if names != recorded:
        added = sorted(set(names) - set(recorded))[:5]
        removed = sorted(set(recorded) - set(names))[:5]
        pytest.fail(f"{method}: fssmeta's state dict is not the one recorded (added {added}, removed {removed}, "
                    f"or reordered): the model's layout changed; {REGENERATE}")
    close = torch.isclose(values, case["fingerprint"], rtol=1e-5, atol=1e-6).all(dim=1)
    if not close.all():
        i = int((~close).nonzero()[0])
        pytest.fail(f"{method}: fssmeta's seeded weights drifted from the recording, first at {names[i]} "
                    f"(sum, sum of squares {values[i].tolist()} vs {case['fingerprint'][i].tolist()}): "
                    f"initialisation order or the oracle's build changed; {REGENERATE}")


def assert_close(label: str, ours: torch.Tensor, official: torch.Tensor) -> None:
    assert ours.shape == official.shape, f"{label}: shape {tuple(ours.shape)} vs official {tuple(official.shape)}"
    diff = (ours - official).abs().max().item()
    scale = official.abs().max().item()
    print(f"{label}: max |fssmeta - official| = {diff:.3g} (max |official| = {scale:.3g})")
    assert diff <= ATOL + RTOL * scale, f"{label}: max |fssmeta - official| = {diff:.3g} > {ATOL} + {RTOL} x {scale:.3g}"


def assert_vote(label: str, ours: torch.Tensor, official: torch.Tensor, official_shot_logits: torch.Tensor) -> None:
    """HSNet's k-shot vote. fssmeta's rule (`hsnet.vote`) applied to the official per-shot logits gives the
    official `predict_mask_nshot` mask exactly; fssmeta's forward (query encoded once) gives it at every pixel
    where no shot's official logits are within ATOL of a tie (there fp32 summation order may flip an argmax)."""
    from fssmeta.models.hsnet import vote

    assert torch.equal(vote(official_shot_logits).argmax(1).float(), official), f"{label}: the voting rule"
    margin = (official_shot_logits[:, :, 1] - official_shot_logits[:, :, 0]).abs().amin(1)  # (B, H, W)
    settled = margin > ATOL
    wrong = int((ours != official)[settled].sum())
    print(f"{label}: {wrong} of {int(settled.sum())} settled pixels differ ({int((~settled).sum())} near a tie); "
          f"foreground {float(official.mean()):.3f}")
    assert ours.shape == official.shape and wrong == 0, f"{label}: {wrong} voted pixels differ"


def assert_asnet_seg(label: str, ours: torch.Tensor, official: torch.Tensor, shot_log_probs: torch.Tensor) -> None:
    """ASNet's k-shot mask. fssmeta's rule (`merge_ways`, upsampled to the query, mean over the shots, argmax)
    applied to the official per-shot log-probs gives the official `predict_mask_nshot` mask exactly; fssmeta's
    forward gives it wherever the two channels of that mean are more than ATOL apart."""
    from fssmeta.losses import resize_logits
    from fssmeta.models.asnet import merge_ways

    B, S = shot_log_probs.shape[:2]
    upsampled = resize_logits(merge_ways(shot_log_probs.flatten(0, 1)), official.shape[-2:])
    mean = upsampled.view(B, S, *upsampled.shape[1:]).mean(1)  # (B, 2, H, W)
    assert torch.equal(mean.argmax(1).float(), official), f"{label}: the k-shot rule"
    settled = (mean[:, 1] - mean[:, 0]).abs() > ATOL
    wrong = int((ours != official)[settled].sum())
    print(f"{label}: {wrong} of {int(settled.sum())} settled pixels differ ({int((~settled).sum())} near a tie); "
          f"foreground {float(official.mean()):.3f}")
    assert ours.shape == official.shape and wrong == 0, f"{label}: {wrong} pixels differ"


@pytest.mark.parametrize("name", [case.name for case in oracle.CASES])
@pytest.mark.parametrize("method", sorted(oracle.OFFICIAL))
def test_forward_matches_official(method: str, name: str) -> None:
    fixture, case = fixture_of(method), case_of(method, name)
    model = oracle.fssmeta_model(fixture["model_config"], case["shot"], fixture["seed"])
    check_fingerprint(method, case, model)
    inputs = {k: case[k] for k in ("query_img", "support_imgs", "support_masks", "query_mask") if k in case}

    captured: dict[str, torch.Tensor] = {}
    hooks = []
    if method == "bam":  # the meta and base learners' outputs at feature size, as the oracle hooked them
        hooks = [model.cls_meta.register_forward_hook(lambda m, i, o: captured.__setitem__("meta_logits", o)),
                 model.base_learner.cls[-1].register_forward_hook(
                     lambda m, i, o: captured.__setitem__("base_logits", o))]
    if method == "ntrenet":  # the query's background map and each scale's initial prediction (eval: run once)
        hooks = [model.background.head.register_forward_hook(lambda m, i, o: captured.__setitem__("bg_logits", o))]
        hooks += [head.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(f"initial_logits_{idx}", o))
                  for idx, head in enumerate(model.initial_cls)]
    if method == "sccan":  # the prior, the transformer's first channels and cls_meta's logits at feature size
        hooks = oracle.sccan_hooks(model, captured)
    if method == "hsnet":  # 1 shot the logits; k shots each shot's logits and the vote (oracle.hsnet_outputs)
        captured = oracle.hsnet_outputs(model, oracle.episode(inputs, case["class_id"]))
    elif method == "asnet":  # per-way log-probs, the forward's logits or k-shot mask, the presence
        captured = oracle.asnet_outputs(model, oracle.episode(inputs, case["class_id"]))
    elif method == "hdmnet":  # final logits, meta and base logits, each stage's matching correlation
        captured = oracle.hdmnet_outputs(model, oracle.episode(inputs, case["class_id"]))
    else:
        with torch.no_grad():
            captured["logits"] = model(oracle.episode(inputs, case["class_id"])).logits
    for hook in hooks:
        hook.remove()
    for key, official in case["outputs"].items():
        if key == "vote":
            assert_vote(f"{method} {name} {key}", captured[key], official, case["outputs"]["shot_logits"])
        elif key == "pred_seg":
            assert_asnet_seg(f"{method} {name} {key}", captured[key], official, case["outputs"]["shot_log_probs"])
        elif key == "presence":  # a 0/1 decision: equal, and fssmeta's rule on the official maps gives it
            from fssmeta.models.asnet import class_presence

            outputs = case["outputs"]
            maps = outputs["shot_log_probs"] if "shot_log_probs" in outputs else outputs["log_probs"][:, None]
            assert torch.equal(class_presence(maps).float(), official), f"{method} {name}: the presence rule"
            assert torch.equal(captured[key], official), f"{method} {name} presence"
        else:
            assert_close(f"{method} {name} {key}", captured[key], official)

    if "losses" in case:  # last: PFENet's training mode moves its backbone BN statistics
        ours = oracle.fssmeta_losses(model, method, oracle.episode(inputs, case["train_class_id"]))
        for key, official in case["losses"].items():
            print(f"{method} {name} loss {key}: fssmeta {ours[key]:.7g}, official {official:.7g}")
            assert abs(ours[key] - official) <= LOSS_TOL * (1 + abs(official)), f"{method} {name} loss {key}"


def test_fixture_bins_are_the_official_ones() -> None:
    """The PFENet fixture runs the official model with fixed bins that fssmeta's default `pyramid_bins` scale
    to exactly at the fixture's feature sizes; at the 473 reference size (60x60) they are PFENet's own."""
    for method in ("pfenet", "ntrenet"):  # NTRENet's official pyramid is PFENet's
        options = get_method(method).options_of(ModelConfig(**fixture_of(method)["model_config"]))
        for case in fixture_of(method)["cases"]:
            size = (case["feature_size"], case["feature_size"])
            assert [b for b, _ in scaled_bins(options.pyramid_bins, size)] == case["official_bins"]
        assert scaled_bins(options.pyramid_bins, (60, 60)) == [(60, 60), (30, 30), (15, 15), (8, 8)]


def test_ntrenet_fixture_records_its_patches() -> None:
    """The official NTRENet ran from a patched copy: the fixture lists each substitution, as tools/oracle.py
    defines them, and the sha256 of the unpatched files (those of the pinned commit)."""
    official = fixture_of("ntrenet")["official"]
    assert official["files"] == oracle.OFFICIAL["ntrenet"].files
    assert [tuple(p.values()) for p in official["patches"]] == [tuple(p) for p in oracle.PATCHES["ntrenet"]]


def test_hsnet_fixture_records_its_torchvision() -> None:
    """The official HSNet builds torchvision's ResNet-50: the fixture names the torchvision whose model code ran
    (its `models/resnet.py` sha256, as tools/oracle.py pins it) beside the pinned HSNet files."""
    official = fixture_of("hsnet")["official"]
    assert official["files"] == oracle.OFFICIAL["hsnet"].files
    assert official["torchvision"]["version"].startswith(oracle.TORCHVISION[0])
    assert official["torchvision"]["models/resnet.py"] == oracle.TORCHVISION[1]


def test_asnet_fixture_records_its_torchvision_and_einops() -> None:
    """The official ASNet builds torchvision's ResNet-50 and rearranges with einops: the fixture names both, as
    tools/oracle.py pins them, beside the pinned ifsl files."""
    official = fixture_of("asnet")["official"]
    assert official["files"] == oracle.OFFICIAL["asnet"].files
    assert official["torchvision"]["models/resnet.py"] == oracle.TORCHVISION[1]
    assert official["einops"]["version"] == oracle.EINOPS


def test_sccan_fixture_records_its_torchvision_and_timm() -> None:
    """The official SCCAN imports timm and runs torchvision's IntermediateLayerGetter: the fixture names both, as
    tools/oracle.py pins them, beside the pinned SCCAN files."""
    official = fixture_of("sccan")["official"]
    assert official["files"] == oracle.OFFICIAL["sccan"].files
    assert official["torchvision"]["version"].startswith(oracle.TORCHVISION[0])
    assert official["timm"]["version"] == oracle.TIMM


def test_hdmnet_fixture_records_its_mmcv_and_einops() -> None:
    """The official HDMNet builds its transformer from mmcv / mmseg (their pure-Python parts) and einops, and
    reads torchvision through mmcv's runner: the fixture names them as tools/oracle.py pins them."""
    official = fixture_of("hdmnet")["official"]
    assert official["files"] == oracle.OFFICIAL["hdmnet"].files
    assert official["mmcv"] == oracle.MMCV and official["einops"]["version"] == oracle.EINOPS
    assert official["torchvision"]["version"].startswith(oracle.TORCHVISION[0])
