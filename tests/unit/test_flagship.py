"""The flagship: BAM with the RMT memory and NTRENet mining switched on and off from params (every
combination builds, trains and evaluates), the memory's losses, and the memory carried by checkpoints."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.checkpoint import resume, save_checkpoint
from fssmeta.config import MemoryConfig, MiningConfig, ModelConfig
from fssmeta.losses import DIAGNOSTIC_PREFIX, episode_losses, total_loss
from fssmeta.models import build_model, count_learnable, get_method
from fssmeta.models.memory import MemoryTransfer, category_contrast_loss
from fssmeta.train import train_step
from tests.unit.test_models import PASCAL_FOLD0_BASE, keep_kshot_alive, make_episode

COMBINATIONS = list(itertools.product([False, True], [False, True]))


def flagship_cfg(memory: bool, mining: bool, method: str = "bam") -> ModelConfig:
    return ModelConfig(method=method, **get_method(method).tiny, memory=MemoryConfig(enabled=memory, items=16, top_k=4),
                       mining=MiningConfig(enabled=mining))


def make_flagship(memory: bool, mining: bool, shot: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(flagship_cfg(memory, mining), shot=shot, base_classes=PASCAL_FOLD0_BASE)
    keep_kshot_alive(model)
    return model


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize(("memory", "mining"), COMBINATIONS)
def test_every_combination_trains_and_evaluates(memory: bool, mining: bool, shot: int):
    model = make_flagship(memory, mining, shot).train()
    assert (model.memory is not None) == memory and (model.mining is not None) == mining
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    bank_before = model.memory.bank.means.clone() if memory else None
    for step in range(3):
        episode = make_episode(shot, batch=2, seed=step)
        losses = episode_losses(model, episode)
        expected = {"ce", "aux"}
        expected |= {"memory_contrast", DIAGNOSTIC_PREFIX + "memory_orth"} if memory else set()
        expected |= {"bg", "aux_initial", "pcl"} if mining else set()
        assert set(losses) == expected
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        total_loss(losses).backward()
        if step == 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    if memory:
        assert not torch.equal(model.memory.bank.means, bank_before), "training must write the bank"

    model.eval()
    episode = make_episode(shot, batch=2, seed=9)
    frozen_bank = model.memory.bank.means.clone() if memory else None
    queued = len(model.queue) if mining else 0
    with torch.no_grad():
        first, second = model(episode), model(episode)
    assert first.logits.shape == (2, 2, 65, 65)
    assert torch.equal(first.logits, second.logits) and first.extra_losses == {} and first.aux_logits == []
    if memory:
        assert torch.equal(model.memory.bank.means, frozen_bank), "evaluation must not write the bank"
    if mining:
        assert len(model.queue) == queued, "evaluation must not push distractors"


def test_switches_change_only_the_expected_parameters():
    """Memory adds no learnable parameter (EMA buffers); mining adds exactly its heads."""
    with torch.device("meta"):
        counts = {combo: count_learnable(build_model(
            ModelConfig(method="bam", backbone="resnet50", memory=MemoryConfig(enabled=combo[0]),
                        mining=MiningConfig(enabled=combo[1])), shot=1, base_classes=PASCAL_FOLD0_BASE))
            for combo in COMBINATIONS}
    assert counts[(False, False)] == counts[(True, False)] == 4_917_254  # BAM's published 4.92M
    assert counts[(False, True)] == counts[(True, True)] == 8_850_698


def test_pfenet_takes_the_memory_but_not_the_mining_switch():
    model = build_model(flagship_cfg(True, False, method="pfenet"), shot=1, base_classes=PASCAL_FOLD0_BASE).train()
    assert "memory_contrast" in episode_losses(model, make_episode(1))
    with pytest.raises(ValueError, match="model.mining.enabled.*ntrenet"):
        build_model(flagship_cfg(False, True, method="pfenet"), shot=1, base_classes=PASCAL_FOLD0_BASE)


def test_memory_travels_in_checkpoints(tmp_path):
    model = make_flagship(True, True).train()
    for step in range(2):
        episode_losses(model, make_episode(1, seed=step))
    path = save_checkpoint(tmp_path / "last.pt", model=model, step=2, epoch=1)
    fresh = make_flagship(True, True, seed=5)
    assert not torch.equal(fresh.memory.bank.means, model.memory.bank.means)
    resume(path, model=fresh, restore_rng=False)
    assert torch.equal(fresh.memory.bank.means, model.memory.bank.means)
    assert torch.equal(fresh.memory.bank.stds, model.memory.bank.stds)
    model.eval(), fresh.eval()
    with torch.no_grad():
        episode = make_episode(1, seed=7)
        assert torch.equal(model(episode).logits, fresh(episode).logits)


def test_diagnostics_are_logged_but_not_minimised():
    model = make_flagship(True, False).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    logged = train_step(model, make_episode(1), episode_losses, optimizer)
    minimised = sum(v for k, v in logged.items() if k != "loss" and not k.startswith(DIAGNOSTIC_PREFIX))
    assert logged[DIAGNOSTIC_PREFIX + "memory_orth"] > 0
    assert logged["loss"] == pytest.approx(minimised, rel=1e-6)


def test_category_contrast_prefers_matching_views():
    g = torch.Generator().manual_seed(0)
    fg, bg = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    classes = torch.tensor([1, 2, 3, 4])
    aligned = category_contrast_loss(fg, fg.clone(), bg, bg.clone(), classes, 0.1)
    shuffled = category_contrast_loss(fg, fg.roll(1, 0), bg, bg.roll(1, 0), classes, 0.1)
    assert aligned < shuffled
    # Same-class episodes are not negatives of each other: two copies of one class cost less than two classes.
    twin = torch.cat([fg[:1], fg[:1]])
    same = category_contrast_loss(twin, twin.clone(), bg[:2], bg[:2].clone(), torch.tensor([1, 1]), 0.1)
    different = category_contrast_loss(twin, twin.clone(), bg[:2], bg[:2].clone(), torch.tensor([1, 2]), 0.1)
    assert same < different
    # One episode still has a negative (its own background); the loss reaches the anchors.
    anchor = fg[:1].clone().requires_grad_(True)
    single = category_contrast_loss(anchor, fg[:1] + 0.1, bg[:1], bg[:1], classes[:1], 0.1)
    single.backward()
    assert torch.isfinite(single) and single > 0 and anchor.grad.abs().sum() > 0


def test_memory_transfer_reads_in_eval_and_writes_in_training():
    transfer = MemoryTransfer(MemoryConfig(enabled=True, items=8, top_k=4, alpha=0.25), channels=6)
    feat = torch.rand(3, 6, 5, 5) * 3 + 1
    before = transfer.bank.means.clone()
    transfer.eval()
    restyled = transfer.restyle(feat)
    transfer.observe(feat)
    assert torch.equal(transfer.bank.means, before)
    # alpha = 0.25: the restyled channel means sit 3/4 of the way to the memory's read.
    mu_mem, _ = transfer.bank.read(feat.mean((2, 3)), (feat.var((2, 3), unbiased=False) + 1e-5).sqrt())
    assert torch.allclose(restyled.mean((2, 3)), 0.25 * feat.mean((2, 3)) + 0.75 * mu_mem, atol=1e-5)
    transfer.train()
    transfer.observe(feat)
    assert not torch.equal(transfer.bank.means, before)
    loss = transfer.contrast_loss(F.relu(torch.randn(2, 4, 5, 5)), F.relu(torch.randn(2, 4, 5, 5)),
                                  torch.randint(0, 2, (2, 20, 20)), torch.tensor([1, 2]))
    assert torch.isfinite(loss) and loss > 0


def scoped_flagship(restyle: str, *, init: str = "source", prototype_weight: float = 0.0, test_alpha=None,
                    seed: int = 0, shot: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    memory = MemoryConfig(enabled=True, items=16, top_k=4, restyle=restyle, init=init,
                          prototype_weight=prototype_weight, test_alpha=test_alpha)
    cfg = ModelConfig(method="bam", **get_method("bam").tiny, memory=memory)
    return build_model(cfg, shot=shot, base_classes=PASCAL_FOLD0_BASE)


def test_backbone_scope_restyles_what_the_prior_psi_and_base_learner_see():
    """Scope `backbone`: the frozen layer2 / layer3 are restyled and layer4 is recomputed from the restyled
    layer3; scope `mid` leaves them raw. Both restyle the reduction's input identically."""
    from fssmeta.models.family import meta_inputs

    episode = make_episode(2, batch=2, seed=3)
    mid, backbone = (scoped_flagship(r, init="random", test_alpha=0.0).eval() for r in ("mid", "backbone"))
    backbone.load_state_dict(mid.state_dict())
    with torch.no_grad():
        a = meta_inputs(mid.backbone, mid.down_query, mid.down_supp, episode, mid.memory)
        b = meta_inputs(backbone.backbone, backbone.down_query, backbone.down_supp, episode, backbone.memory)
        raw = mid.backbone(episode.query_img)
        styled = backbone.memory.restyle(torch.cat([raw["layer3"], raw["layer2"]], 1))
    c3 = raw["layer3"].shape[1]
    assert torch.equal(a.query["layer4"], raw["layer4"]) and torch.equal(a.query["layer2"], raw["layer2"])
    assert torch.allclose(b.query["layer2"], styled[:, c3:]) and torch.allclose(b.query["layer3"], styled[:, :c3])
    assert torch.allclose(b.query["layer4"], backbone.backbone.layer4(styled[:, :c3]), atol=1e-6)
    assert (b.query["layer4"] - raw["layer4"]).abs().max() > 1e-3, "test_alpha 0 must move layer4"
    assert (b.support.layer2 - a.support.layer2).abs().max() > 1e-3
    assert not torch.allclose(b.priors, a.priors)
    assert torch.allclose(a.query_feat, b.query_feat, atol=1e-5), "the reduction sees the same restyled input"
    assert torch.allclose(a.supp_feat, b.supp_feat, atol=1e-5)


