"""Meta-memory writes under a real 2-process gloo group: gathered writes keep every rank's bank identical, and
equal to one process writing the concatenated batches; `all_gather_cat` across ranks of different batch sizes.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fssmeta.distributed import all_gather_cat, rank, world_size
from fssmeta.models.memory import MetaMemory

WORLD_SIZE = 2
BATCH_SIZES = (3, 5)  # per rank: the gather must cope with ranks of different batch sizes
STEPS = 4
CHANNELS = 16


def make_memory() -> MetaMemory:
    # The same seed on every rank, as a training run builds the bank before the first step; the first write
    # fills the items from the gathered statistics (init: source), which must agree across ranks too.
    return MetaMemory(num_items=32, channels=CHANNELS, top_k=4, temperature=0.5, init="source",
                      generator=torch.Generator().manual_seed(0))


def local_batch(step: int, rank_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank_id`'s (B_r, C) style statistics at `step`; the parent rebuilds them for the reference."""
    g = torch.Generator().manual_seed(1000 * step + rank_id)
    B = BATCH_SIZES[rank_id]
    return torch.randn(B, CHANNELS, generator=g), torch.rand(B, CHANNELS, generator=g) + 0.5


def gather_probe(rank_id: int, rows: int) -> torch.Tensor:
    """(rows, 2) values that name their rank and row, so the gathered order can be read off."""
    return torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * rank_id


def _worker(rank_id: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank_id,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        assert (rank(), world_size()) == (rank_id, WORLD_SIZE)
        shared, local_only = make_memory(), make_memory()
        for step in range(STEPS):
            mu, sigma = local_batch(step, rank_id)
            shared.write(mu, sigma, gather=all_gather_cat)
            local_only.write(mu, sigma)
        gathered = all_gather_cat(gather_probe(rank_id, BATCH_SIZES[rank_id]))
        # Rank 0 contributes nothing: an empty local batch must still take part in the collective.
        gathered_empty_first = all_gather_cat(gather_probe(rank_id, 0 if rank_id == 0 else 2))
        torch.save({"shared": shared.state_dict(), "local_only": local_only.state_dict(), "gathered": gathered,
                    "gathered_empty_first": gathered_empty_first}, Path(out) / f"rank{rank_id}.pt")
    finally:
        dist.destroy_process_group()


def test_all_gather_cat_one_process_returns_input():
    t = torch.randn(3, 4)
    assert all_gather_cat(t) is t


def test_gathered_writes_agree_across_ranks_and_with_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    # all_gather_cat: every rank holds every rank's rows, in rank order, with each rank's own batch size.
    want = torch.cat([gather_probe(r, BATCH_SIZES[r]) for r in range(WORLD_SIZE)])
    want_empty_first = torch.cat([gather_probe(0, 0), gather_probe(1, 2)])
    for result in results:
        assert torch.equal(result["gathered"], want)
        assert torch.equal(result["gathered_empty_first"], want_empty_first)

    # Both ranks end with the same bank...
    shared = [result["shared"] for result in results]
    assert set(shared[0]) == {"means", "stds", "filled"} and bool(shared[0]["filled"])
    for key in ("means", "stds"):
        assert torch.equal(shared[0][key], shared[1][key])

    # ...equal to one process writing the concatenated batches (rank order) with no gather.
    reference, initial = make_memory(), make_memory()
    for step in range(STEPS):
        batches = [local_batch(step, r) for r in range(WORLD_SIZE)]
        reference.write(torch.cat([mu for mu, _ in batches]), torch.cat([sigma for _, sigma in batches]))
    for key in ("means", "stds"):
        # Bitwise equal on the machines tried; a tolerance, as the sum over the batch may be reordered.
        torch.testing.assert_close(shared[0][key], reference.state_dict()[key], atol=1e-6, rtol=1e-6)
        # Not vacuous: the writes moved the bank away from its initial items.
        assert not torch.allclose(shared[0][key], initial.state_dict()[key], atol=1e-3)

    # Without the gather each rank would have written only its own batch, and the banks would diverge.
    local = [result["local_only"] for result in results]
    for key in ("means", "stds"):
        assert not torch.allclose(local[0][key], local[1][key], atol=1e-4)
        for r in range(WORLD_SIZE):
            assert not torch.allclose(local[r][key], shared[0][key], atol=1e-4)
