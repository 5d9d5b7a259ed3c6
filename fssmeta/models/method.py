"""The method record: everything the loop, the config, the stages and the tests must know of a method.

A method file defines one `METHOD = Method(...)`; `fssmeta.models.METHODS` maps keys to records. Nothing
outside the method file branches on which method runs: it reads the record (docs/methods.md, "Adding a
method").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from fssmeta.config import SGD_RECIPE, ConfigError, ModelConfig, OptimConfig
from fssmeta.losses import episode_losses

# build(model_cfg, options, *, shot, base_classes) -> the model, with random (or `model.weights`) backbone
# weights; no device chosen, nothing loaded from stage 1 (the stages do that through `Method.stage1`).
Builder = Callable[..., nn.Module]
LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Stage1:
    """What a method takes from its fold's stage-1 PSPNet (trained on the base classes by `train_base`):
    `base_learner` = the whole PSPNet into `model.base_learner` (BAM); `backbone` = its encoder into
    `model.backbone` (the PFENet family on the synthetic default, where no ImageNet weights exist)."""

    part: Literal["base_learner", "backbone"]

    def load(self, model: nn.Module, pspnet_state: dict[str, torch.Tensor]) -> None:
        """Copy the stage-1 state dict into `model`; key or shape mismatches raise ValueError."""
        target: nn.Module = getattr(model, self.part)
        if self.part == "base_learner":
            state = dict(pspnet_state)
        else:
            state = {k.removeprefix("backbone."): v for k, v in pspnet_state.items() if k.startswith("backbone.")}
        expected = target.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [f"shape {k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
                     for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            raise ValueError(f"stage 1: the PSPNet state dict does not fit {type(model).__name__}.{self.part}: {shown}")
        target.load_state_dict(state)


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimiser of a method: its parameter groups (dicts with `params` and an optional `lr_scale`, the
    group's learning rate = recipe lr x lr_scale) and its resolved recipe."""

    name: str
    param_groups: list[dict[str, Any]]
    recipe: OptimConfig


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def single_optimizer(model: nn.Module, recipe: OptimConfig) -> list[OptimizerSpec]:
    """The default: one optimiser, one group, every trainable parameter."""
    return [OptimizerSpec("main", [{"params": trainable(model)}], recipe)]


@dataclass(frozen=True)
class Reference:
    """A published learnable-parameter count and the configuration it is stated at."""

    count: int
    model: dict[str, Any]  # ModelConfig fields (method options as `<key>: {...}`) of the reference layout
    shot: int = 1
    base_classes: int = 15  # PASCAL-5i: 15 base classes per fold
    published: str = ""  # the paper's figure, e.g. "10.8M"


@dataclass(frozen=True)
class WeakLabels:
    """How a method trains on presence labels alone (`train.supervision: presence`, iFSL's weak labels): its
    loss, and the values of its `model.<key>` options under which no support mask reaches the learner."""

    loss: LossFn
    options: dict[str, Any]


@dataclass(frozen=True)
class Method:
    """One method. `key` is `model.method`; see each field's comment."""

    key: str
    build: Builder
    summary: str = ""
    options: type[BaseModel] | None = None  # the typed `model.<key>` section (a config.Section subclass)
    stage1: Stage1 | None = None  # None: the method starts from nothing of stage 1
    recipe: OptimConfig = SGD_RECIPE  # the keys `train.optim` leaves unset
    # (model, resolved recipe) -> its optimisers: several specs = several optimisers, several groups = LR groups
    optimizers: Callable[[nn.Module, OptimConfig], list[OptimizerSpec]] = single_optimizer
    transform: Literal["pfenet", "resize"] = "pfenet"  # training images: PFENet augmentation, or resized only
    trains_each_shot: bool = True  # False: trained 1-shot once, evaluated at every k with that checkpoint
    loss: LossFn = episode_losses  # (model, episode) -> the loss dict the loop sums (diag_* logged only)
    learned: bool = True  # False: nothing to train (the non-learned baseline)
    parts: frozenset[str] = frozenset()  # the family parts it takes: "memory" (model.memory), "mining" (model.mining)
    # The frozen backbone's BN while training, as the official trainer leaves it (`model.backbone_bn: method`):
    # "frozen" = eval mode (running statistics fixed, BAM's fix_bn), "train" = batch statistics and running
    # averages updated under no_grad (PFENet's and NTRENet's trainers, which never fix BN).
    backbone_bn: Literal["frozen", "train"] = "frozen"
    # The test canvas at `eval.resolution: original` under `eval.canvas: method` (docs/protocol.md section 4):
    # "pfenet" = PFENet's test_Resize (images up to the test size unscaled), "bam" = BAM's Resize.
    canvas: Literal["pfenet", "bam"] = "pfenet"
    tiny: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields of a fast 65-px test model
    reference: Reference | None = None
    # iFSL's FS-CS task: its forward takes N-way `FSCSEpisode`s (logits 1 + N channels and `presence`), so it
    # may be scored on `episodes.ways` > 1 lists and trained on FS-CS episodes (`train.task: fscs`).
    fscs: bool = False
    weak: WeakLabels | None = None  # training on presence labels (`train.supervision: presence`); None: it cannot

    def options_of(self, cfg: ModelConfig) -> BaseModel | None:
        """This method's typed options from `model.<key>` (defaults where absent; the loader, params.py,
        has already checked the section and names a bad key by its path)."""
        return None if self.options is None else self.options.model_validate(cfg.options(self.key))

    def bn_mode(self, cfg: ModelConfig) -> Literal["frozen", "train"]:
        """The backbone BN convention a run uses: `model.backbone_bn`, or this method's own for `method`."""
        return self.backbone_bn if cfg.backbone_bn == "method" else cfg.backbone_bn

    def test_canvas(self, setting: str) -> str:
        """The test canvas a run uses: `eval.canvas` (`setting`), or this method's own for `method`."""
        return self.canvas if setting == "method" else setting

    def stage1_for(self, cfg: ModelConfig) -> Stage1 | None:
        """What this run takes from the fold's stage 1: a base learner always; a backbone only with
        `model.backbone_source: stage1`. With `weights` the backbone is `model.weights`, which must be set
        (a randomly initialised frozen backbone would train nothing meaningful)."""
        if self.stage1 is None or self.stage1.part != "backbone" or cfg.backbone_source == "stage1":
            return self.stage1
        if not cfg.weights:
            raise ConfigError(f"model.backbone_source: `weights` (the official frozen ImageNet backbone of "
                              f"{self.key}) needs model.weights, a local weights file; set "
                              "model.backbone_source: stage1 to borrow the fold's stage-1 PSPNet encoder instead")
        return None

    def training_shot(self, shot: int) -> int:
        """The shots of the training episodes (and of the checkpoint) behind an evaluation at `shot`."""
        return shot if self.trains_each_shot else 1

    def training_recipe(self, optim: OptimConfig, method_optim: dict[str, OptimConfig] | None = None,
                        ) -> OptimConfig:
        """`optim` (a run's `train.optim`) over `method_optim[key]` (`train.method_optim`, when it names this
        method) over this method's recipe."""
        recipe = self.recipe
        if method_optim and self.key in method_optim:
            recipe = method_optim[self.key].resolved(recipe)
        return optim.resolved(recipe)

    def training_loss(self, supervision: str) -> LossFn:
        """The loss of `train.supervision`: `loss` on masks, the weak-label loss on presence."""
        return self.loss if supervision == "mask" or self.weak is None else self.weak.loss
