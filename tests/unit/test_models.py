"""Every registered method, from its record: shapes at 1 and 5 shots, the record's own loss, gradients only where
trainable, frozen BN, determinism, state-dict round trip, published learnable-parameter counts, the stage-1
load; plus BAM's base map, NTRENet's distractor queue and the registry helpers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fssmeta.config import ModelConfig
from fssmeta.episode import Episode
from fssmeta.losses import total_loss
from fssmeta.models import METHODS, build_model, count_learnable, get_method
from fssmeta.models.pspnet import build_pspnet

PASCAL_FOLD0_BASE = list(range(6, 21))  # fold 0 tests on classes 1-5
SIZE = 65  # (65 - 1) / 8 + 1 = 9: a 9x9 feature map, hence bins (9, 5, 3, 2)
LEARNED = sorted(k for k, m in METHODS.items() if m.learned)
WITH_STAGE1 = sorted(k for k, m in METHODS.items() if m.stage1 is not None)
WITH_REFERENCE = sorted(k for k, m in METHODS.items() if m.reference is not None)


def tiny_cfg(method: str, **extra: Any) -> ModelConfig:
    """The method's own tiny test configuration (`Method.tiny`)."""
    return ModelConfig(method=method, **{**get_method(method).tiny, **extra})


def make_model(method: str, shot: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(method), shot=shot, base_classes=PASCAL_FOLD0_BASE)


def make_episode(shot: int, batch: int = 2, seed: int = 0, class_ids: tuple[int, ...] = (7, 12)) -> Episode:
    g = torch.Generator().manual_seed(seed)
    support_masks = torch.zeros(batch, shot, SIZE, SIZE, dtype=torch.long)
    query_mask = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    for b in range(batch):
        for s in range(shot):
            top, left = (int(v) for v in torch.randint(0, 30, (2,), generator=g))
            support_masks[b, s, top : top + 30, left : left + 30] = 1
            support_masks[b, s, top, left : left + 30] = 255  # an ignore band, as VOC object borders
        query_mask[b, 10:50, 15:45] = 1
    query_mask[:, 0] = 255
    return Episode(
        support_imgs=torch.randn(batch, shot, 3, SIZE, SIZE, generator=g),
        support_masks=support_masks,
        query_img=torch.randn(batch, 3, SIZE, SIZE, generator=g),
        query_mask=query_mask,
        class_id=torch.tensor(class_ids[:batch]),
    )


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    return [model.base_learner] if hasattr(model, "base_learner") else [model.backbone]


def keep_kshot_alive(model: nn.Module) -> None:
    """BAM's k-shot MLP: its two ReLU units both die at some random inits (psi >= 0), as in BAM; keep them live
    so a test checks the gradient path rather than the draw."""
    for module in model.modules():
        if hasattr(module, "kshot_rw"):
            nn.init.constant_(module.kshot_rw[0].bias, 0.5)


def test_records_are_consistent():
    for key, method in METHODS.items():
        assert method.key == key
        assert method.training_shot(5) in (1, 5)
        if method.options is not None:  # its section types and fills: unknown keys fail with their path
            assert method.options_of(ModelConfig()) == method.options()
    assert {"pfenet", "bam", "ntrenet", "baseline"} <= set(METHODS)


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("method", LEARNED)
def test_forward_backward(method: str, shot: int):
    check_forward_backward(method, shot)


