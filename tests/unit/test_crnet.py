"""CRNet (fssmeta/models/crnet.py) and its k-shot regime `finetune` (fssmeta/adaptation.py): the cross-reference
maths on a hand case, both branches predicted and both in the loss, the refinement's iteration count and
feedback, and the fine-tuning that reads only the labelled supports and puts every weight back."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fssmeta.adaptation import (
    EpisodeAdaptation,
    adapted_parameters,
    labelled_views,
    support_views,
    with_regime,
)
from fssmeta.config import Config, EvalConfig, TTAConfig
from fssmeta.cross_domain import target_result_path
from fssmeta.data.io import DataError
from fssmeta.episode import Episode
from fssmeta.evaluation import regime_config, regime_record, regime_settings, result_path
from fssmeta.losses import cross_entropy
from fssmeta.models import build_model, get_method
from fssmeta.models.crnet import CRNet, CrossReference
from fssmeta.models.method import trainable
from fssmeta.report import row_label
from fssmeta.train import build_optimization
from tests.unit.test_models import PASCAL_FOLD0_BASE, SIZE, make_episode, tiny_cfg

FEATURE = (SIZE - 1) // 8 + 1  # output stride 8


def make_crnet(shot: int = 1, seed: int = 0, **options) -> CRNet:
    torch.manual_seed(seed)
    crnet = {**get_method("crnet").tiny["crnet"], **options}
    return build_model(tiny_cfg("crnet", crnet=crnet), shot=shot, base_classes=PASCAL_FOLD0_BASE)


def constant_gate(gate: nn.Sequential, values: list[float]) -> None:
    """Make a gate output `values` whatever its input: zero weights, the last bias the values' logits."""
    with torch.no_grad():
        for module in gate:
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
        gate[3].bias.copy_(torch.tensor([math.log(v / (1 - v)) for v in values]))


def test_cross_reference_shapes():
    module = CrossReference(8)
    query, supports = torch.randn(2, 8, 5, 5), torch.randn(2, 3, 8, 5, 5)
    query_out, supp_out = module(query, supports)
    assert query_out.shape == query.shape and supp_out.shape == supports.shape


def test_cross_reference_reweights_both_maps_by_the_product_of_the_two_vectors():
    module = CrossReference(2)
    constant_gate(module.query_gate, [0.5, 0.8])
    constant_gate(module.support_gate, [0.2, 0.9])
    query = torch.tensor([1.0, 2.0])[None, :, None, None].expand(1, 2, 3, 3)
    supports = torch.tensor([3.0, 4.0])[None, None, :, None, None].expand(1, 1, 2, 3, 3)
    query_out, supp_out = module(query, supports)
    common = torch.tensor([0.5 * 0.2, 0.8 * 0.9])  # the channels both images excite
    torch.testing.assert_close(query_out[0, :, 1, 1], torch.tensor([1.0, 2.0]) * common)
    torch.testing.assert_close(supp_out[0, 0, :, 1, 1], torch.tensor([3.0, 4.0]) * common)
    # a channel the support does not excite is suppressed in the QUERY too
    constant_gate(module.support_gate, [1e-6, 0.9])
    query_out, _ = module(query, supports)
    assert query_out[0, 0].abs().max() < 1e-5 and query_out[0, 1].min() > 1.0


def test_cross_reference_k_shots_use_the_mean_vector_for_the_query():
    module = CrossReference(2)
    constant_gate(module.query_gate, [0.5, 0.5])
    with torch.no_grad():  # two shots with different (input-dependent) vectors: identity convs, no biases
        for conv in (module.support_gate[1], module.support_gate[3]):
            conv.weight.copy_(torch.eye(2)[:, :, None, None])
            conv.bias.zero_()
    supports = torch.stack([torch.full((2, 3, 3), 1.0), torch.full((2, 3, 3), -1.0)])[None]  # (1, 2, 2, 3, 3)
    query_out, supp_out = module(torch.ones(1, 2, 3, 3), supports)
    per_shot = torch.sigmoid(torch.tensor([1.0, 0.0]))  # relu(+1) = 1, relu(-1) = 0
    torch.testing.assert_close(query_out[0, :, 0, 0], 0.5 * per_shot.mean().expand(2))
    torch.testing.assert_close(supp_out[0, :, 0, 0, 0], 0.5 * per_shot * torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("shot", [1, 2])
def test_both_branches_are_predicted_and_both_are_in_the_loss(shot: int):
    model = make_crnet().train()
    episode = make_episode(shot)
    prediction = model.predict(episode, with_support=True)
    assert prediction.query_logits.shape == (2, 2, FEATURE, FEATURE)
    assert prediction.support_logits.shape == (2 * shot, 2, FEATURE, FEATURE)

    losses = get_method("crnet").loss(model, episode)
    assert set(losses) == {"ce", "support_ce"} and losses["support_ce"] > 0
    # each branch's own condition block learns from its own CE only; the shared parts from both
    grads = {}
    for key in ("ce", "support_ce"):
        model.zero_grad(set_to_none=True)
        losses[key].backward(retain_graph=True)
        grads[key] = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("query_condition.") for n in grads["ce"])
    assert not any(n.startswith("support_condition.") for n in grads["ce"])
    assert any(n.startswith("support_condition.") for n in grads["support_ce"])
    assert not any(n.startswith("query_condition.") for n in grads["support_ce"])
    for shared in ("reduce.", "cross_reference.support_gate.", "refine."):
        assert any(n.startswith(shared) for n in grads["ce"]) and any(n.startswith(shared) for n in grads["support_ce"])


