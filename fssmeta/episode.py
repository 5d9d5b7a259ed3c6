"""The batch contract (`Episode`) and the model output (`SegOutput`) shared by data, models and the loop."""

from __future__ import annotations

from typing import NamedTuple

import torch

# The one definition of the void label: VOC object boundaries, padding, COCO crowd regions under
# `data.crowd: ignore`. Pixels holding it carry no loss and no metric (docs/protocol.md section 4).
IGNORE_INDEX = 255
# Loss-dict entries whose key starts with this prefix are logged with the losses but never minimised.
DIAGNOSTIC_PREFIX = "diag_"


class Episode(NamedTuple):
    """One batch of few-shot episodes; collates with torch's default collate.

    Masks hold 1 for the episode's class, 0 for everything else and IGNORE_INDEX (255) for ignored pixels.
    """

    support_imgs: torch.Tensor  # (B, S, 3, H, W) float, normalised
    support_masks: torch.Tensor  # (B, S, H, W) long, 0/1/255
    query_img: torch.Tensor  # (B, 3, H, W) float, normalised
    query_mask: torch.Tensor  # (B, H', W') long, 0/1/255; H', W' = H, W except at `original` test resolution
    class_id: torch.Tensor  # (B,) long, dataset class id of the episode


class FSCSEpisode(NamedTuple):
    """One batch of N-way episodes of iFSL's FS-CS task (docs/protocol.md sections 3-4): N support classes,
    each present in the query or not. Only methods whose record says `fscs` take it.

    A support mask holds 1 for its own way's class; the query mask holds n for way n's class (1..N), 0 for
    everything else (a class absent from the query leaves no pixel n) and IGNORE_INDEX for ignored pixels.
    """

    support_imgs: torch.Tensor  # (B, N, S, 3, H, W) float, normalised
    support_masks: torch.Tensor  # (B, N, S, H, W) long, 0/1/255
    query_img: torch.Tensor  # (B, 3, H, W) float, normalised
    query_mask: torch.Tensor  # (B, H', W') long, 0..N / 255
    class_ids: torch.Tensor  # (B, N) long, dataset class id of each way
    presence: torch.Tensor  # (B, N) bool, whether way n's class is in the query (any pixel of the full mask)


class SegOutput(NamedTuple):
    """What every model returns, in train and eval alike."""

    logits: torch.Tensor  # (B, 2, H, W) background / foreground, pre-softmax; (B, 1 + N, H, W) on an FSCSEpisode
    aux_logits: list[torch.Tensor]  # intermediate predictions for deep supervision
    extra_losses: dict[str, torch.Tensor]  # method-specific losses, already weighted; diag_* = logged only
    presence: torch.Tensor | None = None  # (B, N) bool: FS-CS class presence, from methods whose record says `fscs`