def check_forward_backward(method: str, shot: int) -> None:
    """Output shapes, the record's loss finite and positive, a gradient for every trainable parameter and
    none for the frozen part, whose BN statistics do not move in a train-mode forward."""
    model = make_model(method, shot).train()
    keep_kshot_alive(model)
    episode = make_episode(shot)
    stats = {k: v.clone() for m in frozen_modules(model) for k, v in m.state_dict().items() if "running" in k}
    assert stats, "the frozen part should have BN running statistics"

    output = model(episode)
    assert output.logits.shape == (2, 2, SIZE, SIZE)
    assert all(a.shape == (2, 2, SIZE, SIZE) for a in output.aux_logits)
    torch.manual_seed(1)
    losses = get_method(method).loss(model, episode)  # the record's loss: what the loop minimises
    assert losses and all(v.dim() == 0 for v in losses.values())
    loss = total_loss(losses)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # The record's BN convention for the frozen part: "frozen" (BAM's fix_bn) keeps BN in eval mode and its
    # statistics fixed; "train" (PFENet's and NTRENet's official trainers) updates them under no_grad.
    bn_train = get_method(method).bn_mode(tiny_cfg(method)) == "train"
    for module in frozen_modules(model):
        assert not any(p.requires_grad for p in module.parameters())
        bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(m.training == bn_train for m in bns)
        moved = [k for k, v in module.state_dict().items() if "running_mean" in k and not torch.equal(v, stats[k])]
        assert bool(moved) == bn_train, f"BN convention {'train' if bn_train else 'frozen'}: moved {moved[:3]}"
    if method == "bam" and shot > 1:
        assert any(n.startswith("ensemble.kshot_rw") for n, _ in model.named_parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_eval_deterministic_and_state_dict_round_trip(method: str):
    model = make_model(method, seed=0).eval()
    episode = make_episode(1, seed=1)
    with torch.no_grad():
        first, second = model(episode), model(episode)
    assert torch.equal(first.logits, second.logits)
    assert first.aux_logits == [] and first.extra_losses == {}

    fresh = make_model(method, seed=1).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(episode).logits, first.logits)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(episode).logits, first.logits)


@pytest.mark.parametrize("method", WITH_REFERENCE)
def test_reference_parameter_counts(method: str):
    """At the reference layout (ResNet-50, reduce_dim 256, PASCAL fold 0): PFENet 10.8M, BAM 4.92M, NTRENet ~20.9M."""
    ref = get_method(method).reference
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(ModelConfig(method=method, **ref.model), shot=ref.shot,
                            base_classes=list(range(6, 6 + ref.base_classes)))
    assert count_learnable(model) == ref.count


def test_bam_kshot_adds_the_published_27():
    with torch.device("meta"):
        one, five = (build_model(ModelConfig(method="bam", backbone="resnet50"), shot=s, base_classes=PASCAL_FOLD0_BASE)
                     for s in (1, 5))
    assert count_learnable(one) == 4_917_254 and abs(count_learnable(one) - 4.92e6) / 4.92e6 < 0.01
    assert count_learnable(five) - count_learnable(one) == 27


@pytest.mark.parametrize("queue_push", ["before", "after"])
def test_ntrenet_queue_fills_in_training_only(queue_push: str):
    torch.manual_seed(0)
    mining_cfg = {"queue_push": queue_push, "pcl_form": "infonce"}  # infonce: a loss with negatives is > 0
    model = build_model(tiny_cfg("ntrenet", mining=mining_cfg), shot=1, base_classes=PASCAL_FOLD0_BASE)
    with torch.no_grad():  # "not background" everywhere: every non-target pixel is a distractor
        model.background.head[-1].bias.copy_(torch.tensor([10.0, -10.0]))
    episode = make_episode(1)
    with torch.no_grad():
        model.eval()(episode)
    assert len(model.distractor_queue) == 0

    first = model.train()(episode)
    assert len(model.distractor_queue) == 4  # per episode one query and one support prototype
    # NTRENet pushes first, so an episode's own distractors are among its negatives; "after": the queue was empty
    assert (first.extra_losses["pcl"] > 0) == (queue_push == "before")
    second = model(episode)
    assert len(model.distractor_queue) == 8
    assert second.extra_losses["pcl"] > 0
    assert model.distractor_queue.negatives(7).shape == (4, 32)
    assert not model.distractor_queue.negatives(7).requires_grad
    with torch.no_grad():
        model.eval()(episode)
    assert len(model.distractor_queue) == 8
    assert not any("queue" in k for k in model.state_dict())


def test_support_features_run_one_pass_per_shot():
    """With BN in train mode (PFENet's convention) the batch statistics are one shot's B supports, as in the
    official per-shot loop, not all B*S supports at once."""
    from fssmeta.models.family import support_features

    model = make_model("pfenet").train()
    assert model.backbone.training  # backbone_bn "train"
    episode = make_episode(3)
    with torch.no_grad():
        feats = support_features(model.backbone, episode.support_imgs, episode.support_masks)
        alone = support_features(model.backbone, episode.support_imgs[:, 1:2], episode.support_masks[:, 1:2])
    torch.testing.assert_close(feats.layer4.view(2, 3, *feats.layer4.shape[1:])[:, 1], alone.layer4)
    torch.testing.assert_close(feats.layer2.view(2, 3, *feats.layer2.shape[1:])[:, 1], alone.layer2)


