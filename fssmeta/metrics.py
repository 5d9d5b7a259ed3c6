"""Episode metrics: class-wise mIoU and FB-IoU from summed intersections and unions, FS-CS exact ratio."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fssmeta.episode import IGNORE_INDEX


class _SumMeter:
    """A meter whose whole state is one flat float64 tensor of sums, so it merges and all-reduces by `+`."""

    def __init__(self, size: int) -> None:
        # float64 on CPU: sums of pixel counts over 20k episodes at 473x473 reach 4e9, beyond float32's
        # exact-integer range; CPU keeps the meter independent of where the model runs.
        self._sums = torch.zeros(size, dtype=torch.float64)

    def state(self) -> torch.Tensor:
        """A copy of every accumulated sum as one flat float64 tensor (for checkpoints and collectives)."""
        return self._sums.clone()

    def load_state(self, state: torch.Tensor) -> None:
        if state.shape != self._sums.shape:
            raise ValueError(f"{type(self).__name__}.load_state: expected shape {tuple(self._sums.shape)}, "
                             f"got {tuple(state.shape)}")
        # copy_ (not rebinding) keeps the named views into `_sums` valid.
        self._sums.copy_(state.detach().to("cpu", torch.float64))

    def merge(self, other: _SumMeter) -> None:
        """Add another meter's sums into this one (e.g. meters filled by different workers)."""
        if type(other) is not type(self) or other._sums.shape != self._sums.shape:
            raise ValueError(f"cannot merge {type(other).__name__} of size {other._sums.numel()} "
                             f"into {type(self).__name__} of size {self._sums.numel()}")
        self._sums += other._sums

    def reduce_(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the sums by their total over all processes.

        `reduce_sum` receives the flat state and returns its element-wise sum across processes, e.g. a wrapper
        around `torch.distributed.all_reduce` (which works in place, so the wrapper returns its argument).
        Every rank then reports the same metric. The meter itself never calls a collective.
        """
        self.load_state(reduce_sum(self.state()))


class IoUMeter(_SumMeter):
    """Accumulates foreground IoU per class and pooled background/foreground IoU over episodes.

    IoU_c = (sum of I over the episodes of class c) / (sum of U over them); mIoU = mean of IoU_c over the
    classes seen. This is the PFENet / HSNet definition, NOT the mean of per-episode IoUs. Values are
    fractions in [0, 1]. A class whose summed union is 0 (never predicted, never present) gets IoU 0.0, as
    in PFENet (`I / (U + 1e-10)`) and HSNet (`I / max(U, 1)`).
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"IoUMeter: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        C = num_classes
        # Layout: [fg_inter (C) | fg_union (C) | episodes (C) | bg_inter, bg_union, fg_inter, fg_union]
        super().__init__(3 * C + 4)
        self._class_inter = self._sums[0:C]
        self._class_union = self._sums[C : 2 * C]
        self._class_episodes = self._sums[2 * C : 3 * C]
        self._pooled = self._sums[3 * C :]

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_id: torch.Tensor) -> None:
        """Add a batch of episodes.

        pred: (B, H, W) int, 0/1. target: (B, H, W) int, 0/1/255 (255 is excluded from I and U).
        class_id: (B,) int, dataset class ids in 1..num_classes.
        """
        if pred.dim() != 3 or pred.shape != target.shape:
            raise ValueError(f"IoUMeter.update: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "must both be (B, H, W)")
        if class_id.shape != (pred.shape[0],):
            raise ValueError(f"IoUMeter.update: class_id shape {tuple(class_id.shape)} does not match "
                             f"batch size {pred.shape[0]}")
        ids = class_id.detach().to("cpu", torch.int64)
        bad = ids[(ids < 1) | (ids > self.num_classes)]
        if bad.numel():
            raise ValueError(f"IoUMeter.update: class id {bad[0].item()} outside 1..{self.num_classes}")
        if not bool(((pred == 0) | (pred == 1)).all()):
            raise ValueError("IoUMeter.update: pred must hold only 0 and 1")
        if not bool(((target == 0) | (target == 1) | (target == IGNORE_INDEX)).all()):
            raise ValueError(f"IoUMeter.update: target must hold only 0, 1 and {IGNORE_INDEX}")

        valid = target != IGNORE_INDEX
        pred_fg, true_fg = (pred == 1) & valid, (target == 1) & valid
        pred_bg, true_bg = (pred == 0) & valid, (target == 0) & valid
        dims = (1, 2)
        fg_inter = (pred_fg & true_fg).sum(dims).to("cpu", torch.float64)  # (B,)
        fg_union = (pred_fg | true_fg).sum(dims).to("cpu", torch.float64)
        bg_inter = (pred_bg & true_bg).sum(dims).to("cpu", torch.float64)
        bg_union = (pred_bg | true_bg).sum(dims).to("cpu", torch.float64)

        index = ids - 1
        self._class_inter.index_add_(0, index, fg_inter)
        self._class_union.index_add_(0, index, fg_union)
        self._class_episodes.index_add_(0, index, torch.ones_like(fg_inter))
        self._pooled += torch.stack([bg_inter.sum(), bg_union.sum(), fg_inter.sum(), fg_union.sum()])

    @property
    def episodes_seen(self) -> int:
        return int(self._class_episodes.sum().item())

    def per_class_iou(self) -> dict[int, float]:
        """IoU of every class that had at least one episode, keyed by dataset class id."""
        result: dict[int, float] = {}
        for index in torch.nonzero(self._class_episodes > 0).flatten().tolist():
            union = self._class_union[index].item()
            result[index + 1] = self._class_inter[index].item() / union if union > 0 else 0.0
        return result

    def miou(self) -> float:
        """Mean of `per_class_iou` over the classes seen; nan before any episode."""
        ious = list(self.per_class_iou().values())
        return sum(ious) / len(ious) if ious else math.nan

    def fb_iou(self) -> float:
        """Mean of background IoU and foreground IoU, each from sums pooled over all episodes."""
        if self.episodes_seen == 0:
            return math.nan
        bg_inter, bg_union, fg_inter, fg_union = self._pooled.tolist()
        bg_iou = bg_inter / bg_union if bg_union > 0 else 0.0
        fg_iou = fg_inter / fg_union if fg_union > 0 else 0.0
        return (bg_iou + fg_iou) / 2

    def summary(self) -> dict:
        """Plain, JSON-serialisable numbers: miou, fb_iou, per_class (str class id -> IoU), episodes."""
        return {
            "miou": self.miou(),
            "fb_iou": self.fb_iou(),
            "per_class": {str(c): iou for c, iou in self.per_class_iou().items()},
            "episodes": self.episodes_seen,
        }


def presence_from_probs(fg_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """FS-CS class presence (iFSL): class n is present when its foreground probability reaches `threshold`
    at any pixel.

    fg_probs: (B, N, H, W) foreground probability of each of the N support classes. Returns (B, N) bool.
    """
    if fg_probs.dim() != 4:
        raise ValueError(f"presence_from_probs: expected (B, N, H, W), got {tuple(fg_probs.shape)}")
    return fg_probs.amax(dim=(2, 3)) >= threshold


class ExactRatioMeter(_SumMeter):
    """FS-CS classification metric: the fraction of episodes whose N presence decisions are all right."""

    def __init__(self) -> None:
        super().__init__(2)  # [episodes with every decision right, episodes]

    def update(self, pred_presence: torch.Tensor, true_presence: torch.Tensor) -> None:
        """pred_presence, true_presence: (B, N) bool."""
        if pred_presence.dim() != 2 or pred_presence.shape != true_presence.shape:
            raise ValueError(f"ExactRatioMeter.update: pred {tuple(pred_presence.shape)} and true "
                             f"{tuple(true_presence.shape)} must both be (B, N)")
        all_right = (pred_presence.bool() == true_presence.bool()).all(dim=1)  # (B,)
        self._sums += torch.tensor([all_right.sum().item(), all_right.numel()], dtype=torch.float64)

    @property
    def episodes_seen(self) -> int:
        return int(self._sums[1].item())

    def value(self) -> float:
        """Exact ratio in [0, 1]; nan before any episode."""
        correct, total = self._sums.tolist()
        return correct / total if total > 0 else math.nan

    def summary(self) -> dict:
        return {"er": self.value(), "episodes": self.episodes_seen}
