"""Test-time adaptation (`eval.regime: tta`, fssmeta/adaptation.py): it never reads the query's mask, it puts
every weight back after each episode, it adapts (the prediction moves and the support loss falls), it works
through the evaluation feature cache, and its settings are checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fssmeta.adaptation import EpisodeAdaptation, adapted_parameters, other_views, support_views, with_regime
from fssmeta.config import ConfigError, EvalConfig, MemoryConfig, MiningConfig, TTAConfig
from fssmeta.episode import Episode
from fssmeta.models import build_model
from fssmeta.models.feature_cache import FeatureCache, caching
from fssmeta.train import evaluate
from tests.unit.test_models import PASCAL_FOLD0_BASE, SIZE, tiny_cfg

FLAGSHIP = {"memory": MemoryConfig(enabled=True, items=16, top_k=4), "mining": MiningConfig(enabled=True)}


def make_model(method: str = "bam", shot: int = 2, **parts) -> nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_cfg(method, **parts), shot=shot, base_classes=PASCAL_FOLD0_BASE).eval()


def episode(shot: int = 2, seed: int = 0, query_mask: torch.Tensor | None = None) -> Episode:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(shot, SIZE, SIZE, dtype=torch.long)
    for s in range(shot):
        masks[s, 10 + 5 * s: 40 + 5 * s, 12: 45] = 1
    masks[:, 0] = 255
    if query_mask is None:
        query_mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
        query_mask[20:50, 20:50] = 1
    return Episode(torch.randn(1, shot, 3, SIZE, SIZE, generator=g), masks[None], torch.randn(1, 3, SIZE, SIZE, generator=g),
                   query_mask[None], torch.tensor([3]))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method,parts", [("bam", FLAGSHIP), ("pfenet", {}), ("ntrenet", {})])
def test_the_query_mask_is_never_read_and_every_weight_comes_back(method: str, parts: dict):
    model = make_model(method, **parts)
    before = state(model)
    tta = EpisodeAdaptation(model, TTAConfig(steps=3, lr=1e-2))
    clean = episode()
    poisoned = episode(query_mask=torch.full((SIZE, SIZE), 255, dtype=torch.long))  # same images, mask garbage
    with torch.no_grad():
        first = tta(clean).logits
        again = tta(poisoned).logits
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    after = state(model)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())
    # and it did adapt: the prediction differs from the unadapted model's on this episode
    with torch.no_grad():
        plain = model(clean).logits
    assert not torch.allclose(first, plain, atol=1e-4)


def test_adaptation_lowers_the_support_loss_and_the_state_does_not_leak_across_episodes():
    model = make_model("bam", **FLAGSHIP)
    tta = EpisodeAdaptation(model, TTAConfig(steps=8, lr=1e-2))
    with torch.no_grad():
        a1 = tta(episode(seed=1)).logits
        losses = list(tta.last_losses)
        tta(episode(seed=2))
        a2 = tta(episode(seed=1)).logits
    assert len(losses) == 8 and losses[-1] < losses[0]
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)  # a fresh optimiser from the same weights each episode


def test_support_views_flip_one_shot_and_keep_the_supports():
    ep = episode(shot=3)
    view = support_views(ep, 2)
    assert torch.equal(view.query_img, ep.support_imgs[:, 2].flip(-1))
    assert torch.equal(view.query_mask, ep.support_masks[:, 2].flip(-1))
    assert view.support_imgs is ep.support_imgs and view.support_masks is ep.support_masks


def test_other_views_never_hold_the_query_image_among_the_supports():
    ep = episode(shot=3)
    view = other_views(ep, 2)
    assert torch.equal(view.query_img, ep.support_imgs[:, 2].flip(-1))
    assert torch.equal(view.query_mask, ep.support_masks[:, 2].flip(-1))
    assert view.support_imgs.shape == ep.support_imgs.shape  # BAM's k-shot weights need all S
    assert torch.equal(view.support_imgs, ep.support_imgs[:, [0, 1, 0]])  # shot 2 replaced by the next (0)
    assert torch.equal(view.support_masks, ep.support_masks[:, [0, 1, 0]])
    one = episode(shot=1)
    assert torch.equal(other_views(one, 0).query_img, support_views(one, 0).query_img)  # 1 shot: flip
    tta = with_regime(make_model("bam", shot=3), "tta", TTAConfig(steps=3, views="others"))
    assert tta.views is other_views
    with torch.no_grad():
        tta(ep)  # a 3-shot BAM adapts on 3-support views


def test_adaptation_through_the_feature_cache_equals_it_without():
    ep = episode()
    results = []
    for cache in (None, FeatureCache(2**30)):
        model = make_model("bam", **FLAGSHIP)
        tta = EpisodeAdaptation(model, TTAConfig(steps=4, lr=1e-2))
        with caching(tta, cache), torch.no_grad():
            assert model.feature_cache is cache  # the wrapper hands the cache to the model that reads it
            results.append(tta(ep).logits)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_the_scoring_loop_runs_it_under_no_grad():
    tta = with_regime(make_model("pfenet"), "tta", TTAConfig(steps=2))
    meter = evaluate(tta, [episode(), episode(seed=3)], num_classes=21)
    assert meter.miou() >= 0.0


def test_modules_pick_the_adapted_parameters_and_a_wrong_name_is_an_error():
    model = make_model("bam")
    chosen = adapted_parameters(model, ("cls_meta", "ensemble"))
    assert chosen and all(n.startswith(("cls_meta.", "ensemble.")) for n in chosen)
    assert all(p.requires_grad for p in adapted_parameters(model).values())
    assert not any(n.startswith("base_learner.") for n in adapted_parameters(model))  # frozen stays frozen
    with pytest.raises(ValueError, match="cls_mta"):
        adapted_parameters(model, ("cls_mta",))
    with pytest.raises(ValueError, match="one episode at a time"):
        EpisodeAdaptation(model, TTAConfig(steps=1))(Episode(*(t.repeat(2, *[1] * (t.dim() - 1)) for t in episode())))


def test_only_selected_modules_move():
    model = make_model("bam")
    before = state(model)
    tta = EpisodeAdaptation(model, TTAConfig(steps=3, lr=1e-1, modules=("cls_meta",)))
    seen: dict[str, torch.Tensor] = {}
    original = tta.model.forward

    def spy(ep):  # capture the weights while adapted, just before the query prediction
        if not torch.is_grad_enabled():
            seen.update(state(model))
        return original(ep)

    tta.model.forward = spy
    with torch.no_grad():
        tta(episode())
    moved = {k for k in before if not torch.equal(before[k], seen[k])}
    assert moved and all(k.startswith("cls_meta.") for k in moved)


def test_config_rules():
    with pytest.raises(ValueError, match="batch_size 1"):
        EvalConfig(regime="tta", batch_size=2, feature_cache_mib=0)
    with pytest.raises(ValueError, match="batch_size 1"):
        EvalConfig(target_regimes=("none", "tta"), batch_size=4, feature_cache_mib=0)
    with pytest.raises(ValueError):
        TTAConfig(steps=0)
    with pytest.raises(ValueError):
        with_regime(make_model("pfenet"), "fast", TTAConfig())
    assert issubclass(ConfigError, ValueError)


def adapted_weights(cfg: TTAConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """The trained weights, the weights the query is predicted with under `cfg`, and that prediction."""
    model = make_model("bam")
    before = state(model)
    tta = EpisodeAdaptation(model, cfg)
    seen: dict[str, torch.Tensor] = {}
    original = tta.model.forward

    def spy(ep):
        if not torch.is_grad_enabled():
            seen.update(state(model))
        return original(ep)

    tta.model.forward = spy
    with torch.no_grad():
        logits = tta(episode()).logits
    return before, seen, logits


def test_blend_predicts_with_that_share_of_the_weight_change():
    before, full, _ = adapted_weights(TTAConfig(steps=3, lr=1e-2))
    _, half, _ = adapted_weights(TTAConfig(steps=3, lr=1e-2, blend=0.25))
    moved = [k for k in before if not torch.equal(before[k], full[k])]
    assert moved
    for key in moved:
        torch.testing.assert_close(half[key], before[key] + 0.25 * (full[key] - before[key]), atol=1e-6, rtol=1e-5)
    _, _, none = adapted_weights(TTAConfig(steps=3, lr=1e-2, blend=0.0))
    with torch.no_grad():
        plain = make_model("bam")(episode()).logits
    torch.testing.assert_close(none, plain, atol=1e-5, rtol=1e-5)  # blend 0: the model as trained
    with pytest.raises(ValueError):
        TTAConfig(blend=1.5)


def test_a_checked_change_is_kept_whole_and_an_unchecked_one_blended(monkeypatch):
    import fssmeta.adaptation as adaptation

    monkeypatch.setattr(adaptation, "foreground_iou", lambda logits, mask: 0.5)  # the check always passes
    ep = episode(shot=3)
    results = {}
    for blend in (1.0, 0.5):
        model = make_model("bam", shot=3)
        with torch.no_grad():
            results[blend] = EpisodeAdaptation(model, TTAConfig(steps=3, lr=1e-2, check="holdout", blend=blend))(ep).logits
    torch.testing.assert_close(results[0.5], results[1.0], atol=0, rtol=0)  # k > 1: checked, so not blended
    one = episode(shot=1)
    for check in ("none", "holdout"):  # k = 1: nothing to hold out, so the blend applies under either check
        model = make_model("bam", shot=1)
        with torch.no_grad():
            plain = model(one).logits
            blended = EpisodeAdaptation(model, TTAConfig(steps=3, lr=1e-2, check=check, blend=0.0))(one).logits
        torch.testing.assert_close(blended, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("after,kept", [(0.4, False), (0.6, True)])
def test_holdout_never_shows_the_held_out_support_and_drops_a_change_that_hurts_it(monkeypatch, after, kept):
    import fssmeta.adaptation as adaptation

    ep = episode(shot=3)
    held = ep.support_imgs[:, 2]
    model = make_model("bam", shot=3)
    tta = EpisodeAdaptation(model, TTAConfig(steps=4, lr=1e-2, check="holdout"))
    original = tta.model.forward

    def spy(view):
        if torch.is_grad_enabled():  # an adaptation step: the held-out image is nowhere in it
            images = [view.query_img, *view.support_imgs.unbind(1)]
            assert not any(torch.equal(img, held) or torch.equal(img, held.flip(-1)) for img in images)
        return original(view)

    tta.model.forward = spy
    scores = iter([0.5, after])  # the held-out support's IoU before and after adapting
    monkeypatch.setattr(adaptation, "foreground_iou", lambda logits, mask: next(scores))
    before = state(model)
    with torch.no_grad():
        logits = tta(ep).logits
        plain = model(ep).logits
    assert tta.last_kept is kept and len(tta.last_losses) == 4
    assert torch.allclose(logits, plain, atol=1e-6) is not kept  # dropped: the model as trained
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())


def test_foreground_iou_leaves_out_ignored_pixels():
    from fssmeta.adaptation import foreground_iou

    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0] = 1.0  # top row predicted foreground
    mask = torch.tensor([[[1, 255], [1, 0]]])
    assert foreground_iou(logits, mask) == pytest.approx(1 / 2)  # pred {(0,0)}, target {(0,0), (1,0)}
    assert foreground_iou(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)) == 1.0