def test_backbone_scope_writes_raw_source_statistics():
    """The write is of the RAW statistics in both scopes: from one bank, one training step leaves the same
    bank (random init: the EMA write is a sum over instances, so the order the scopes gather them in is moot)."""
    episode = make_episode(2, batch=2, seed=4)
    models = [scoped_flagship(r, init="random").train() for r in ("mid", "backbone")]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        episode_losses(model, episode)
    assert not torch.equal(models[0].memory.bank.means, scoped_flagship("mid", init="random").memory.bank.means)
    assert torch.allclose(models[0].memory.bank.means, models[1].memory.bank.means, atol=1e-5)
    assert torch.allclose(models[0].memory.bank.stds, models[1].memory.bank.stds, atol=1e-5)


def test_backbone_scope_cached_evaluation_equals_uncached():
    from fssmeta.models.feature_cache import FeatureCache, caching

    model = scoped_flagship("backbone", test_alpha=0.0, shot=2).eval()
    episode = make_episode(2, batch=1, seed=5)
    with torch.no_grad():
        plain = model(episode).logits
        with caching(model, cache := FeatureCache(1 << 28)):
            first, again = model(episode).logits, model(episode).logits
    assert torch.allclose(plain, first, atol=1e-6) and torch.equal(first, again)
    kinds = {key[0] for key in cache.entries}
    assert {"styled_mid", "styled_layer4", "styled_masked_layer4"} <= kinds and not {"layer4", "mid"} & kinds