def test_the_support_loss_is_the_support_predictions_ce_and_is_weighted():
    model = make_crnet(support_weight=0.5)
    model.eval()  # dropout off, so that the loss and the prediction below see the same network
    model.training = True  # ... but the training path of forward (the support branch and its loss)
    episode = make_episode(1)
    with torch.no_grad():
        extra = model(episode).extra_losses
        support_logits = model.predict(episode, with_support=True).support_logits
    expected = 0.5 * cross_entropy(support_logits, episode.support_masks.flatten(0, 1))
    torch.testing.assert_close(extra["support_ce"], expected)
    model.eval()
    assert model(episode).extra_losses == {} and model.predict(episode, with_support=False).support_logits is None


@pytest.mark.parametrize("iterations", [1, 3])
def test_the_refinement_runs_its_iterations_each_fed_the_previous_probability(iterations: int):
    model = make_crnet(refine_iterations=iterations).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (probability fed in, logits out) per pass
    model.refine.register_forward_hook(lambda module, args, out: seen.append((args[1], out)))
    with torch.no_grad():
        logits = model(make_episode(1)).logits
    assert len(seen) == iterations
    assert torch.equal(seen[0][0], torch.zeros_like(seen[0][0]))  # nothing to refine yet
    for (_, previous), (prob, _) in zip(seen, seen[1:], strict=False):
        torch.testing.assert_close(prob, previous.softmax(1)[:, 1:])
    assert logits.shape == (2, 2, SIZE, SIZE)
    seen.clear()
    model.train()(make_episode(2))  # both branches share one pass per iteration in training
    assert len(seen) == iterations and seen[0][1].shape[0] == 2 + 2 * 2


def test_more_iterations_change_the_prediction_with_the_same_weights():
    one, three = make_crnet(refine_iterations=1).eval(), make_crnet(refine_iterations=3).eval()
    three.load_state_dict(one.state_dict())
    episode = make_episode(1)
    with torch.no_grad():
        assert not torch.allclose(one(episode).logits, three(episode).logits)


def logit_spread(model: CRNet, seed: int) -> float:
    """Spatial std of the (fg - bg) logit at init, mean over the batch: how much the prediction can vary."""
    with torch.no_grad():
        logits = model.eval().predict(make_episode(1, seed=seed), with_support=False).query_logits
    return (logits[:, 1] - logits[:, 0]).flatten(1).std(1).mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_default_init_keeps_the_logits_spatial(seed: int):
    # The plateau's cause (docs/results.md, CRNet): under PyTorch's default init the logits came out constant
    # over the image (spread ~0.003), so training only fitted the classifier bias to "background".
    default, pytorch = make_crnet(seed=seed), make_crnet(seed=seed, init="pytorch")
    assert logit_spread(default, seed) > max(0.02, 10 * logit_spread(pytorch, seed))
    assert torch.equal(default.refine.cls[-1].weight, pytorch.refine.cls[-1].weight)  # the last conv: kept


def test_crnet_trains_at_the_runs_lr_times_its_lr_scale():
    record, recipe = get_method("crnet"), get_method("crnet").recipe.model_copy(update={"lr": 0.05})
    for scale in (0.5, 1.0):
        model = make_crnet(lr_scale=scale)
        optimizer = build_optimization(record.optimizers(model, recipe), total_steps=10)[0]
        assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.05 * scale)]
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable(model))


