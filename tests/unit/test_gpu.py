"""GPU path: bf16 autocast, channels_last, device-following modules. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from fssmeta.config import ModelConfig, OptimConfig
from fssmeta.data.folds import base_classes
from fssmeta.episode import Episode
from fssmeta.losses import episode_losses
from fssmeta.metrics import IoUMeter
from fssmeta.models import METHODS, build_model
from fssmeta.train import autocast, build_optimizer, train_step

pytestmark = pytest.mark.gpu

SMALL = dict(backbone="small", pspnet={"ppm_dim": 32}, bam={"reduce_dim": 32, "aspp_dilations": (1, 2, 3)},
             pfenet={"reduce_dim": 32, "pyramid_bins": (9, 5, 3, 2)}, ntrenet={"reduce_dim": 32, "pyramid_bins": (9, 5, 3, 2)})


def episode(shot: int) -> Episode:
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, shot + 1, 65, 65, generator=g) > 0.5).long()
    return Episode(torch.randn(2, shot, 3, 65, 65, generator=g), masks[:, 1:], torch.randn(2, 3, 65, 65, generator=g),
                   masks[:, 0], torch.tensor([6, 7]))


@pytest.mark.parametrize("method", sorted(k for k, m in METHODS.items() if m.learned))
@pytest.mark.parametrize("shot", [1, 5])
def test_bf16_channels_last_step_on_cuda(method, shot):
    device = torch.device("cuda")
    model = build_model(ModelConfig(method=method, **SMALL), shot=shot, base_classes=base_classes("pascal", 0))
    model = model.to(device).to(memory_format=torch.channels_last)
    ep = Episode(*(t.to(device) for t in episode(shot)))
    optimizer = build_optimizer(model.parameters(), OptimConfig())
    losses = train_step(model, ep, episode_losses, optimizer, amp=True)
    assert all(v == v for v in losses.values())  # finite (NaN != NaN)
    model.eval()
    with torch.no_grad(), autocast(device, True):
        out = model(ep)
    assert out.logits.device.type == "cuda" and out.logits.shape == (2, 2, 65, 65)
    meter = IoUMeter(20)
    meter.update(out.logits.float().argmax(1), ep.query_mask, ep.class_id)
    assert 0.0 <= meter.miou() <= 1.0
