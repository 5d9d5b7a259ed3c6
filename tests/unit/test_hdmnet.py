"""HDMNet (fssmeta/models/hdmnet.py), block by block against hand-computed or reference-formula cases: the
spatial-reduction attention, Mix-FFN, the matching (softmax over the query axis, background support tokens
zeroed, the correlation), the distillation KL, the priors, the k-shot psi; then the model: the support masked
at the input, the stage sizes, the BN convention, the LR groups and their checkpoint round trip, the learnable
count, the memory switch, predict from a checkpoint. The whole forward against the official code: tests/unit/test_oracle_parity.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fssmeta.checkpoint import read_checkpoint, restore, save_checkpoint
from fssmeta.cli import main
from fssmeta.config import Config, MemoryConfig, MiningConfig, ModelConfig, config_to_dict
from fssmeta.losses import episode_losses
from fssmeta.models import build_model, count_learnable, get_method
from fssmeta.models.ensemble import BaseMetaEnsemble
from fssmeta.models.hdm_transformer import Attention, HierarchicalTransformer, MixFFN
from fssmeta.models.hdmnet import HDMNet, cosine_prior, distillation_loss, weighted_psi
from fssmeta.models.method import trainable
from fssmeta.train import build_optimization, train_step
from tests.mlflow_helpers import encode, episode_arrays
from tests.unit.test_models import PASCAL_FOLD0_BASE, make_episode, tiny_cfg


def make_hdmnet(shot: int = 1, seed: int = 0, **model: object) -> HDMNet:
    torch.manual_seed(seed)
    return build_model(tiny_cfg("hdmnet", **model), shot=shot, base_classes=PASCAL_FOLD0_BASE)


def identity_(attention: Attention) -> Attention:
    """q, k, v and the output projection set to the identity."""
    with torch.no_grad():
        for linear in (attention.q, attention.k, attention.v, attention.out):
            linear.weight.copy_(torch.eye(linear.weight.shape[0]))
    return attention


def test_spatial_reduction_attention_is_the_reference_formula():
    torch.manual_seed(0)
    attention = Attention(8, heads=2, sr_ratio=2)
    x, hw = torch.randn(3, 16, 8), (4, 4)
    reduced = attention.sr(x.transpose(1, 2).reshape(3, 8, 4, 4))  # (3, 8, 2, 2): 4 key tokens, not 16
    kv = F.layer_norm(reduced.flatten(2).transpose(1, 2), (8,), attention.sr_norm.weight, attention.sr_norm.bias, 1e-6)
    q, k, v = (t.view(3, -1, 2, 4).transpose(1, 2) for t in (attention.q(x), attention.k(kv), attention.v(kv)))
    weights = (q @ k.transpose(-2, -1) / (math.sqrt(4) + 1e-9)).softmax(-1)  # (3, 2 heads, 16, 4)
    expected = attention.out((weights @ v).transpose(1, 2).reshape(3, 16, 8))
    torch.testing.assert_close(attention(x, hw), expected)
    assert Attention(8, heads=2, sr_ratio=1).sr is None  # the coarsest stage attends to every token


def test_matching_softmax_runs_over_the_query_axis_and_ignores_background_support_tokens():
    attention = identity_(Attention(2, heads=1))
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2 query tokens, 2)
    support = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # token 0 foreground, token 1 background
    fg = torch.tensor([[1.0, 0.0]])
    out, correlation = attention.match(query, support, fg, temperature=0.1)
    # Support token 0 (cosine 1 with query 0, 0 with query 1) spreads over the QUERY tokens: e^10 : e^0.
    share = math.exp(10) / (math.exp(10) + 1)
    torch.testing.assert_close(out, torch.tensor([[[2.0 * share, 0.0], [2.0 * (1 - share), 0.0]]]))
    torch.testing.assert_close(correlation, torch.tensor([[10.0, 0.0]]))  # mean logit over foreground tokens
    other_background = support.clone()
    other_background[0, 1] = torch.tensor([5.0, -7.0])
    assert torch.equal(attention.match(query, other_background, fg, 0.1)[0], out)  # background: no part


def test_matching_heads_average_their_correlations():
    torch.manual_seed(0)
    attention = Attention(4, heads=2)
    query, support, fg = torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    _, correlation = attention.match(query, support, fg, 0.1)
    q, k = attention.q(query).view(1, 3, 2, 2), attention.k(support).view(1, 5, 2, 2)
    cos = torch.einsum("bnhd,bmhd->bhnm", F.normalize(q, dim=-1), F.normalize(k, dim=-1)) / 0.1  # (1, 2, 3, 5)
    torch.testing.assert_close(correlation, cos[..., [0, 1, 3]].mean(-1).mean(1))


def test_mix_ffn_is_position_aware_through_its_depthwise_conv():
    torch.manual_seed(0)
    ffn = MixFFN(4, 8, dropout=0.0)
    x = torch.randn(1, 25, 4)
    y = x.clone()
    y[0, 12] += 1.0  # the centre token of a 5x5 map
    changed = (ffn(y, (5, 5)) - ffn(x, (5, 5))).abs().sum(-1).view(5, 5) > 1e-6
    assert changed[1:4, 1:4].all() and changed.sum() == 9  # the 3x3 neighbourhood, nothing further
    hidden = F.gelu(F.conv2d(ffn.fc1(x.transpose(1, 2).reshape(1, 4, 5, 5)), ffn.position.weight,
                             ffn.position.bias, padding=1, groups=8))
    torch.testing.assert_close(ffn(x, (5, 5)), ffn.fc2(hidden).flatten(2).transpose(1, 2))


def test_distillation_on_a_hand_case():
    query_mask = torch.tensor([[[1, 0], [0, 255]]])  # one object pixel; 255 counts as off the object
    coarse = torch.zeros(1, 2, 2, requires_grad=True)  # uniform: KL(one-hot || uniform) = log 4
    fine = torch.zeros(1, 4, 4, requires_grad=True)  # teacher = the coarse map upsampled: uniform, KL 0
    loss = distillation_loss([coarse, fine], query_mask)
    torch.testing.assert_close(loss, torch.tensor(math.log(4) / 2), atol=1e-6, rtol=0)
    loss.backward()
    # The coarse map learns from the ground truth only: the fine stage's KL sees it detached.
    alone = torch.zeros(1, 2, 2, requires_grad=True)
    (distillation_loss([alone], query_mask) / 2).backward()
    torch.testing.assert_close(coarse.grad, alone.grad)
    assert fine.grad.abs().sum() == 0  # at its teacher already


def test_distillation_teacher_is_resized_bilinearly_to_each_student():
    student = torch.randn(2, 3, 3)
    teacher = torch.randn(2, 5, 5)
    mask = torch.zeros(2, 5, 5, dtype=torch.long)
    loss = distillation_loss([teacher, student], mask) * 2 - distillation_loss([teacher], mask)
    t = F.interpolate(teacher[:, None], size=(3, 3), mode="bilinear")[:, 0].flatten(1).softmax(1)
    s = student.flatten(1).softmax(1)
    torch.testing.assert_close(loss, (t * (t.log() - s.log())).sum(1).mean(), atol=1e-5, rtol=1e-5)


def official_prior(query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference formula (HDMNet's get_similarity): support x nearest mask, cosine dot / (|s| |q| + 1e-7)
    over ALL support pixels, max over them, no normalisation."""
    B, C, h, w = query.shape
    s = (support * F.interpolate(mask[:, None], size=(h, w), mode="nearest")).flatten(2)  # (B, C, Ns)
    q = query.flatten(2)
    sim = s.transpose(1, 2) @ q / (s.norm(dim=1)[:, :, None] * q.norm(dim=1)[:, None, :] + 1e-7)
    return sim.max(1).values.view(B, 1, h, w)


