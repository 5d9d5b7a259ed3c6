"""Models: backbones, the PSPNet base learner and one file per method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fssmeta.config import ModelConfig
from fssmeta.models import bam, ntrenet, pfenet

# The one list of methods: key = `model.method` in params.yaml, value = the method file's builder.
METHODS: dict[str, Callable[..., nn.Module]] = {"pfenet": pfenet.build, "bam": bam.build, "ntrenet": ntrenet.build}


def build_model(cfg: ModelConfig, *, base_classes: list[int]) -> nn.Module:
    """Build `cfg.method` with random (or `cfg.weights`) backbone weights; no device is chosen here."""
    if cfg.method not in METHODS:
        raise ValueError(f"model.method: unknown method {cfg.method!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method](cfg, base_classes=base_classes)


def count_learnable(model: nn.Module) -> int:
    """Parameters with requires_grad; `parameters()` already yields a shared tensor once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_base_learner(model: nn.Module, pspnet_state: dict[str, torch.Tensor]) -> None:
    """Copy a stage-1 PSPNet state dict into a meta model.

    A model with a `base_learner` (BAM) takes the whole dict; any other takes only the `backbone.*` keys into
    `model.backbone` (PFENet on the synthetic default, where no ImageNet weights exist and the stage-1
    encoder is the only trained feature extractor). Key or shape mismatches raise ValueError.
    """
    if hasattr(model, "base_learner"):
        target: nn.Module = model.base_learner
        state = dict(pspnet_state)
    else:
        target = model.backbone
        state = {k.removeprefix("backbone."): v for k, v in pspnet_state.items() if k.startswith("backbone.")}
    expected = target.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"shape {k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"load_base_learner: the PSPNet state dict does not fit {type(model).__name__}: {shown}")
    target.load_state_dict(state)
