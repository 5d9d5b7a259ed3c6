"""RMT meta-memory: FAISS reads against the exact torch path, gradients, EMA writes, state round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fssmeta.models.memory import MetaMemory, instance_stats


def make_memory(index: str = "flat", seed: int = 0, **kwargs) -> MetaMemory:
    options = dict(num_items=64, channels=32, top_k=8, temperature=0.5, index=index, nlist=8)
    options.update(kwargs)
    return MetaMemory(generator=torch.Generator().manual_seed(seed), **options)


def random_stats(batch: int = 6, channels: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, generator=g), torch.rand(batch, channels, generator=g) + 0.5


def torch_twin(memory: MetaMemory) -> MetaMemory:
    """A torch-exact module with the same items."""
    twin = make_memory("torch", num_items=memory.num_items, channels=memory.channels, top_k=memory.top_k,
                       temperature=memory.temperature)
    twin.load_state_dict(memory.state_dict())
    return twin


def retrieved_ids(memory: MetaMemory, query: torch.Tensor, which: int) -> list[set[int]]:
    """The item ids FAISS retrieves per query row; `which` = 0 for the means index, 1 for the stds."""
    q = torch.nn.functional.normalize(query, dim=1).numpy()
    _, ids = memory._current_indexes()[which].search(q, memory.top_k)
    return [set(row.tolist()) for row in ids]


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_faiss_read_matches_torch_exact(index):
    memory = make_memory(index)
    exact = torch_twin(memory)
    mu, sigma = random_stats()
    for which, (query, items) in enumerate([(mu, memory.means), (sigma, memory.stds)]):
        sim = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(items, dim=1).t()
        torch_ids = [set(row.tolist()) for row in sim.topk(memory.top_k, dim=1).indices]
        assert retrieved_ids(memory, query, which) == torch_ids
    got, want = memory.read(mu, sigma), exact.read(mu, sigma)
    for a, b in zip(got, want):
        assert a.shape == (6, 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Not trivially equal: the memory style differs from the instance's own.
    assert not torch.allclose(got[0], mu, atol=1e-2)


@pytest.mark.parametrize("index", ["flat", "ivf", "torch"])
def test_gradients_reach_features(index):
    memory = make_memory(index)
    feat = torch.randn(3, 32, 5, 5, requires_grad=True)
    mu, sigma = instance_stats(feat)
    mu_mem, sigma_mem = memory.read(mu, sigma)
    (mu_mem.square().sum() + sigma_mem.sum()).backward()
    assert feat.grad is not None and torch.isfinite(feat.grad).all() and feat.grad.abs().sum() > 0
    feat.grad = None
    memory.enhance(feat).square().mean().backward()
    assert torch.isfinite(feat.grad).all() and feat.grad.abs().sum() > 0
    assert memory.means.grad is None and memory.stds.grad is None


def test_write_hand_built_two_items():
    """Items e0, e1; instance 0 = 2 e0 (nearest item 0), instance 1 = 3 e1 (nearest item 1), temperature 1.

    Softmax over items per instance: instance 0 gives item 0 weight a = e/(1+e), item 1 weight 1 - a;
    instance 1 the reverse. Item 0's weights over the batch (a, 1 - a) already sum to 1.
    """
    lam = 0.9
    memory = MetaMemory(num_items=2, channels=2, momentum=lam, top_k=2, temperature=1.0)
    memory.means.copy_(torch.eye(2))
    memory.stds.copy_(torch.eye(2))
    mu = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    a = math.e / (1 + math.e)
    memory.write(mu, mu.clone())
    expected_item0 = lam * torch.tensor([1.0, 0.0]) + (1 - lam) * (a * mu[0] + (1 - a) * mu[1])
    expected_item1 = lam * torch.tensor([0.0, 1.0]) + (1 - lam) * ((1 - a) * mu[0] + a * mu[1])
    torch.testing.assert_close(memory.means[0], expected_item0)
    torch.testing.assert_close(memory.means[1], expected_item1)
    # The nearest item moved towards its instance: item 0's e0 component grew (1 -> 0.9 + 0.1 * 2a).
    assert memory.means[0, 0] > 1.0
    # The stds follow the same rule with their own similarities (here the same numbers).
    torch.testing.assert_close(memory.stds, memory.means)


def test_write_gather_and_invariants():
    memory = make_memory()
    mu, sigma = random_stats()
    weights = memory._write_weights(mu, memory.means)
    assert weights.shape == (64, 6)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(64))
    # A gather that concatenates two identical ranks gives the same write as one process.
    twin = copy.deepcopy(memory)
    calls = []

    def gather(t):
        calls.append(t.shape)
        return torch.cat([t, t])

    memory.write(mu, sigma)
    twin.write(mu, sigma, gather=gather)
    assert calls == [(6, 32), (6, 32)]
    torch.testing.assert_close(memory.means, twin.means)
    torch.testing.assert_close(memory.stds, twin.stds)
    assert (memory.stds > 0).all()


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_index_follows_writes(index):
    memory = make_memory(index)
    mu, sigma = random_stats()
    before = memory.read(mu, sigma)
    stale_indexes = memory._current_indexes()
    for step in range(3):
        memory.write(*random_stats(seed=10 + step))
    assert memory._current_indexes() is not stale_indexes
    after = memory.read(mu, sigma)
    assert not torch.allclose(before[0], after[0])
    for a, b in zip(after, torch_twin(memory).read(mu, sigma)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_state_dict_round_trip(index):
    memory = make_memory(index, seed=0)
    memory.write(*random_stats(seed=3))
    mu, sigma = random_stats()
    fresh = make_memory(index, seed=99)
    fresh.read(mu, sigma)  # builds the fresh module's index from its own items, which load must replace
    assert set(fresh.state_dict()) == {"means", "stds", "filled"}
    fresh.load_state_dict(memory.state_dict())
    for a, b in zip(fresh.read(mu, sigma), memory.read(mu, sigma)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_enhance_alpha_one_is_identity_and_eval_does_not_write():
    feat = torch.randn(2, 32, 6, 6)
    identity = make_memory(alpha=1.0)
    torch.testing.assert_close(identity.enhance(feat), feat, atol=1e-5, rtol=1e-5)
    memory = make_memory(alpha=0.5).eval()
    means, stds = memory.means.clone(), memory.stds.clone()
    out = memory.enhance(feat)
    assert out.shape == feat.shape and not torch.allclose(out, feat, atol=1e-3)
    assert torch.equal(memory.means, means) and torch.equal(memory.stds, stds)
    # The restyled feature carries the mixed statistics.
    mu, sigma = instance_stats(feat)
    mu_mem, _ = memory.read(mu, sigma)
    torch.testing.assert_close(out.mean(dim=(2, 3)), 0.5 * mu + 0.5 * mu_mem, atol=1e-5, rtol=1e-5)


def test_test_alpha_restyles_target_features_toward_source_statistics():
    """A bank filled from a 'source' with strong features; a weak, shifted 'target' feature in eval mode moves
    toward the source's statistics, the more the lower test_alpha; training keeps alpha."""
    source = torch.randn(16, 32, 6, 6) * 3.0 + 2.0
    target = torch.randn(2, 32, 6, 6) * 0.3 - 1.0
    memory = make_memory(alpha=0.5, init="source")
    memory.write(*instance_stats(source))  # the first write fills the bank from these statistics
    src_mu, src_sigma = (s.mean(0) for s in instance_stats(source))

    def distance(feat: torch.Tensor) -> float:
        mu, sigma = instance_stats(feat)
        return float((mu - src_mu).norm() + (sigma - src_sigma).norm())

    memory.eval()
    distances = {}
    for test_alpha in (None, 0.0, 1.0):
        memory.test_alpha = test_alpha
        distances[test_alpha] = distance(memory.enhance(target))
    assert distances[1.0] == pytest.approx(distance(target), rel=1e-4)  # 1: the target unchanged
    assert distances[0.0] < 0.5 * distances[None] < 0.5 * distance(target)
    # honoured only in eval mode: training restyles at alpha whatever test_alpha says
    memory.train()
    memory.test_alpha = 0.0
    mu, sigma = instance_stats(target)
    mu_mem, _ = memory.read(mu, sigma)
    torch.testing.assert_close(memory.enhance(target).mean(dim=(2, 3)), 0.5 * mu + 0.5 * mu_mem,
                               atol=1e-4, rtol=1e-4)


