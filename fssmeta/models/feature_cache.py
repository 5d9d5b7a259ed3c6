"""A bounded, content-keyed cache of frozen features for evaluation (`eval.feature_cache_mib`).

Fixed-list evaluation revisits the same few hundred images thousands of times; the frozen backbone (and
BAM's frozen base learner) give the same output for the same input bytes, so each distinct image's features
are computed once per model. Keys are content digests (`digest`), so a hit returns exactly what the
computation would have: logits are torch.equal to the uncached path. The contract holds at batch 1 in eval
mode (`active_cache`): a batched convolution may round differently from a batch of one, and in training
PFENet's BN convention updates the backbone's statistics. One cache serves one model under one precision
(`eval.amp`); `evaluation.score_lists` makes a fresh one per model. docs/protocol.md section 4.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fssmeta.episode import Episode

Value = torch.Tensor | tuple[torch.Tensor, ...]


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, shape and dtype (a CUDA tensor is copied to the CPU to hash). SHA-256,
    not blake2b: hashlib's runs on the CPU's SHA extensions, 2-3x faster on the hosts measured."""
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # a contiguous CPU tensor: no copy
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(flat.numpy())
    return h.hexdigest()


def nbytes(value: Value) -> int:
    """Bytes a value holds: sum of numel * element_size (its tensors are fresh outputs, not views)."""
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)


class FeatureCache:
    """An LRU of tensors (or tuples of tensors) bounded by `max_bytes`; values stay on their device.

    An entry larger than the bound is computed and returned but not stored.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, Value] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get_or_compute(self, key: Hashable, fn: Callable[[], Value]) -> Value:
        """The stored value of `key` (now the most recent), or `fn()` stored under it."""
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = fn()
        size = nbytes(value)
        if size > self.max_bytes:
            return value
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= nbytes(old)
            self.evictions += 1
        return value

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "entries": len(self.entries), "bytes": self.bytes, "hit_rate": self.hit_rate}

    def describe(self) -> str:
        """One line for the logs: hit rate, lookups, evictions and what is held."""
        return (f"feature cache: {100 * self.hit_rate:.1f}% hits of {self.hits + self.misses} lookups, "
                f"{self.evictions} evictions, {len(self.entries)} entries, {self.bytes / 2**20:.1f} MiB held")


def evaluation_cache(mib: int) -> FeatureCache | None:
    """The cache of one model's scoring run: `mib` MiB (`eval.feature_cache_mib`), or None when 0 (off)."""
    return FeatureCache(mib * 2**20) if mib else None


def active_cache(model: nn.Module, episode: Episode) -> FeatureCache | None:
    """The model's cache (set by `caching`) when it may be used: the model and its frozen backbone in eval
    mode and a batch of one episode; else None, and the model computes everything as without a cache."""
    cache = getattr(model, "feature_cache", None)
    if cache is None or model.training or model.backbone.training or episode.query_img.shape[0] != 1:
        return None
    return cache


@contextmanager
def caching(model: nn.Module, cache: FeatureCache | None) -> Iterator[FeatureCache | None]:
    """Let `model` read `cache` (None = no cache) inside the block; the previous setting is restored after."""
    previous = getattr(model, "feature_cache", None)
    model.feature_cache = cache
    try:
        yield cache
    finally:
        model.feature_cache = previous
