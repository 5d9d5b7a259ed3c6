"""One training loop for one process and for DDP: `train_step`, `evaluate`, `fit`, and the optimiser recipes.

Ray Train runs this same `fit`; only the model wrapping (`forward_model`), the loaders' per-rank seeding and
the `reporter` differ. Every rank calls the reporter at the same points (once per epoch); only rank 0 writes
checkpoints and passes their path.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from fssmeta import distributed
from fssmeta.checkpoint import save_checkpoint
from fssmeta.config import SGD_RECIPE, OptimConfig
from fssmeta.data.io import write_json_atomic
from fssmeta.episode import Episode, FSCSEpisode, SegOutput
from fssmeta.losses import resize_logits, total_loss
from fssmeta.metrics import IoUMeter
from fssmeta.models.method import LossFn, OptimizerSpec


class Reporter(Protocol):
    """Called on every rank after every epoch with the epoch's metrics; `checkpoint` is set on rank 0 only."""

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None) -> None: ...


def build_optimizer(params: Iterable[nn.Parameter] | list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (PFENet family), Adam (HSNet family) or AdamW from a recipe; unset keys take `SGD_RECIPE`'s.

    `params` are parameters or param groups (dicts with `params` and an optional `lr_scale`: that group trains
    at lr x lr_scale)."""
    cfg = cfg.resolved(SGD_RECIPE)
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": cfg.lr * g.get("lr_scale", 1.0),
               "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no learnable parameters to optimise")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _NamedSet:
    """Several named optimisers or schedulers stepped and saved as one (a method with two optimisers, e.g.
    SCCAN's): one state dict keyed by name."""

    def __init__(self, members: dict[str, Any]) -> None:
        self.members = members

    def step(self) -> None:
        for member in self.members.values():
            member.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: member.state_dict() for name, member in self.members.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.members):
            raise ValueError(f"state for {sorted(state)}, expected {sorted(self.members)}")
        for name, member in self.members.items():
            member.load_state_dict(state[name])


class OptimizerSet(_NamedSet):
    """Optimisers as the loop sees one: also `zero_grad` and `param_groups` (all of them)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.members.values() for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.members.values():
            o.zero_grad(set_to_none=set_to_none)


class SchedulerSet(_NamedSet):
    """The schedulers of an `OptimizerSet`."""


def build_optimization(specs: list[OptimizerSpec], total_steps: int) -> tuple[Any, Any]:
    """A method's optimisers and their schedulers: one spec gives a plain torch optimiser and scheduler
    (checkpoints as before), several give an `OptimizerSet` / `SchedulerSet`."""
    optimizers = {spec.name: build_optimizer(spec.param_groups, spec.recipe) for spec in specs}
    schedulers = {spec.name: build_scheduler(optimizers[spec.name], spec.recipe, total_steps) for spec in specs}
    if len(specs) == 1:
        return optimizers[specs[0].name], schedulers[specs[0].name]
    return OptimizerSet(optimizers), SchedulerSet(schedulers)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then poly decay lr * (1 - t / T) ** power (power 0 = constant), stepped per iteration."""
    cfg = cfg.resolved(SGD_RECIPE)
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(1.0 - step / total, 0.0) ** cfg.power if cfg.power > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (Episode, FSCSEpisode)):
        return type(batch)(*(t.to(device, non_blocking=True) for t in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), which makes CPU autocast pay."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_enabled(device: torch.device, amp: bool | str) -> bool:
    """Whether bf16 autocast runs on `device` under `amp` (config.Amp: off / cuda / all; True = cuda)."""
    mode = {True: "cuda", False: "off"}[amp] if isinstance(amp, bool) else amp
    if device.type == "cuda":
        return mode != "off"
    return mode == "all" and device.type == "cpu" and cpu_computes_bf16()


def autocast(device: torch.device, amp: bool | str) -> torch.autocast:
    """bf16 autocast on `device` where `amp_enabled`; otherwise a context that also switches off an outer
    autocast, so fp32 means fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_enabled(device, amp))


def train_step(model: nn.Module, batch: Any, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               scheduler: Any = None, *, amp: bool | str = False, grad_clip: float = 0.0) -> dict[str, float]:
    """One optimisation step on one batch; returns every loss term and their sum as floats."""
    device = next(p for p in model.parameters()).device
    with autocast(device, amp):
        losses = loss_fn(model, batch)
    total = total_loss(losses)
    if not torch.isfinite(total):
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss ({values}); lower the learning rate (train.optim.lr) "
                                 "or check the data. The last checkpoint is kept.")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": total.item(), **{k: v.item() for k, v in losses.items()}}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Episode], num_classes: int, *, amp: bool | str = False,
             progress: bool = False, desc: str = "eval", limit: int = 0,
             score_logits: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] = resize_logits) -> IoUMeter:
    """Score fixed episodes: logits mapped to the query mask's size by `score_logits` (the test transform's
    `TestTransform.score_logits`; by default a plain upsampling), argmax, class-wise accumulated IoU.

    The sums are reduced across ranks, so every rank returns the same meter.
    """
    meter = IoUMeter(num_classes)

    def score(output: SegOutput, episode: Episode) -> None:
        pred = score_logits(output.logits.float(), tuple(episode.query_mask.shape[-2:])).argmax(dim=1)
        meter.update(pred, episode.query_mask, episode.class_id)

    run_episodes(model, loader, score, amp=amp, progress=progress, desc=desc, limit=limit)
    meter.reduce_(distributed.all_reduce_sum)
    return meter


@torch.no_grad()
def run_episodes(model: nn.Module, loader: Iterable[Any], score: Callable[[SegOutput, Any], None], *,
                 amp: bool | str = False, progress: bool = False, desc: str = "eval", limit: int = 0) -> None:
    """The model in eval mode over `loader` (the first `limit` batches when > 0): `score(output, batch)` per
    batch, the batch on the model's device; the model's mode is restored after. The loop `evaluate` and the
    FS-CS scoring (fssmeta/fscs.py) share."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total = len(loader) if hasattr(loader, "__len__") else None
    total = min(limit, total) if limit and total is not None else total
    show = progress and distributed.is_main_process()
    for i, batch in enumerate(tqdm(loader, total=total, desc=desc, disable=not show, unit="ep", leave=False)):
        if limit and i >= limit:
            break
        batch = to_device(batch, device)
        with autocast(device, amp):
            output = model(batch)
        score(output, batch)
    model.train(was_training)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    step: int = 0