@pytest.mark.parametrize("fill", [0.0, 1.0])  # some support background / none
def test_prior_is_the_official_formula_without_min_max(fill: float):
    torch.manual_seed(0)
    query, support = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    mask = torch.full((2, 16, 16), fill)
    mask[:, 4:12, 2:9] = 1.0  # nearest to 4x4: the centre 2x2
    torch.testing.assert_close(cosine_prior(query, support, mask), official_prior(query, support, mask))
    # By hand: every support pixel e0; query pixels e0, -e0, e1, (e0 + e1). Not min-max normalised, and a
    # background support pixel counts as a cosine of 0 in the max.
    support = torch.tensor([1.0, 0.0])[None, :, None, None].expand(1, 2, 4, 4)
    query = torch.tensor([[1.0, -1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)
    expected = [1.0, -1.0, 0.0, 1 / math.sqrt(2)] if fill == 1.0 else [1.0, 0.0, 0.0, 1 / math.sqrt(2)]
    torch.testing.assert_close(cosine_prior(query, support, mask[:1]).flatten(), torch.tensor(expected))


def test_k_shot_psi_keeps_the_weights_in_sorted_order():
    ensemble = BaseMetaEnsemble(3)
    with torch.no_grad():  # constant scores [2, 1, 0] whatever the psi: hidden unit 0 = 1, unit 1 = 0
        first, second = ensemble.kshot_rw[0], ensemble.kshot_rw[2]
        first.weight.zero_()
        first.bias.copy_(torch.tensor([1.0, 0.0]))
        second.weight.zero_()
        second.weight[:, 0, 0, 0] = torch.tensor([2.0, 1.0, 0.0])
        second.bias.zero_()
    psi = torch.tensor([[0.3, 0.1, 0.2]])
    weights = torch.tensor([2.0, 1.0, 0.0]).softmax(0)
    # HDMNet: the weight of the smallest psi goes to shot 0, whatever shot 0's psi is.
    torch.testing.assert_close(weighted_psi(ensemble, psi), (weights * psi[0]).sum()[None])
    # BAM returns them to the shots' order: shot 1 (the smallest psi) gets the first weight.
    torch.testing.assert_close((ensemble.shot_weights(psi) * psi).sum(1), (weights * psi[0, [1, 2, 0]]).sum()[None])
    one = torch.tensor([[0.25]])
    torch.testing.assert_close(weighted_psi(BaseMetaEnsemble(1), one), one[:, 0])


def test_the_support_is_masked_at_the_input():
    model = make_hdmnet().eval()
    episode = make_episode(1)
    other = episode._replace(support_imgs=episode.support_imgs + 3.0 * (episode.support_masks != 1)[:, :, None])
    with torch.no_grad():
        logits = model(episode).logits
        assert torch.equal(model(other).logits, logits)  # the support's background never reaches the model
        moved = model(episode._replace(query_img=episode.query_img + 3.0 * (episode.query_mask != 1)[:, None]))
    assert not torch.allclose(moved.logits, logits)


def test_the_stages_halve_the_map_and_reduce_the_keys():
    torch.manual_seed(0)
    transformer = HierarchicalTransformer(16, (2, 4, 8), (4, 2, 1), 2, 4, 0.0, 0.1)
    sizes, keys = [], []
    hooks = [stage.register_forward_hook(lambda m, i, o: sizes.append(o[1])) for stage in transformer.stages]
    hooks += [stage.layers[0].attn.sr.register_forward_hook(lambda m, i, o: keys.append(tuple(o.shape[-2:])))
              for stage in transformer.stages[:2]]
    fg = torch.zeros(2, 60, 60)
    fg[:, 10:40, 20:50] = 1
    logits, correlations = transformer(torch.randn(1, 16, 60, 60), torch.randn(2, 16, 60, 60), fg,
                                       torch.rand(1, 2, 60, 60))
    for hook in hooks:
        hook.remove()
    assert sizes[::2] == [(60, 60), (30, 30), (15, 15)]  # query and support alternate
    assert set(keys) == {(15, 15)}  # 60 / 4 and 30 / 2
    assert logits.shape == (1, 2, 60, 60)
    assert [tuple(c.shape) for c in correlations] == [(1, 15, 15), (1, 30, 30), (1, 60, 60)]  # coarsest first


def test_every_batchnorm_is_fixed_in_training_as_the_official_fix_bn():
    model = make_hdmnet().train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    head = [m for m in model.transformer.modules() if isinstance(m, nn.BatchNorm2d)]
    assert head and not any(m.training for m in norms)
    dropouts = [m for m in model.base_learner.modules() if isinstance(m, nn.Dropout2d)]
    assert dropouts and all(m.training for m in dropouts)  # model.hdmnet.base_dropout: true, as official
    before = [m.running_mean.clone() for m in head]
    model(make_episode(1))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, head, strict=True))
    moving = make_hdmnet(backbone_bn="train").train()
    assert all(m.training for m in moving.modules() if isinstance(m, nn.BatchNorm2d))


