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


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (B_r, ...) tensor along dim 0, in rank order; the input itself in one process.

    Ranks may hold different B_r (the sizes are exchanged first). Not differentiable: for statistics
    (e.g. the meta-memory writes), so every rank ends with the same tensor.
    """
    if not is_distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    work = tensor.detach().to(device=device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([work.shape[0]], dtype=torch.long, device=device))
    largest = int(max(s.item() for s in sizes))
    padded = work.new_zeros((largest, *work.shape[1:]))
    padded[: work.shape[0]] = work
    chunks = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(chunks, padded)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes, strict=True)]).to(tensor.device)
