"""`model.bam.init` / `model.pfenet.init: he` (ops.he_init_): He weights and zero biases for the learnable head
convs, the classifiers kept; against the all-background plateau (docs/results.md), where PyTorch's default
init leaves the untrained logits nearly constant over the image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fssmeta.models import build_model
from tests.unit.test_models import PASCAL_FOLD0_BASE, make_episode, tiny_cfg


def build(method: str, init: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    options = {**tiny_cfg(method).model_dump()[method], "init": init}
    return build_model(tiny_cfg(method, **{method: options}), shot=1, base_classes=PASCAL_FOLD0_BASE).eval()


def spread(model: nn.Module, seed: int = 0) -> float:
    """Spatial std of the untrained (fg - bg) logit, mean over the batch."""
    with torch.no_grad():
        logits = model(make_episode(1, seed=seed)).logits
    return (logits[:, 1] - logits[:, 0]).flatten(1).std(1).mean().item()


@pytest.mark.parametrize("method", ["bam", "pfenet"])
def test_he_init_spreads_the_untrained_logits_and_keeps_the_classifiers(method: str):
    official, he = build(method, "official"), build(method, "he")
    assert spread(he) > 3 * spread(official)
    convs = {name: m for name, m in official.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad}
    he_convs = dict(he.named_modules())
    moved = [name for name, conv in convs.items() if not torch.equal(conv.weight, he_convs[name].weight)]
    kept = [name for name in convs if name not in moved]
    assert moved and all(convs[name].out_channels > 2 for name in moved)
    assert kept and all(convs[name].out_channels <= 2 for name in kept)  # the classifiers keep their init
    frozen = [n for n, p in official.named_parameters() if not p.requires_grad]
    he_params = dict(he.named_parameters())
    assert all(torch.equal(p, he_params[n]) for n, p in official.named_parameters() if n in frozen)