def fit(model: nn.Module, *, train_loader: Any, loss_fn: LossFn, optimizer: torch.optim.Optimizer, scheduler: Any,
        epochs: int, validate: Callable[[nn.Module], dict[str, float]] | None = None, score_key: str = "val_miou",
        checkpoint_dir: str | Path | None = None, config: dict[str, Any] | None = None,
        start: dict[str, Any] | None = None, reporter: Reporter | None = None,
        forward_model: nn.Module | None = None, amp: bool | str = False, grad_clip: float = 0.0,
        progress: bool = True, desc: str = "train") -> FitResult:
    """Train for `epochs`, validating, checkpointing (`last.pt`, `best.pt`, `history.json`) and reporting
    after every epoch. `model` is the raw module (its state is saved); `forward_model` (e.g. the DDP
    wrapper) is what runs the steps. `start` is a checkpoint payload to resume from."""
    forward_model = forward_model or model
    out = Path(checkpoint_dir) if checkpoint_dir else None
    extra = (start or {}).get("extra", {})
    result = FitResult(history=list(extra.get("history", [])), best_score=extra.get("best_score", -math.inf),
                       best_epoch=extra.get("best_epoch", -1), step=(start or {}).get("step", 0))
    first_epoch = (start or {}).get("epoch", 0)
    main = distributed.is_main_process()
    steps_per_epoch = len(train_loader)
    device = next(p for p in model.parameters()).device
    run_start = time.perf_counter()
    for epoch in range(first_epoch, epochs):
        if hasattr(train_loader, "dataset") and hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        forward_model.train()
        sums: dict[str, float] = {}
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", disable=not (progress and main),
                   unit="step", leave=False)
        for batch in bar:
            losses = train_step(forward_model, to_device(batch, device), loss_fn, optimizer, scheduler,
                                amp=amp, grad_clip=grad_clip)
            result.step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        metrics = {f"train_{k}": v / max(steps_per_epoch, 1) for k, v in sums.items()}
        metrics |= {"epoch": epoch + 1, "step": result.step, "lr": optimizer.param_groups[0]["lr"]}
        if validate is not None:
            metrics |= validate(model)
        score = metrics.get(score_key, -metrics["train_loss"])  # no validation: the lowest training loss
        improved = score > result.best_score
        if improved:
            result.best_score, result.best_epoch = score, epoch + 1
        result.history.append(metrics)
        elapsed = time.perf_counter() - run_start
        done = epoch + 1 - first_epoch
        metrics["eta_s"] = elapsed / done * (epochs - epoch - 1)
        checkpoint = None
        if out is not None and main:
            checkpoint = save_checkpoint(out / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                                         step=result.step, epoch=epoch + 1, config=config,
                                         extra={"history": result.history, "best_score": result.best_score,
                                                "best_epoch": result.best_epoch})
            if improved:
                shutil.copyfile(checkpoint, out / "best.pt.tmp")
                (out / "best.pt.tmp").replace(out / "best.pt")
            write_json_atomic(out / "history.json", {"history": result.history, "best_epoch": result.best_epoch,
                                                     "best_score": result.best_score, "score_key": score_key})
        if main and progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("epoch", "step", "eta_s"))
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: {shown} (ETA {metrics['eta_s']:.0f} s)")
        if reporter is not None:
            reporter(metrics, checkpoint)
    return result
