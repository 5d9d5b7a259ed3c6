"""BAM's base-and-meta ensemble as a reusable part (BAM; HDMNet reuses it): the Gram-distance calibration
psi, the k-shot weights, the base learner's "some base class is here" map and the two merges.

Follows chunbolang/BAM `model/BAM.py`; see docs/methods.md (BAM) for the equations.
"""

from __future__ import annotations

import torch
from torch import nn

from fssmeta.models import ops
from fssmeta.models.pspnet import PSPNet

# BAM's K-shot reweighting width (`kshot_trans_dim: 2` in every official config): 11 * 2 + shot parameters,
# i.e. the paper's +27 at 5 shots.
KSHOT_HIDDEN = 2


def pass_through_conv() -> nn.Conv2d:
    """A bias-free 1x1 conv from 2 maps to 1, initialised to output the first map (BAM's [1, 0] init)."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    return conv


@torch.no_grad()
def base_class_map(base_learner: PSPNet, query_layer4: torch.Tensor, base_classes: torch.Tensor,
                   class_id: torch.Tensor, exclude_own: bool) -> torch.Tensor:
    """(B, C4, h, w) query layer4 -> (B, 1, h, w) base-learner probability of any base class (`any_base_class`)."""
    prob = base_learner.classify(query_layer4).softmax(dim=1)[:, 1:]  # (B, nb, h, w)
    return any_base_class(prob, base_classes, class_id, exclude_own)


def any_base_class(prob: torch.Tensor, base_classes: torch.Tensor, class_id: torch.Tensor,
                   exclude_own: bool) -> torch.Tensor:
    """(B, nb, h, w) base-class probabilities -> (B, 1, h, w) probability of any base class.

    Channel i of `prob` is the i-th of the sorted `base_classes` (nb,). In training (`exclude_own`) the
    episode's own class is a base class the meta learner must find, so it is left out (else the ensemble
    would suppress the target); at test time the class is novel and all count.
    """
    if exclude_own:
        own = base_classes[None, :] == class_id[:, None]  # (B, nb); no match = nothing excluded
        prob = prob * (~own).to(prob.dtype)[:, :, None, None]
    return prob.sum(dim=1, keepdim=True)


class BaseMetaEnsemble(nn.Module):
    """The learnable part of BAM's ensemble: `gram_merge` (psi calibration of the meta probabilities, one conv
    shared by the bg and fg maps), `cls_merge` (meta bg + base map) and, above one shot, `kshot_rw`."""

    def __init__(self, shot: int = 1, *, kshot_weights: bool = True) -> None:
        super().__init__()
        self.shot = shot
        # p' = w0 * p + w1 * psi, starting at p' = p.
        self.gram_merge = pass_through_conv()
        # final bg = w0 * meta bg + w1 * base map, starting at the meta bg.
        self.cls_merge = pass_through_conv()
        if kshot_weights:
            self.add_kshot_weights()

    def add_kshot_weights(self) -> None:
        """Above one shot, the k-shot weighting MLP. A model may create it after its other modules
        (`kshot_weights=False`, then this), which keeps its random initialisation where BAM's official
        layer order puts it (BAM creates it last)."""
        if self.shot > 1:
            # Scores the sorted per-shot psi values; softmax of the scores weights the shots.
            self.kshot_rw = nn.Sequential(
                nn.Conv2d(self.shot, KSHOT_HIDDEN, 1), nn.ReLU(inplace=True), nn.Conv2d(KSHOT_HIDDEN, self.shot, 1)
            )

    def shot_psi(self, query_layer2: torch.Tensor, support_layer2: torch.Tensor) -> torch.Tensor:
        """psi per shot: how different the query's (B, C2, h, w) and each support's (B*S, C2, h, w) low-level
        styles are -> (B, S)."""
        B = query_layer2.shape[0]
        S = support_layer2.shape[0] // B
        query_gram = ops.gram_matrix(query_layer2).repeat_interleave(S, dim=0)  # once per query: (B*S, C2, C2)
        return ops.gram_psi(query_gram, ops.gram_matrix(support_layer2)).view(B, S)

    def shot_weights(self, psi: torch.Tensor) -> torch.Tensor:
        """(B, S) per-shot Gram distances -> (B, S) weights summing to 1 (all ones at 1 shot, as BAM)."""
        B, S = psi.shape
        if S == 1:
            return torch.ones_like(psi)
        if not hasattr(self, "kshot_rw"):
            return torch.full_like(psi, 1.0 / S)  # a 1-shot model on a k-shot episode: plain averaging
        if S != self.shot:
            raise ValueError(f"BAM was built for {self.shot} shots (kshot_rw), got an episode with {S}")
        sorted_psi, order = psi.sort(dim=1)  # the MLP sees shots ranked by similarity to the query
        scores = self.kshot_rw(sorted_psi.view(B, S, 1, 1)).view(B, S)
        scores = scores.gather(1, order.argsort(dim=1))  # back to the episode's shot order
        return scores.softmax(dim=1)

    def forward(self, meta_logits: torch.Tensor, psi: torch.Tensor, base_map: torch.Tensor) -> torch.Tensor:
        """(B, 2, h, w) meta logits, (B,) weighted psi, (B, 1, h, w) base map -> (B, 2, h, w) final maps.

        Calibrate the meta probabilities by psi, then let the base map lower the foreground through the
        background channel. The result is used as logits exactly as BAM does (its CE reads these maps).
        """
        B, _, h, w = meta_logits.shape
        meta_prob = meta_logits.softmax(dim=1)
        psi_map = psi.view(B, 1, 1, 1).expand(B, 1, h, w)
        meta_bg = self.gram_merge(torch.cat([meta_prob[:, :1], psi_map], 1))  # (B, 1, h, w)
        meta_fg = self.gram_merge(torch.cat([meta_prob[:, 1:], psi_map], 1))
        final_bg = self.cls_merge(torch.cat([meta_bg, base_map], 1))
        return torch.cat([final_bg, meta_fg], 1)
