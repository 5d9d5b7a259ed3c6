"""Distributed helpers that are no-ops in one process, so library code never branches on "am I distributed"."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks and return the sum (a copy; the input is left as it was).

    gloo reduces CPU tensors and nccl CUDA tensors: the sum travels on the device the backend wants.
    """
    if not is_distributed():
        return tensor.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    work = tensor.detach().to(device=device, copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