def finetune_episode(shot: int, query_mask: torch.Tensor | None = None) -> Episode:
    episode = make_episode(shot, batch=1, class_ids=(7,))
    return episode if query_mask is None else episode._replace(query_mask=query_mask)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_labelled_views_read_only_the_supports():
    episode = finetune_episode(3)
    blind = episode._replace(query_img=None, query_mask=None)  # a view that touched the query would fail
    view = labelled_views(blind, 1)
    assert torch.equal(view.query_img, episode.support_imgs[:, 1])
    assert torch.equal(view.query_mask, episode.support_masks[:, 1])
    assert torch.equal(view.support_imgs, episode.support_imgs[:, [0, 2]])
    assert torch.equal(view.support_masks, episode.support_masks[:, [0, 2]])
    one = finetune_episode(1)._replace(query_img=None, query_mask=None)
    flipped, tta = labelled_views(one, 0), support_views(one, 0)  # 1 shot: itself, flipped, from itself
    assert torch.equal(flipped.query_img, one.support_imgs[:, 0].flip(-1)) and torch.equal(flipped.query_img, tta.query_img)
    assert torch.equal(flipped.support_imgs, one.support_imgs)


@pytest.mark.parametrize("shot", [1, 3])
def test_finetune_never_reads_the_query_mask_and_puts_every_weight_back(shot: int):
    model = make_crnet().eval()
    before = state(model)
    finetune = with_regime(model, "finetune", TTAConfig(steps=4, lr=1e-2))
    assert isinstance(finetune, EpisodeAdaptation) and finetune.views is labelled_views
    poisoned = finetune_episode(shot, torch.full((1, SIZE, SIZE), 255, dtype=torch.long))
    with torch.no_grad():
        first = finetune(finetune_episode(shot)).logits
        losses = list(finetune.last_losses)
        again = finetune(poisoned).logits
        plain = model(finetune_episode(shot)).logits
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert len(losses) == 4 and losses[-1] < losses[0]  # it fits the labelled supports
    assert not torch.allclose(first, plain, atol=1e-4)  # and so moves the query's prediction
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_finetune_of_named_modules_and_its_errors_name_its_key():
    model = make_crnet().eval()
    chosen = adapted_parameters(model, ("query_condition", "refine"), "eval.finetune")
    assert chosen and all(n.startswith(("query_condition.", "refine.")) for n in chosen)
    with pytest.raises(ValueError, match=r"eval\.finetune\.modules"):
        with_regime(model, "finetune", TTAConfig(modules=("refin",)))
    with pytest.raises(ValueError, match="eval.regime finetune adapts one episode at a time"):
        with_regime(model, "finetune", TTAConfig(steps=1))(make_episode(1))
    with pytest.raises(ValueError, match="finetune adapts one episode at a time"):
        EvalConfig(target_regimes=("none", "finetune"), batch_size=2, feature_cache_mib=0)


def test_the_finetune_regime_is_recorded_as_its_own_and_refused_for_a_method_that_learns_nothing():
    cfg = Config.model_validate({"eval": {"episodes": 100, "tta": {"episodes": 20}, "finetune": {"steps": 3, "episodes": 7}}})
    assert regime_settings(cfg, "finetune").steps == 3 and regime_settings(cfg, "tta").steps == 20
    assert regime_config(cfg, "crnet", "finetune").eval.episodes == 7
    assert regime_config(cfg, "crnet", "tta").eval.episodes == 20 and regime_config(cfg, "crnet", "none") is cfg
    assert regime_record(cfg, "finetune") == {"name": "finetune", "finetune": cfg.eval.finetune.model_dump(mode="json")}
    assert result_path(cfg, 0, "crnet", "finetune").name == "crnet-finetune.json"
    assert target_result_path(cfg, "crnet", 0, "finetune").name.endswith("-finetune.json")
    regime_config(cfg, "pfenet", "finetune")  # every learned method may be fine-tuned
    with pytest.raises(DataError, match=r"eval\.regime finetune: baseline learns nothing"):
        regime_config(cfg, "baseline", "finetune")


def test_report_rows_of_crnet_say_approximate():
    assert row_label("crnet") == "crnet (approximate)" and row_label("crnet+finetune") == "crnet+finetune (approximate)"
    assert row_label("bam+tta") == "bam+tta" and row_label("flagship") == "flagship"


def test_a_finetune_section_keeps_its_own_defaults_for_the_keys_it_leaves_unset():
    from fssmeta.params import load_config

    assert load_config(None, {}).eval.finetune.steps == 10
    given = load_config(None, {"eval.finetune.episodes": 50}).eval.finetune
    assert (given.steps, given.episodes) == (10, 50)  # not the tta section's 20 steps
    assert load_config(None, {"eval.tta.episodes": 5}).eval.tta.steps == 20
