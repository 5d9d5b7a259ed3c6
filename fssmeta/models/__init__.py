"""Models: backbones, the stage-1 PSPNet, the PFENet-family front end and parts (memory, mining, BAM's
ensemble), and one file per method, each with its `METHOD` record."""

from __future__ import annotations

from torch import nn

from fssmeta.config import ModelConfig
from fssmeta.models import bam, baseline, ntrenet, pfenet
from fssmeta.models.method import Method

# The one list of methods: key = `model.method` in params.yaml (and `fssmeta evaluate --method`). Adding a
# method = its file with a `METHOD` record + one line here + its `model.<key>` section (docs/methods.md).
METHODS: dict[str, Method] = {
    m.key: m for m in (pfenet.METHOD, bam.METHOD, ntrenet.METHOD, baseline.METHOD)
}


def get_method(key: str) -> Method:
    """The record of `key`; an unknown key is a ValueError naming `model.method` and the known ones."""
    if key not in METHODS:
        raise ValueError(f"model.method: unknown method {key!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def build_model(cfg: ModelConfig, *, shot: int, base_classes: list[int], method: str | None = None) -> nn.Module:
    """Build `method` (default `cfg.method`) for `shot`-shot episodes with random (or `cfg.weights`) backbone
    weights and its typed options; no device is chosen and nothing of stage 1 is loaded here."""
    record = get_method(method or cfg.method)
    return record.build(cfg, record.options_of(cfg), shot=shot, base_classes=list(base_classes))


def count_learnable(model: nn.Module) -> int:
    """Parameters with requires_grad; `parameters()` already yields a shared tensor once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
