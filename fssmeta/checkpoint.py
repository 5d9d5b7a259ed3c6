"""Checkpoints: everything a resume needs (model, optimizer, scheduler, step, RNG states, config), saved
atomically and loaded safely with `torch.load(weights_only=True)`."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fssmeta.data.io import atomic_path

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


def rng_state() -> dict[str, Any]:
    """Every global RNG the loop touches, in types `weights_only` loading accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int = 0, epoch: int = 0, config: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint to `path` via a temporary file, so a crash never leaves a half-written one."""
    payload = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "epoch": epoch,
        "rng": rng_state(),
        "config": config or {},
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded on CPU with `weights_only=True` (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on a bad file
        raise CheckpointError(f"{path}: not a safe fssmeta checkpoint: corrupt, or it holds objects other than "
                              f"tensors and plain data ({type(exc).__name__}: {_load_failure(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise CheckpointError(f"{path}: not a fssmeta checkpoint (format {FORMAT} with a 'model' entry expected)")
    return payload


def _load_failure(exc: Exception) -> str:
    """What torch found wrong, without its advice to retry with `weights_only=False` (which runs code from the
    file) or to allowlist the file's classes: neither is right for a file that should hold only tensors."""
    message = str(exc)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    message = message.split("Please use `torch.serialization", 1)[0].split("Check the documentation of torch.load", 1)[0]
    lines = [line.strip() for line in message.splitlines() if line.strip() and "weights_only" not in line]
    return " ".join(lines) or "unreadable"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load strictly; a mismatch names the checkpoint and the first missing / unexpected / mis-shaped keys.

    A module's `legacy_buffers` ({buffer name: value}) are buffers added after checkpoints existed: a state
    dict without them loads with that value (what such a checkpoint means)."""
    own = model.state_dict()
    state = dict(state)
    for prefix, module in model.named_modules():
        for name, value in getattr(module, "legacy_buffers", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            if key in own and key not in state:
                state[key] = torch.tensor(value, dtype=own[key].dtype)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
        raise CheckpointError(f"{source}: checkpoint does not match the model (was it trained with other "
                              f"model params?) — " + "; ".join(parts))
    model.load_state_dict(state)


def restore(payload: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None, restore_rng: bool = True, source: str | Path = "<checkpoint>") -> dict[str, Any]:
    """Load a checkpoint payload (from a file, or one Ray handed back) into the given objects; return it."""
    load_model_state(model, payload["model"], source)
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload


def resume(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
           scheduler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load the checkpoint file at `path` into the given objects and return the rest of it (step, epoch, ...)."""
    return restore(read_checkpoint(path), model=model, optimizer=optimizer, scheduler=scheduler,
                   restore_rng=restore_rng, source=path)