def test_count_learnable_counts_shared_tensors_once():
    shared = nn.Linear(3, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_learnable(model) == 16


def test_bam_base_learner_modes_in_training():
    """BAM's trainer fixes BN but leaves the base head's Dropout2d active (`model.bam.base_dropout`, the
    official default); base_dropout false keeps the base learner wholly in eval mode (a deterministic map)."""
    episode = make_episode(1)
    for base_dropout in (True, False):
        torch.manual_seed(0)
        model = build_model(tiny_cfg("bam", bam={**get_method("bam").tiny["bam"], "base_dropout": base_dropout}),
                            shot=1, base_classes=PASCAL_FOLD0_BASE).train()
        modes = {type(m).__name__: m.training for m in model.base_learner.modules()
                 if isinstance(m, (nn.BatchNorm2d, nn.Dropout2d))}
        assert modes == {"BatchNorm2d": False, "Dropout2d": base_dropout}
        with torch.no_grad():
            layer4 = model.backbone(episode.query_img)["layer4"]
            first, second = (model.base_map(layer4, episode.class_id) for _ in range(2))
        assert torch.equal(first, second) != base_dropout
        assert not any(m.training for m in model.eval().base_learner.modules())


def test_bam_excludes_episode_class_from_base_map_only_in_training():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("bam", bam={**get_method("bam").tiny["bam"], "base_dropout": False}),
                        shot=1, base_classes=PASCAL_FOLD0_BASE)
    episode = make_episode(1, class_ids=(8, 3))  # 8 is base class index 2 (channel 3); 3 is novel
    with torch.no_grad():
        layer4 = model.backbone(episode.query_img)["layer4"]
        prob = model.base_learner.classify(layer4).softmax(1)  # (B, 16, h, w)
        eval_map = model.eval().base_map(layer4, episode.class_id)
        train_map = model.train().base_map(layer4, episode.class_id)
    all_base = prob[:, 1:].sum(1, keepdim=True)
    torch.testing.assert_close(eval_map, all_base)
    torch.testing.assert_close(train_map[0], all_base[0] - prob[0, 3:4])
    torch.testing.assert_close(train_map[1], all_base[1])  # a class outside the base set removes nothing
    assert not torch.allclose(train_map[0], eval_map[0])


def test_bam_rejects_mismatched_shots():
    model = make_model("bam", shot=5).eval()
    with pytest.raises(ValueError, match="5 shots"):
        model(make_episode(3))


def test_backbone_source(tmp_path):
    """`model.backbone_source`: BAM always takes stage 1 (its base learner); the frozen-backbone methods take
    the stage-1 encoder only with `stage1`, else `model.weights` (official), which must then be set."""
    from fssmeta.config import ConfigError
    from fssmeta.models.backbone import build_backbone

    assert get_method("bam").stage1_for(tiny_cfg("bam")).part == "base_learner"
    for method in ("pfenet", "ntrenet", "baseline", "hsnet", "asnet"):
        record = get_method(method)
        assert record.stage1_for(tiny_cfg(method, backbone_source="stage1")).part == "backbone"
        with pytest.raises(ConfigError, match=r"model\.backbone_source.*needs model\.weights"):
            record.stage1_for(tiny_cfg(method))  # the official default, with no weights file
    torch.manual_seed(5)
    weights = tmp_path / "imagenet.pth"
    torch.save({"state_dict": build_backbone("small", "deep_stem").state_dict()}, weights)
    cfg = tiny_cfg("pfenet", weights=str(weights))
    assert get_method("pfenet").stage1_for(cfg) is None  # nothing taken from stage 1
    model = build_model(cfg, shot=1, base_classes=PASCAL_FOLD0_BASE)
    saved = torch.load(weights)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.backbone.state_dict().items())


def test_build_model_unknown_method():
    known = ", ".join(sorted(METHODS))  # every registered method, sorted
    with pytest.raises(ValueError, match=rf"model\.method.*'nope'.*known: {known}$"):
        build_model(ModelConfig(method="nope"), shot=1, base_classes=PASCAL_FOLD0_BASE)
    assert known.startswith("asnet, bam, baseline") and "ntrenet, pfenet" in known