def test_source_init_fills_the_items_from_the_first_write_then_blends():
    memory = make_memory(init="source")
    assert not bool(memory.filled)
    mu, sigma = random_stats(batch=6, seed=5)
    memory.write(mu, sigma)
    assert bool(memory.filled)
    # every item is a (jittered) copy of one instance's statistics, not the random start
    nearest = torch.cdist(memory.means, mu).min(1).values
    assert float(nearest.max()) < 0.5 * float(torch.cdist(make_memory().means, mu).min(1).values.min())
    assert float(memory.stds.min()) > 0
    assert len({tuple(row.tolist()) for row in memory.means}) == memory.num_items  # distinguishable
    before = memory.means.clone()
    memory.write(*random_stats(batch=6, seed=6))  # later writes are the EMA
    torch.testing.assert_close(memory.means, 0.9 * before + 0.1 * memory._write_weights(
        random_stats(batch=6, seed=6)[0], before) @ random_stats(batch=6, seed=6)[0], atol=1e-5, rtol=1e-5)
    assert bool(make_memory(init="random").filled)  # random items count as filled: the first write blends


def test_a_checkpoint_without_the_filled_buffer_loads_as_filled():
    from fssmeta.checkpoint import load_model_state

    trained = make_memory(init="random")
    state = {k: v for k, v in trained.state_dict().items() if k != "filled"}  # an earlier release's bank
    fresh = make_memory(init="source")
    load_model_state(fresh, state, "old.pt")
    assert bool(fresh.filled) and torch.equal(fresh.means, trained.means)


def test_orthogonality_loss():
    memory = MetaMemory(num_items=4, channels=4)
    memory.means.copy_(torch.diag(torch.tensor([1.0, -2.0, 3.0, 0.5])))
    memory.stds.copy_(torch.eye(4) * 2)
    assert memory.orthogonality_loss().item() == pytest.approx(0.0, abs=1e-7)
    memory.means.copy_(torch.ones(4, 4))
    memory.stds.copy_(torch.ones(4, 4))
    assert memory.orthogonality_loss().item() == pytest.approx(3 / 4, abs=1e-6)
    assert make_memory().orthogonality_loss().item() > 0


def test_rejects_unknown_index():
    with pytest.raises(ValueError, match="index"):
        MetaMemory(num_items=4, channels=4, index="hnsw")
