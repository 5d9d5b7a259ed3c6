"""NTRENet's mining pieces (fssmeta/models/mining.py) on tiny hand-made cases: shapes, the background loss, the
distractor mask, the distractor queue and the prototypical contrastive loss."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from fssmeta.models import mining
from fssmeta.models.ops import masked_average_pool

LOG2 = math.log(2.0)


def two_channel(channel1: torch.Tensor) -> torch.Tensor:
    """(N, h, w) 0/1 -> (N, 2, h, w) confident logits whose argmax is the given map."""
    high = channel1.float() * 20.0 - 10.0
    return torch.stack([-high, high], 1)


def test_shapes():
    torch.manual_seed(0)
    bgmm = mining.BackgroundMining(8)
    feat = torch.randn(3, 8, 5, 6)
    assert bgmm(feat).shape == (3, 2, 5, 6)
    assert bgmm.prototype().shape == (8,)
    assert bgmm.prototype() is bgmm.bg_prototype  # the learnable vector itself, not a copy

    bgem = mining.BackgroundElimination(8)
    assert bgem(feat, bgmm.prototype()).shape == (3, 8, 5, 6)
    assert bgem(feat, torch.randn(3, 8)).shape == (3, 8, 5, 6)

    mask = torch.zeros(3, 1, 5, 6)
    mask[:, :, :2] = 1  # 12 of 30 pixels
    doem = mining.DistractorElimination(8)  # NTRENet's: the plain average of mask x feature
    merged, prototype = doem(feat, feat, mask)
    assert merged.shape == (3, 8, 5, 6) and prototype.shape == (3, 8)
    torch.testing.assert_close(prototype, feat[:, :, :2].sum(dim=(2, 3)) / 30)
    assert (merged >= 0).all()  # ReLU after the merge
    _, masked = mining.DistractorElimination(8, "masked")(feat, feat, mask)  # model.mining.do_prototype: masked
    torch.testing.assert_close(masked, masked_average_pool(feat, mask))
    torch.testing.assert_close(masked * 12 / 30, prototype, rtol=1e-3, atol=1e-5)


def test_background_mining_parameter_count():
    """Official widths: down_bg 2D->D 1x1, bg_res1 two DxD 3x3, bg_cls 3x3 + 1x1 to 2, one D-vector."""
    D = 256
    expected = 2 * D * D + 2 * 9 * D * D + (9 * D * D + 2 * D + 2) + D
    assert sum(p.numel() for p in mining.BackgroundMining(D).parameters()) == expected == 1_901_314


def test_background_loss_prefers_the_right_map():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, 2:6, 2:6] = 1
    labels[:, 0] = 255
    fg = labels == 1
    right = two_channel(~fg)  # "background" exactly off the object
    wrong = two_channel(fg)
    assert mining.background_loss(right, labels) < mining.background_loss(wrong, labels)


def test_background_loss_hand_values():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :2, :2] = 1  # 4 foreground pixels
    labels[1, :, :4] = 1  # 32
    uniform = torch.zeros(2, 2, 8, 8)
    # Normalised by each image's foreground area: log 2 whatever the area, plus 0.5 log 2 everywhere.
    expected = torch.tensor(LOG2 * (4 / (4 + 1e-5) + 32 / (32 + 1e-5)) / 2 + 0.5 * LOG2)
    torch.testing.assert_close(mining.background_loss(uniform, labels), expected)

    # Logits at 1/2 size are resized to the labels first.
    torch.testing.assert_close(mining.background_loss(torch.zeros(2, 2, 4, 4), labels), expected)

    # 255 pixels take no part: extreme logits there change nothing.
    labels[:, 7] = 255
    noisy = uniform.clone()
    noisy[:, 0, 7] = 50.0
    torch.testing.assert_close(mining.background_loss(noisy, labels), mining.background_loss(uniform, labels))


def test_background_loss_empty_foreground_and_all_ignored():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    empty = mining.background_loss(logits, torch.zeros(1, 4, 4, dtype=torch.long))
    torch.testing.assert_close(empty, torch.tensor(0.5 * LOG2))  # only the "background" term

    ignored = mining.background_loss(logits, torch.full((1, 4, 4), 255, dtype=torch.long))
    assert torch.isfinite(ignored) and ignored == 0
    (empty + ignored).backward()
    assert torch.isfinite(logits.grad).all()


def test_distractor_mask_hand_made():
    bg = torch.tensor([[[1, 0], [0, 1]]])  # argmax of the background map: 1 = background
    target = torch.tensor([[[0, 0], [1, 1]]])  # argmax of the initial prediction: 1 = target
    bg_logits, init_logits = two_channel(bg).requires_grad_(), two_channel(target)
    mask = mining.distractor_mask(bg_logits, init_logits)
    assert mask.shape == (1, 1, 2, 2) and mask.dtype == torch.float32
    # Only (0, 1) is neither background nor target; background AND target (1, 1) is not a distractor.
    assert torch.equal(mask, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]))
    assert not mask.requires_grad


def rows(*values: float) -> torch.Tensor:
    """One 2-d prototype per value: (k, 2) rows [v, -v]."""
    return torch.tensor([[v, -v] for v in values], dtype=torch.float32)


def test_queue_fifo_keeps_the_newest_per_class():
    queue = mining.DistractorQueue(2, size=3, sample=10)
    queue.push(torch.tensor([1, 1, 2]), rows(1, 2, 10), torch.tensor([True, True, True]))
    queue.push(torch.tensor([1, 1, 1]), rows(3, 4, 5), torch.tensor([True, True, True]))
    assert len(queue) == 4  # 3 (capped) of class 1, 1 of class 2
    assert sorted(queue.negatives(1)[:, 0].tolist()) == [3.0, 4.0, 5.0]  # 1 and 2 were the oldest
    assert queue.negatives(2)[:, 0].tolist() == [10.0]
    assert queue.negatives(3).shape == (0, 2)


def test_queue_skips_invalid_rows_and_stores_detached_copies():
    queue = mining.DistractorQueue(2, size=5, sample=5)
    prototypes = rows(1, 2, 3).requires_grad_()
    queue.push(torch.tensor([4, 4, 4]), prototypes, torch.tensor([True, False, True]))
    stored = queue.negatives(4)
    assert sorted(stored[:, 0].tolist()) == [1.0, 3.0]
    assert not stored.requires_grad
    with torch.no_grad():
        prototypes.mul_(0)
    assert sorted(queue.negatives(4)[:, 0].tolist()) == [1.0, 3.0]


def test_queue_samples_at_most_sample():
    queue = mining.DistractorQueue(2, size=10, sample=4)
    queue.push(torch.full((8,), 3), rows(*range(8)), torch.ones(8, dtype=torch.bool))
    first = queue.negatives(3, generator=torch.Generator().manual_seed(0))
    again = queue.negatives(3, generator=torch.Generator().manual_seed(0))
    assert first.shape == (4, 2) and torch.equal(first, again)
    assert len(set(first[:, 0].tolist())) == 4 and set(first[:, 0].tolist()) <= set(range(8))


def test_queue_follows_the_last_push_and_is_not_state():
    queue = mining.DistractorQueue(2)
    assert queue.negatives(0).dtype == torch.float32
    queue.push(torch.tensor([1]), rows(1).double(), torch.tensor([True]))
    assert queue.negatives(9).dtype == torch.float64  # an empty answer in the dtype of the last push
    holder = nn.Linear(2, 2)
    holder.queue = queue
    assert set(holder.state_dict()) == {"weight", "bias"}
    assert list(holder.buffers()) == []


def test_pcl_hand_value_and_ordering():
    anchor = torch.tensor([[1.0, 0.0, 0.0]])
    negatives = [torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])]  # orthogonal to the anchor
    for form, expected in (("paper", -math.log(math.e / 2 + mining.PCL_EPS)),  # the positive not in the denominator
                           ("infonce", -math.log(math.e / (math.e + 2)))):
        good = mining.prototypical_contrastive_loss(anchor, anchor.clone(), negatives, form=form)
        torch.testing.assert_close(good, torch.tensor(expected))
        bad = mining.prototypical_contrastive_loss(negatives[0][:1], anchor, negatives, form=form)  # anchor = a negative
        assert good < bad
        sharper = mining.prototypical_contrastive_loss(anchor, anchor.clone(), negatives, temperature=0.1, form=form)
        assert sharper < good


def test_pcl_without_negatives_and_gradients():
    anchor = torch.randn(2, 4, requires_grad=True)
    positive = torch.randn(2, 4)
    none = mining.prototypical_contrastive_loss(anchor, positive, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert none == 0
    none.backward()
    assert torch.isfinite(anchor.grad).all()

    anchor.grad = None
    loss = mining.prototypical_contrastive_loss(anchor, positive, [torch.randn(3, 4), torch.zeros(0, 4)],
                                                form="infonce")
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert anchor.grad[0].abs().sum() > 0

    zero = torch.zeros(1, 4, requires_grad=True)  # an empty predicted foreground pools to zero
    loss = mining.prototypical_contrastive_loss(zero, torch.randn(1, 4), [torch.randn(2, 4)])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("first", ["fssmeta.models.mining", "fssmeta.models.memory", "fssmeta.models"])
def test_import_order(first: str):
    """The parts live inside fssmeta.models, whose package imports the methods that use them: any first import works."""
    code = f"import {first}, fssmeta.models.mining, fssmeta.models; print(fssmeta.models.METHODS['ntrenet'])"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
