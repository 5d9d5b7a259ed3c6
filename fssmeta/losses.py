"""Losses: the segmentation loss the PFENet family shares and the loss dicts the training loop sums.

A leaf of the package (it imports only `episode`): a method's record names its loss function (`Method.loss`),
and models compute their own deep-supervision terms with `cross_entropy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fssmeta.episode import DIAGNOSTIC_PREFIX, IGNORE_INDEX, Episode, SegOutput


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The minimised sum: every term except the diagnostics."""
    return sum(v for k, v in losses.items() if not k.startswith(DIAGNOSTIC_PREFIX))


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True, as the PFENet family upsamples predictions to the label size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel CE with 255 ignored; logits are resized to the target first. (B,K,h,w), (B,H,W) -> scalar."""
    return F.cross_entropy(resize_logits(logits, target.shape[-2:]).float(), target.long(), ignore_index=IGNORE_INDEX)


def segmentation_loss(output: SegOutput, target: torch.Tensor, aux_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """CE(main) + aux_weight * mean CE(aux): PFENet (4 scale heads) and BAM (the meta head) alike."""
    losses = {"ce": cross_entropy(output.logits, target)}
    if output.aux_logits:
        aux = torch.stack([cross_entropy(a, target) for a in output.aux_logits]).mean()
        losses["aux"] = aux_weight * aux
    return losses


def episode_losses(model: torch.nn.Module, episode: Episode, aux_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Everything a meta-training step minimises: the shared loss plus the method's own (already weighted)."""
    output = model(episode)
    return {**segmentation_loss(output, episode.query_mask, aux_weight), **output.extra_losses}


def base_losses(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                aux_weight: float = 0.4) -> dict[str, torch.Tensor]:
    """PSPNet base-learner stage: supervised CE on base classes + 0.4 x the layer3 auxiliary CE (PSPNet)."""
    image, label = batch
    return segmentation_loss(model(image), label, aux_weight)