@pytest.mark.parametrize("method", WITH_STAGE1)
def test_stage1_load(method: str):
    stage1 = get_method(method).stage1
    torch.manual_seed(123)
    pspnet = build_pspnet(tiny_cfg(method), 1 + len(PASCAL_FOLD0_BASE)).eval()
    for m in pspnet.modules():  # non-trivial BN statistics, so a missed buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.manual_seed(0)  # as the stages build it: the encoder is borrowed only at backbone_source stage1
    model = build_model(tiny_cfg(method, backbone_source="stage1"), shot=1, base_classes=PASCAL_FOLD0_BASE).eval()
    expected = {k.removeprefix("backbone."): v for k, v in pspnet.state_dict().items() if k.startswith("backbone.")}
    assert not all(torch.equal(v, expected[k]) for k, v in model.backbone.state_dict().items())
    stage1.load(model, pspnet.state_dict())
    assert model.backbone.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.backbone.state_dict().items())  # buffers included
    image = torch.randn(1, 3, SIZE, SIZE)
    if model.backbone.layer4[0].conv2.dilation != (1, 1):  # the dilated layout: the encoder's own output too
        with torch.no_grad():
            torch.testing.assert_close(model.backbone(image)["layer4"], pspnet.backbone(image)["layer4"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # still frozen

    state = pspnet.state_dict()
    state["backbone.conv1.weight"] = state["backbone.conv1.weight"][:, :2]
    with pytest.raises(ValueError, match=r"backbone\.conv1\.weight" if stage1.part == "base_learner" else r"conv1\.weight"):
        stage1.load(model, state)
    state = pspnet.state_dict()
    del state["backbone.layer4.0.conv2.weight"]
    with pytest.raises(ValueError, match="missing.*layer4.0.conv2.weight"):
        stage1.load(model, state)


def test_coco_pyramid_bins_need_their_own_setting():
    """PFENet on COCO (641 input, 81x81 features) pools to (81, 40, 20, 10). The PASCAL bins scaled to 81
    round to (81, 41, 20, 11), so docs/data.md sets `pyramid_bins: [81, 40, 20, 10]` for COCO, which the
    scaling then leaves exactly as official."""
    from fssmeta.models.ops import scaled_bins

    assert [b for b, _ in scaled_bins((60, 30, 15, 8), (81, 81))] == [81, 41, 20, 11]
    assert [b for b, _ in scaled_bins((81, 40, 20, 10), (81, 81))] == [81, 40, 20, 10]


def test_recipes_are_the_official_effective_rates():
    """PFENet and NTRENet: base_lr 0.0025 with every group at 10x = 0.025 effective (PASCAL, batch 4); BAM
    0.005 x 10 = 0.05. `train.optim` keys a run sets win over the recipe."""
    from fssmeta.config import OptimConfig

    assert {k: get_method(k).training_recipe(OptimConfig()).lr for k in ("pfenet", "ntrenet", "bam")} == {
        "pfenet": 0.025, "ntrenet": 0.025, "bam": 0.05}
    assert get_method("pfenet").training_recipe(OptimConfig(lr=0.05)).lr == 0.05


def test_a_checkpoint_from_before_the_aux_head_switch_still_loads():
    """Configs stored before `model.pspnet.aux_head` existed describe a PSPNet with the layer3 head (BAM's base
    learner then carried `base_learner.aux.*`): such a checkpoint rebuilds with the head and loads strictly."""
    from fssmeta.config import Config, config_to_dict
    from fssmeta.runs import model_from_checkpoint

    cfg = Config(model=tiny_cfg("bam", pspnet={**get_method("bam").tiny["pspnet"], "aux_head": True}))
    torch.manual_seed(0)
    old = build_model(cfg.model, shot=1, base_classes=PASCAL_FOLD0_BASE)
    stored = config_to_dict(cfg)
    del stored["model"]["pspnet"]["aux_head"]  # as an earlier release wrote it
    payload = {"config": stored, "model": old.state_dict()}
    assert any(k.startswith("base_learner.aux.") for k in payload["model"])
    model, read = model_from_checkpoint(payload, shot=1, base_classes=PASCAL_FOLD0_BASE, source="old.pt")
    assert read.model.pspnet.aux_head
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in model.state_dict().items())
