"""Metrics on tiny hand-computed cases: ignore pixels, empty unions, class-wise sums, FB-IoU, merge/reduce, ER."""

from __future__ import annotations

import math

import pytest
import torch

from fssmeta.metrics import ExactRatioMeter, IoUMeter, presence_from_probs


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


# Three 1x4 episodes used by several tests; classes 1, 1, 2.
#   A: pred 1111 / true 1111 -> fg I=4 U=4 (IoU 1);   bg I=0 U=0
#   B: pred 1000 / true 0001 -> fg I=0 U=2 (IoU 0);   bg pred {1,2,3} true {0,1,2}: I=2 U=4
#   C: pred 1100 / true 1000 -> fg I=1 U=2 (IoU 1/2); bg pred {2,3} true {1,2,3}: I=2 U=3
PREDS = t([[[1, 1, 1, 1]], [[1, 0, 0, 0]], [[1, 1, 0, 0]]])
TRUES = t([[[1, 1, 1, 1]], [[0, 0, 0, 1]], [[1, 0, 0, 0]]])
CLASSES = t([1, 1, 2])


def test_ignore_pixels_leave_both_intersection_and_union() -> None:
    meter = IoUMeter(num_classes=5)
    pred = t([[[1, 1, 0], [0, 1, 0]]])
    true = t([[[1, 255, 0], [1, 255, 255]]])
    meter.update(pred, true, t([4]))
    # Valid pixels (0,0) (0,2) (1,0): pred 1 0 0, true 1 0 1.
    # fg: I = {(0,0)} = 1, U = {(0,0), (1,0)} = 2 -> 0.5 (ignoring nothing would give I=1, U=4 -> 0.25).
    # bg: I = {(0,2)} = 1, U = {(0,2), (1,0)} = 2 -> 0.5.
    assert meter.per_class_iou() == {4: 0.5}
    assert meter.miou() == 0.5
    assert meter.fb_iou() == 0.5
    assert meter.episodes_seen == 1


def test_empty_union_counts_as_zero() -> None:
    meter = IoUMeter(num_classes=3)
    meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), t([3]))
    # Class 3 neither predicted nor present: U = 0 -> IoU 0.0 (PFENet / HSNet convention).
    assert meter.per_class_iou() == {3: 0.0}
    assert meter.miou() == 0.0
    # bg IoU = 4/4 = 1, fg union 0 -> 0: FB-IoU = 0.5.
    assert meter.fb_iou() == 0.5


def test_classwise_miou_is_not_the_mean_of_episode_ious() -> None:
    meter = IoUMeter(num_classes=2)
    meter.update(PREDS, TRUES, CLASSES)
    # Class 1: (4 + 0) / (4 + 2) = 2/3; class 2: 1/2. mIoU = (2/3 + 1/2) / 2 = 7/12 = 0.58333...
    # The mean of the three per-episode IoUs would be (1 + 0 + 1/2) / 3 = 0.5.
    per_class = meter.per_class_iou()
    assert per_class[1] == pytest.approx(2 / 3)
    assert per_class[2] == pytest.approx(0.5)
    assert meter.miou() == pytest.approx(7 / 12)
    assert meter.miou() != pytest.approx(0.5)
    # FB-IoU: fg I = 4 + 0 + 1 = 5, U = 4 + 2 + 2 = 8; bg I = 0 + 2 + 2 = 4, U = 0 + 4 + 3 = 7.
    # (5/8 + 4/7) / 2 = 67/112 = 0.598214...
    assert meter.fb_iou() == pytest.approx(67 / 112)
    assert meter.episodes_seen == 3


def test_updates_accumulate_like_one_batch() -> None:
    one_batch, one_by_one = IoUMeter(2), IoUMeter(2)
    one_batch.update(PREDS, TRUES, CLASSES)
    for i in range(3):
        one_by_one.update(PREDS[i : i + 1], TRUES[i : i + 1], CLASSES[i : i + 1])
    assert torch.equal(one_batch.state(), one_by_one.state())


def test_unseen_classes_are_left_out_and_empty_meter_is_nan() -> None:
    meter = IoUMeter(num_classes=20)
    assert math.isnan(meter.miou()) and math.isnan(meter.fb_iou())
    meter.update(PREDS[2:], TRUES[2:], t([7]))
    assert meter.per_class_iou() == {7: 0.5}
    assert meter.miou() == 0.5


