"""SCCAN (fssmeta/models/sccan.py) block by block on hand cases: the window layout and the shifted (zero-padded)
windows, the patch alignment, the self-calibrated cross attention's one softmax, the soft-mask-transfer prior,
the weighted Dice loss; its two optimisers through a checkpoint; the memory part and the refused ones; the
learnable count against the published figure. The whole forward against the release: test_oracle_parity.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from fssmeta.checkpoint import resume, save_checkpoint
from fssmeta.config import MemoryConfig, MiningConfig, ModelConfig, OptimConfig
from fssmeta.losses import total_loss
from fssmeta.models import build_model, count_learnable, get_method
from fssmeta.models.backbone import build_backbone
from fssmeta.models.sccan import (
    SCCABlock,
    SCCANOptions,
    WindowAttention,
    align_windows,
    soft_mask_prior,
    torchvision_dilation_,
    weighted_dice_loss,
    window_partition,
    window_reverse,
)
from fssmeta.train import OptimizerSet, SchedulerSet, build_optimization, train_step
from tests.unit.test_models import PASCAL_FOLD0_BASE, make_episode, tiny_cfg


def make_sccan(shot: int = 1, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return build_model(tiny_cfg("sccan", **extra), shot=shot, base_classes=PASCAL_FOLD0_BASE)


def test_windows_are_row_major_and_reverse_exactly():
    x = torch.arange(16.0).view(1, 4, 4, 1)
    windows = window_partition(x, 2)
    assert windows[..., 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert torch.equal(window_reverse(windows, 2, 4, 4), x)


@pytest.mark.parametrize(("shifted", "expected"), [(False, {(0, 0), (0, 1), (1, 0), (1, 1)}),
                                                    (True, {(1, 1), (1, 2), (2, 1), (2, 2)})])
def test_a_block_mixes_query_tokens_within_its_windows_only(shifted: bool, expected: set):
    """Window 2 on a 4x4 map. Unshifted: query token (1, 1) is in the top-left window. Shifted, the release pads
    one zero row / column before (and one after): (1, 1) sits at (2, 2) of the 6x6 map, in the window of the
    original (1..2, 1..2). Changing the token changes the query output there and nowhere else."""
    torch.manual_seed(0)
    block = SCCABlock(4, 2, 2, shifted=shifted, mlp_ratio=1.0, update_support=True).eval()
    query, support = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    mask = torch.ones(1, 4, 4, 1)
    changed = query.clone()
    changed[0, 1, 1] += torch.randn(4)  # not a constant: LayerNorm would take it out
    with torch.no_grad():
        before, _ = block(query, support, mask)
        after, _ = block(changed, support, mask)
    moved = (after - before).abs().sum(-1)[0] > 1e-6
    assert {tuple(p) for p in moved.nonzero().tolist()} == expected


def test_patch_alignment_picks_the_most_similar_foreground_window():
    """4x4 maps, window 2, 2 channels. Support windows: 0 = (1, 0) on its foreground pixel only (a background
    pixel of (0, 1) inside it is not averaged in), 1 = (0, 1), 2 = (1, 0) but without foreground, 3 = (-1, 0).
    Query windows close to (1, 0), (0, 1), (1, 0), (-1, 0) pick 0, 1, 0 (not the empty 2), 3."""
    support = torch.zeros(1, 4, 4, 2)
    mask = torch.zeros(1, 4, 4, 1)
    support[0, 0, 0], mask[0, 0, 0] = torch.tensor([1.0, 0.0]), 1
    support[0, 0, 1] = torch.tensor([0.0, 1.0])  # background of window 0: left out of its prototype
    support[0, 0:2, 2:4], mask[0, 0:2, 2:4] = torch.tensor([0.0, 1.0]), 1
    support[0, 2:4, 0:2] = torch.tensor([1.0, 0.0])  # no foreground: never chosen
    support[0, 2:4, 2:4], mask[0, 2:4, 2:4] = torch.tensor([-1.0, 0.0]), 1
    query = torch.zeros(1, 4, 4, 2)
    for (r, c), value in zip([(0, 0), (0, 2), (2, 0), (2, 2)], [(1, 0.1), (0.1, 1), (1, 0), (-1, -0.1)], strict=True):
        query[0, r:r + 2, c:c + 2] = torch.tensor(value)
    aligned = align_windows(query, support, mask, 2)  # (4 windows, 4 tokens, 2)
    windows = window_partition(support, 2)
    assert [next(i for i in range(4) if torch.equal(aligned[w], windows[i])) for w in range(4)] == [0, 1, 0, 3]
    # No foreground anywhere: every window scores 0 and the release's torch.max picks window 0.
    assert torch.equal(align_windows(query, support, torch.zeros_like(mask), 2), windows[[0, 0, 0, 0]])


def test_self_calibrated_cross_attention_is_one_softmax_over_both_parts():
    """Against the formula: per head, [q.k_self / sqrt(d) ; cos(q, k_support)] under ONE softmax, then V and
    the projection. Two separate softmaxes, or a scaled cosine, give something else."""
    torch.manual_seed(0)
    attention = WindowAttention(8, 2)
    x, aligned = torch.randn(3, 4, 8), torch.randn(3, 4, 8)

    def reference(cross_scale: float = 1.0, split: bool = False) -> torch.Tensor:
        q = attention.q(x).view(3, 4, 2, 4).transpose(1, 2)  # (N, h, n, d)
        k, v = attention.kv(torch.cat([x, aligned], 1)).view(3, 8, 2, 2, 4).permute(2, 0, 3, 1, 4)
        self_logits = q @ k[:, :, :4].transpose(-2, -1) / math.sqrt(4)
        cross_logits = cross_scale * F.normalize(q, dim=-1) @ F.normalize(k[:, :, 4:], dim=-1).transpose(-2, -1)
        if split:
            weights = torch.cat([self_logits.softmax(-1), cross_logits.softmax(-1)], -1) / 2
        else:
            weights = torch.cat([self_logits, cross_logits], -1).softmax(-1)
        return attention.proj((weights @ v).transpose(1, 2).reshape(3, 4, 8))

    with torch.no_grad():
        ours = attention(x, aligned)
        torch.testing.assert_close(ours, reference(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, reference(split=True), atol=1e-4)
        assert not torch.allclose(ours, reference(cross_scale=0.5), atol=1e-4)
        # Without support windows: plain scaled dot-product window self-attention.
        q = attention.q(x).view(3, 4, 2, 4).transpose(1, 2)
        k, v = attention.kv(x).view(3, 4, 2, 2, 4).permute(2, 0, 3, 1, 4)
        plain = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 4, 8)
        torch.testing.assert_close(attention(x), attention.proj(plain), rtol=1e-5, atol=1e-6)


def test_soft_mask_transfer_prior_by_hand():
    """Support pixels (1, 0) in the mask and (0, 1) outside it; query pixels (1, 0), (0, 1), (1, 1). Softmax of
    the cosines (1, 0), (0, 1), (0.707, 0.707) over the two support pixels, times the mask: e / (e + 1),
    1 / (e + 1), 1/2; min-max per image: 1, 0, 1/2."""
    query = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    prior = soft_mask_prior(query, support, mask)
    assert prior.shape == (1, 1, 1, 3)
    torch.testing.assert_close(prior.flatten(), torch.tensor([1.0, 0.0, 0.5]), rtol=0, atol=1e-6)


def test_weighted_dice_by_hand():
    """Zero logits (p = 1/2 in both sigmoid channels) on labels [[1, 0], [0, 255]]: background one-hot 0110,
    foreground 1000 (255 in neither, its p still in the denominator). Background 1 - 2 x 1 / (1 + 2) = 1/3,
    foreground 1 - 2 x 0.5 / (1 + 1) = 1/2; summed over channels, averaged over the batch."""
    target = torch.tensor([[[1, 0], [0, 255]]]).repeat(2, 1, 1)
    assert weighted_dice_loss(torch.zeros(2, 2, 2, 2), target).item() == pytest.approx(1 / 3 + 1 / 2)
    perfect = torch.full((1, 2, 2, 2), -30.0)
    perfect[0, 1, 0, 0] = perfect[0, 0, 0, 1] = perfect[0, 0, 1, 0] = 30.0
    assert weighted_dice_loss(perfect, target[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert weighted_dice_loss(torch.zeros(1, 2, 1, 1), target[:1]).item() == pytest.approx(5 / 6)  # resized up


def test_record_loss_is_dice_only_and_shots_average():
    model = make_sccan(shot=1)
    losses = get_method("sccan").loss(model.train(), make_episode(1))
    assert set(losses) == {"dice"}
    model.eval()
    episode = make_episode(1, batch=1)
    twice = episode._replace(support_imgs=episode.support_imgs.repeat(1, 2, 1, 1, 1),
                             support_masks=episode.support_masks.repeat(1, 2, 1, 1))
    with torch.no_grad():  # two identical shots: every shot mean equals the shot
        torch.testing.assert_close(model(twice).logits, model(episode).logits, rtol=1e-5, atol=1e-6)


def test_the_last_block_has_no_support_update_and_the_count_is_the_published_one():
    """The release counts 11,373,314 learnable parameters (the paper's 11.4M); fssmeta builds them all but the
    last block's support attention and MLP (394,752), whose output the release discards."""
    reference = get_method("sccan").reference
    with torch.device("meta"):
        model = build_model(ModelConfig(method="sccan", **reference.model), shot=1, base_classes=PASCAL_FOLD0_BASE)
    blocks = model.transformer.blocks
    assert len(blocks) == 8 and [b.shifted for b in blocks] == [False, True] * 4
    assert blocks[-1].attn_support is None and blocks[-1].mlp_support is None
    assert all(b.attn_support is not None for b in blocks[:-1])
    discarded = sum(p.numel() for m in (blocks[0].attn_support, blocks[0].mlp_support) for p in m.parameters())
    assert (count_learnable(model), discarded) == (reference.count, 394_752)
    assert abs(reference.count + discarded - 11.4e6) / 11.4e6 < 0.02  # 11,373,314: 0.2% from 11.4M
    assert abs(reference.count - 11.4e6) / 11.4e6 < 0.04  # what fssmeta trains: 3.7% below


def test_torchvision_dilation_halves_only_the_first_block_of_the_dilated_stages():
    backbone = torchvision_dilation_(build_backbone("small", "deep_stem"))
    dilations = {stage: [block.conv2.dilation[0] for block in getattr(backbone, stage)] for stage in ("layer3", "layer4")}
    assert dilations == {"layer3": [1, 2], "layer4": [2, 4]}
    assert all(b.conv2.padding == b.conv2.dilation for s in ("layer3", "layer4") for b in getattr(backbone, s))
    assert SCCANOptions().dilation == "torchvision"  # the release's layout by default


def test_options_are_checked():
    with pytest.raises(ValidationError, match="feature_size 10 must be a multiple of window_size 4"):
        SCCANOptions(feature_size=10, window_size=4)
    with pytest.raises(ValidationError, match="reduce_dim 30 must be a multiple of num_heads 8"):
        SCCANOptions(reduce_dim=30)


def test_two_optimisers_as_the_release_and_their_state_through_a_checkpoint(tmp_path):
    """SGD at the run's recipe for every learnable parameter outside the transformer, AdamW 6e-5 (constant,
    weight decay 0.01) for the transformer; both states, and the schedules, survive save_checkpoint / resume:
    a resumed run takes the same next step as the uninterrupted one."""
    method = get_method("sccan")
    model = make_sccan()
    specs = method.optimizers(model, method.training_recipe(OptimConfig()))
    assert [(s.name, s.recipe.optimizer, s.recipe.lr, s.recipe.power) for s in specs] == [
        ("heads", "sgd", 0.05, 0.9), ("attention", "adamw", 6e-5, 0.0)]
    assert specs[1].recipe.weight_decay == 0.01
    groups = [{id(p) for g in s.param_groups for p in g["params"]} for s in specs]
    assert groups[1] == {id(p) for p in model.transformer.parameters()}
    assert not groups[0] & groups[1] and len(groups[0] | groups[1]) == len(list(p for p in model.parameters()
                                                                               if p.requires_grad))

    def step(model, optimizer, scheduler, seed: int) -> None:
        torch.manual_seed(seed)  # the same dropout draws on both runs
        train_step(model.train(), make_episode(1, seed=seed), method.loss, optimizer, amp="off")
        scheduler.step()

    optimizer, scheduler = build_optimization(specs, total_steps=10)
    assert isinstance(optimizer, OptimizerSet) and isinstance(scheduler, SchedulerSet)
    step(model, optimizer, scheduler, 1)
    save_checkpoint(tmp_path / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler, step=1)
    fresh = make_sccan(seed=5)
    fresh_optimizer, fresh_scheduler = build_optimization(method.optimizers(fresh, specs[0].recipe), total_steps=10)
    resume(tmp_path / "last.pt", model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    state = fresh_optimizer.state_dict()
    assert "momentum_buffer" in next(iter(state["heads"]["state"].values()))
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["attention"]["state"].values())))
    step(model, optimizer, scheduler, 2)
    step(fresh, fresh_optimizer, fresh_scheduler, 2)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert optimizer.param_groups[1]["lr"] == 6e-5 and optimizer.param_groups[0]["lr"] < 0.05  # constant / poly
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_takes_the_memory_at_scope_mid_and_refuses_mining():
    model = make_sccan(memory=MemoryConfig(enabled=True, items=8, top_k=2, prototype_weight=0.1)).train()
    bank = {k: v.clone() for k, v in model.memory.bank.state_dict().items()}
    losses = get_method("sccan").loss(model, make_episode(2))
    assert {"dice", "memory_contrast", "memory_prototype", "diag_memory_orth"} == set(losses)
    total_loss(losses).backward()
    assert any(not torch.equal(v, model.memory.bank.state_dict()[k]) for k, v in bank.items())  # written
    assert get_method("sccan").parts == {"memory"}
    with pytest.raises(ValueError, match=r"model\.mining\.enabled: sccan takes no mining part"):
        make_sccan(mining=MiningConfig(enabled=True))
    with pytest.raises(ValueError, match=r"model\.memory\.restyle: sccan restyles `mid` only"):
        make_sccan(memory=MemoryConfig(enabled=True, restyle="backbone"))