def test_prototype_loss_is_low_when_the_query_matches_its_prototypes():
    transfer = MemoryTransfer(MemoryConfig(enabled=True, items=8, prototype_weight=2.0, prototype_scale=10.0),
                              channels=4)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    labels[:, 0, 0] = 255
    fg_dir, bg_dir = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    query = torch.where(labels[:, None] == 1, fg_dir[None, :, None, None], bg_dir[None, :, None, None])
    support, fg, bg = query.clone(), (labels == 1).float(), (labels == 0).float()
    good = transfer.prototype_loss(query, support, fg, bg, labels)
    # cos = 1 with its own prototype, 0 with the other: CE = log(1 + e^-10) per pixel, x the weight 2.
    assert torch.allclose(good, 2 * torch.log1p(torch.exp(torch.tensor(-10.0))), atol=1e-6)
    swapped = transfer.prototype_loss(query, support, bg, fg, labels)
    assert swapped > 10 * good
    feat = query.clone().requires_grad_(True)
    transfer.prototype_loss(feat, support, fg, bg, 1 - labels.clamp(max=1)).backward()
    assert feat.grad.abs().sum() > 0


def test_prototype_loss_joins_the_training_losses_only_when_weighted():
    episode = make_episode(1, batch=2, seed=6)
    assert "memory_prototype" not in episode_losses(scoped_flagship("mid").train(), episode)
    losses = episode_losses(scoped_flagship("backbone", prototype_weight=0.5).train(), episode)
    assert torch.isfinite(losses["memory_prototype"]) and losses["memory_prototype"] > 0
