"""Models: backbones, the stage-1 PSPNet, the PFENet-family front end and parts (memory, mining, BAM's
ensemble), and one file per method, each with its `METHOD` record."""

from __future__ import annotations

from importlib import import_module

from torch import nn

from fssmeta.config import ModelConfig
from fssmeta.models.method import Method

# The one list of methods, one line each: the file under fssmeta/models/ whose `METHOD` record registers it.
# Adding a method = its file + one line here + its `model.<key>` options section (README, "Adding a method").
METHOD_FILES = (
    "pfenet",
    "bam",
    "ntrenet",
    "crnet",
    "hdmnet",
    "sccan",
    "hsnet",
    "asnet",
    "baseline",
)
METHODS: dict[str, Method] = {
    record.key: record for record in (import_module(f"fssmeta.models.{name}").METHOD for name in METHOD_FILES)
}


PARTS = ("memory", "mining")  # the model parts a params switch turns on (models/memory.py, models/mining.py)


def get_method(key: str) -> Method:
    """The record of `key`; an unknown key is a ValueError naming `model.method` and the known ones."""
    if key not in METHODS:
        raise ValueError(f"model.method: unknown method {key!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def build_model(cfg: ModelConfig, *, shot: int, base_classes: list[int], method: str | None = None) -> nn.Module:
    """Build `method` (default `cfg.method`) for `shot`-shot episodes with random (or `cfg.weights`) backbone
    weights and its typed options; no device is chosen and nothing of stage 1 is loaded here."""
    record = get_method(method or cfg.method)
    for part in PARTS:  # a switch the method would not read is an error, never silently ignored
        if record.learned and getattr(cfg, part).enabled and part not in record.parts:
            takers = ", ".join(sorted(k for k, m in METHODS.items() if part in m.parts))
            raise ValueError(f"model.{part}.enabled: {record.key} takes no {part} part (methods that do: {takers}); "
                             f"set model.{part}.enabled: false")
    return record.build(cfg, record.options_of(cfg), shot=shot, base_classes=list(base_classes))


def count_learnable(model: nn.Module) -> int:
    """Parameters with requires_grad; `parameters()` already yields a shared tensor once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