def test_merge_equals_one_meter_fed_everything() -> None:
    full, first, second = IoUMeter(2), IoUMeter(2), IoUMeter(2)
    full.update(PREDS, TRUES, CLASSES)
    first.update(PREDS[:2], TRUES[:2], CLASSES[:2])
    second.update(PREDS[2:], TRUES[2:], CLASSES[2:])
    first.merge(second)
    assert torch.equal(first.state(), full.state())
    assert first.summary() == full.summary()
    with pytest.raises(ValueError):
        first.merge(IoUMeter(3))


def test_reduce_with_injected_sum() -> None:
    meter = IoUMeter(2)
    meter.update(PREDS, TRUES, CLASSES)
    before = meter.state()
    # A fake world of two identical ranks: every sum doubles, every ratio stays.
    meter.reduce_(lambda state: state * 2)
    assert torch.equal(meter.state(), before * 2)
    assert meter.episodes_seen == 6
    assert meter.miou() == pytest.approx(7 / 12)
    # A fake world whose other rank holds only episode C equals merging it.
    other = IoUMeter(2)
    other.update(PREDS[2:], TRUES[2:], CLASSES[2:])
    reduced, merged = IoUMeter(2), IoUMeter(2)
    reduced.update(PREDS[:2], TRUES[:2], CLASSES[:2])
    merged.update(PREDS[:2], TRUES[:2], CLASSES[:2])
    reduced.reduce_(lambda state: state + other.state())
    merged.merge(other)
    assert torch.equal(reduced.state(), merged.state())


def test_state_round_trip_and_dtype() -> None:
    meter = IoUMeter(2)
    meter.update(PREDS, TRUES, CLASSES)
    state = meter.state()
    assert state.dtype == torch.float64 and state.shape == (3 * 2 + 4,)
    restored = IoUMeter(2)
    restored.load_state(state)
    assert restored.summary() == meter.summary()
    with pytest.raises(ValueError, match="shape"):
        restored.load_state(torch.zeros(5, dtype=torch.float64))


def test_summary_is_plain() -> None:
    meter = IoUMeter(2)
    meter.update(PREDS, TRUES, CLASSES)
    summary = meter.summary()
    assert set(summary) == {"miou", "fb_iou", "per_class", "episodes"}
    assert set(summary["per_class"]) == {"1", "2"}
    assert summary["episodes"] == 3


def test_bad_inputs_raise() -> None:
    meter = IoUMeter(num_classes=2)
    with pytest.raises(ValueError, match="class id 3"):
        meter.update(PREDS, TRUES, t([1, 3, 2]))
    with pytest.raises(ValueError, match="class id 0"):
        meter.update(PREDS, TRUES, t([0, 1, 2]))
    with pytest.raises(ValueError, match="must both be"):
        meter.update(PREDS, TRUES[:, :, :3], CLASSES)
    with pytest.raises(ValueError, match="batch size"):
        meter.update(PREDS, TRUES, CLASSES[:2])
    with pytest.raises(ValueError, match="only 0 and 1"):
        meter.update(PREDS * 2, TRUES, CLASSES)
    assert meter.episodes_seen == 0  # nothing half-applied


def test_presence_from_probs_threshold_is_inclusive() -> None:
    probs = torch.zeros(1, 2, 2, 2)
    probs[0, 0, 1, 1] = 0.5  # reaches the threshold at one pixel -> present
    probs[0, 1] = 0.49  # everywhere just below -> absent
    assert presence_from_probs(probs).tolist() == [[True, False]]
    assert presence_from_probs(probs, threshold=0.4).tolist() == [[True, True]]


def test_exact_ratio() -> None:
    meter = ExactRatioMeter()
    assert math.isnan(meter.value())
    pred = torch.tensor([[True, False], [True, True], [False, False]])
    true = torch.tensor([[True, False], [True, False], [False, False]])
    meter.update(pred, true)
    # Episodes 1 and 3 get both decisions right, episode 2 misses one: ER = 2/3.
    assert meter.value() == pytest.approx(2 / 3)
    assert meter.episodes_seen == 3
    other = ExactRatioMeter()
    other.update(torch.tensor([[False, True]]), torch.tensor([[True, False]]))  # wrong: 2/4 overall
    meter.merge(other)
    assert meter.value() == 0.5
    meter.reduce_(lambda state: state * 2)
    assert meter.value() == 0.5 and meter.episodes_seen == 8
    with pytest.raises(ValueError):
        meter.update(pred, true[:, :1])
