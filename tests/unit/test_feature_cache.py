"""The evaluation feature cache (models/feature_cache.py): logits torch.equal with and without it for every
method and the flagship, on episodes that reuse images; its bound; no use in training; the evaluation-level
meter; the config rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fssmeta import evaluation
from fssmeta.config import Config, ConfigError, EvalConfig, MemoryConfig, MiningConfig
from fssmeta.data.transforms import TestTransform
from fssmeta.episode import Episode
from fssmeta.models import METHODS, build_model
from fssmeta.models.feature_cache import FeatureCache, caching, digest
from fssmeta.params import load_config
from tests.unit.test_models import PASCAL_FOLD0_BASE, SIZE, tiny_cfg

SHOT = 2
# (query, [(support image, support mask), ...]): the same query twice, a support image with another mask, a
# support image as a query, and a support (image, mask) pair seen before.
PLAN = [(0, [(1, 0), (2, 1)]), (0, [(1, 2), (3, 1)]), (1, [(0, 0), (2, 1)])]
VARIANTS = {**{key: {} for key in METHODS},
            "flagship": {"memory": MemoryConfig(enabled=True, items=16, top_k=4), "mining": MiningConfig(enabled=True)}}


def make_model(variant: str) -> nn.Module:
    torch.manual_seed(0)
    method = "bam" if variant == "flagship" else variant
    return build_model(tiny_cfg(method, **VARIANTS[variant]), shot=SHOT, base_classes=PASCAL_FOLD0_BASE).eval()


def episodes() -> list[Episode]:
    """Batch-1 episodes of PLAN; every tensor a fresh copy, so only content can match."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.long)
    for i, (top, left) in enumerate([(5, 5), (20, 30), (35, 10)]):
        masks[i, top : top + 25, left : left + 25] = 1
    masks[:, 0] = 255
    return [Episode(torch.stack([images[i] for i, _ in shots])[None].clone(),
                    torch.stack([masks[m] for _, m in shots])[None].clone(), images[q][None].clone(),
                    masks[0][None].clone(), torch.tensor([3])) for q, shots in PLAN]


@torch.no_grad()
def logits(model: nn.Module, cache: FeatureCache | None = None) -> list[torch.Tensor]:
    with caching(model, cache):
        return [model(ep).logits for ep in episodes()]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_equal_the_uncached(variant: str):
    model = make_model(variant)
    plain, cache = logits(model), FeatureCache(2**30)
    cached = logits(model, cache)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert cache.hits > 0 and cache.evictions == 0 and cache.bytes > 0
    assert getattr(model, "feature_cache", None) is None  # `caching` restores the model


def test_the_bound():
    model = make_model("bam")
    plain, tiny = logits(model), FeatureCache(1)
    assert all(torch.equal(a, b) for a, b in zip(plain, logits(model, tiny), strict=True))
    assert tiny.hits == 0 and tiny.misses > 0 and tiny.bytes == 0 and not tiny.entries  # nothing fits: none stored
    full = FeatureCache(2**30)
    logits(model, full)
    small = FeatureCache(full.bytes // 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, logits(model, small), strict=True))
    assert small.evictions > 0 and 0 < small.bytes <= small.max_bytes


def test_digest_is_content_shape_and_dtype():
    x = torch.arange(12.0)
    assert digest(x) == digest(x.clone()) == digest(x.view(3, 4).t().t().reshape(-1))
    assert len({digest(x), digest(x.view(3, 4)), digest(x.to(torch.float64)), digest(x + 1)}) == 4
    assert digest(x.view(3, 4).t()) == digest(x.view(3, 4).t().contiguous())  # a strided view hashes its values


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_mode_never_touches_the_cache(variant: str):
    model, cache = make_model(variant).train(), FeatureCache(2**30)
    logits(model, cache)
    assert cache.stats() == FeatureCache(2**30).stats()  # no hit, no miss, nothing held


class MemorySource:
    """In-memory images of various sizes with class-id masks (classes 1..2), as a PairSource."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.items = {}
        for i, (h, w) in enumerate([(60, 70), (64, 50), (48, 64), (70, 60)]):
            mask = np.zeros((h, w), np.uint8)
            mask[5:30, 10:40] = 1 + i % 2
            mask[30:45, 20:35] = 2 - i % 2
            self.items[str(i)] = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask)

    def load(self, key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.items[key]
        return image, (mask == class_id).astype(np.uint8)


def test_scoring_with_the_cache_gives_the_same_meter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    lists = {seed: tmp_path / f"seed{seed}.json" for seed in (0, 1)}
    for seed, path in lists.items():
        order = np.random.default_rng(seed).permutation(4).tolist()
        eps = [{"query": str(q), "supports": [str(s) for s in order if s != q][:SHOT], "class_id": 1 + (q + k) % 2}
               for k, q in enumerate(order + order)]
        path.write_text(json.dumps({"episodes": eps}))
    model = make_model("bam")
    meters, caches = [], []
    real = evaluation.evaluate

    def spy(m: nn.Module, *args, **kwargs):
        caches.append(getattr(m, "feature_cache", None))
        meters.append(real(m, *args, **kwargs))
        return meters[-1]

    monkeypatch.setattr(evaluation, "evaluate", spy)
    transform = TestTransform("original", SIZE, canvas="bam")
    scores = {}
    for mib in (0, 64):
        cfg = Config(eval=EvalConfig(test_size=SIZE, feature_cache_mib=mib))
        scores[mib] = evaluation.score_lists(cfg, model, lists, MemorySource(), transform, 2, False, "test")
    # uncached: one call per seed list; cached: one per non-empty (class, seed), class-major, one cache per model
    episodes = {seed: json.loads(path.read_text())["episodes"] for seed, path in lists.items()}
    chunks = [(c, seed) for c in (1, 2) for seed in (0, 1) if any(ep["class_id"] == c for ep in episodes[seed])]
    assert caches[:2] == [None, None] and len(caches) == 2 + len(chunks)
    assert all(c is caches[2] for c in caches[2:]) and caches[2].hits > 0
    # the per-seed meters, merged over the classes, give exactly the uncached sums (mIoU, FB-IoU, per class)
    merged = {seed: sum(m.state() for m, (_, s) in zip(meters[2:], chunks, strict=True) if s == seed)
              for seed in (0, 1)}
    assert all(torch.equal(meters[seed].state(), merged[seed]) for seed in (0, 1))
    assert scores[0] == scores[64]
    assert getattr(model, "feature_cache", None) is None


def test_the_cache_needs_batch_one():
    with pytest.raises(ConfigError, match=r"eval\.feature_cache_mib 1024 needs eval\.batch_size 1 \(got 4\)"):
        load_config(None, ["eval.batch_size=4"])
    assert load_config(None, ["eval.batch_size=4", "eval.feature_cache_mib=0"]).eval.batch_size == 4