def test_the_transformer_trains_at_a_tenth_and_the_k_shot_mlp_not_at_all():
    record = get_method("hdmnet")
    model = make_hdmnet(shot=5)
    assert not any(p.requires_grad for p in model.ensemble.kshot_rw.parameters())  # official: not optimised
    optimizer, _ = build_optimization(record.optimizers(model, record.recipe), total_steps=10)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-4), pytest.approx(1e-3)]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.01]
    transformer = {id(p) for p in model.transformer.parameters()}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == transformer
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable(model))


def test_both_lr_groups_round_trip_through_the_checkpoint(tmp_path):
    record = get_method("hdmnet")
    model = make_hdmnet().train()
    optimizer, scheduler = build_optimization(record.optimizers(model, record.recipe), total_steps=10)
    for seed in (0, 1):
        train_step(model, make_episode(1, seed=seed), episode_losses, optimizer, scheduler)
    save_checkpoint(tmp_path / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler, step=2)

    fresh = make_hdmnet(seed=5).train()
    fresh_optimizer, fresh_scheduler = build_optimization(record.optimizers(fresh, record.recipe), total_steps=10)
    restore(read_checkpoint(tmp_path / "last.pt"), model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.8 ** 0.9)  # poly, 2 of 10 steps
    for (_, a), (_, b) in zip(optimizer.state_dict()["state"].items(), fresh_optimizer.state_dict()["state"].items(),
                              strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    for net, opt, sched in ((model, optimizer, scheduler), (fresh, fresh_optimizer, fresh_scheduler)):
        torch.manual_seed(9)  # the same dropout draws for both
        train_step(net, make_episode(1, seed=2), episode_losses, opt, sched)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_learnable_count_is_the_official_one():
    """4,161,734 = the official model's learnable parameters at ResNet-50, 1 shot (counted by instantiating it,
    tools/oracle.py's environment); the paper says about 4.2M. At 5 shots the official model has 27 more with
    requires_grad (BAM's k-shot MLP) that its optimiser never updates: frozen here, so the count stays."""
    counts = []
    for shot in (1, 5):
        with torch.device("meta"):
            counts.append(count_learnable(build_model(ModelConfig(method="hdmnet", backbone="resnet50"), shot=shot,
                                                      base_classes=PASCAL_FOLD0_BASE)))
    assert counts == [4_161_734, 4_161_734]
    assert abs(counts[0] - 4.2e6) / 4.2e6 < 0.02


def test_the_memory_composes_and_mining_is_refused():
    memory = MemoryConfig(enabled=True, items=8, top_k=2, index="torch", prototype_weight=0.5)
    model = make_hdmnet(memory=memory).train()
    losses = get_method("hdmnet").loss(model, make_episode(1))
    assert {"ce", "aux", "distill", "memory_contrast", "memory_prototype", "diag_memory_orth"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    state = {k: v.clone() for k, v in model.memory.state_dict().items()}
    model(make_episode(1, seed=1))  # a training forward writes the bank ...
    assert any(not torch.equal(v, model.memory.state_dict()[k]) for k, v in state.items())
    state = {k: v.clone() for k, v in model.memory.state_dict().items()}
    with torch.no_grad():
        model.eval()(make_episode(1, seed=2))  # ... evaluation only reads it
    assert all(torch.equal(v, model.memory.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match=r"model\.memory\.restyle: hdmnet takes the memory at scope `mid` only"):
        make_hdmnet(memory=MemoryConfig(enabled=True, restyle="backbone"))
    with pytest.raises(ValueError, match=r"model\.mining\.enabled: hdmnet takes no mining part"):
        make_hdmnet(mining=MiningConfig(enabled=True))


def test_options_are_checked():
    with pytest.raises(ValueError, match="one entry per stage"):
        get_method("hdmnet").options.model_validate({"num_heads": (2, 4), "sr_ratios": (4, 2, 1)})
    with pytest.raises(ValueError, match="not divisible by 8 heads"):
        get_method("hdmnet").options.model_validate({"embed_dim": 12})
    with pytest.raises(ValueError, match="temperature"):
        get_method("hdmnet").options.model_validate({"temperature": 0.0})


def test_predict_rebuilds_it_from_a_checkpoint(tmp_path):
    """`fssmeta predict` reads the method and its options from the checkpoint's config alone."""
    cfg = Config(model=tiny_cfg("hdmnet"))
    save_checkpoint(tmp_path / "best.pt", model=make_hdmnet(), config=config_to_dict(cfg), epoch=1)
    query, support, mask = episode_arrays(0)
    for name, array in (("query.png", query), ("support.png", support), ("mask.png", mask)):
        (tmp_path / name).write_bytes(encode(array))
    assert main(["predict", "--params", "none", "--quiet", "--model", str(tmp_path / "best.pt"),
                 "--support", f"{tmp_path / 'support.png'}:{tmp_path / 'mask.png'}",
                 "--query", str(tmp_path / "query.png"), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["method"] == "hdmnet" and (tmp_path / "out" / "query_mask.png").is_file()
