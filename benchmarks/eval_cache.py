"""Fixed-list evaluation with and without the frozen-feature cache (`eval.feature_cache_mib`,
fssmeta/models/feature_cache.py): episodes/s both ways, the speedup, the hit rate, and a check that the
meters are identical.

Run: `.venv/bin/python benchmarks/eval_cache.py [--size small|resnet50] [--method bam] [--images 200]
[--classes 5] [--episodes 1000] [--seeds 5] [--shot 1] [--cache-mib 1024]` (at resnet50 / 473 pass smaller
--episodes and --seeds). A randomly initialised model scores `--seeds` fixed lists drawn like the real ones
(a class, then a query and `--shot` other supports showing it) over a pool of random images, through the real
loader, test transform (`original`, the method's canvas) and the real scoring path (`evaluation.score_lists`,
which with the cache scores class by class across the lists). CUDA when available.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fssmeta import evaluation
from fssmeta.config import Config, EvalConfig, ModelConfig
from fssmeta.data.folds import base_classes
from fssmeta.data.transforms import TestTransform
from fssmeta.models import build_model, get_method
from fssmeta.models.feature_cache import FeatureCache

CONFIGS = {  # size -> (model params, input side), as benchmarks/model.py
    "small": (dict(backbone="small", pspnet={"ppm_dim": 128}, bam={"reduce_dim": 64, "aspp_dilations": (2, 4, 6)},
                   pfenet={"reduce_dim": 64, "pyramid_bins": (21, 11, 6, 3)},
                   ntrenet={"reduce_dim": 64, "pyramid_bins": (21, 11, 6, 3)}), 161),
    "resnet50": (dict(backbone="resnet50"), 473),
}


class Pool:
    """`images` random uint8 images of random sizes up to `side`, each with one class's box (1..classes)."""

    def __init__(self, images: int, classes: int, side: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(images):
            h, w = (int(v) for v in rng.integers(3 * side // 4, side + 1, 2))
            mask = np.zeros((h, w), np.uint8)
            top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            mask[top : top + h // 2, left : left + w // 2] = 1 + i % classes
            self.items[str(i)] = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask)

    def load(self, key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.items[key]
        return image, (mask == class_id).astype(np.uint8)

    def episodes(self, n: int, classes: int, shot: int, seed: int) -> list[dict[str, Any]]:
        """A fixed list: a class, a query showing it, `shot` other images showing it."""
        rng = np.random.default_rng([seed, 1])
        by_class = {c: [k for k, (_, m) in self.items.items() if (m == c).any()] for c in range(1, classes + 1)}
        out = []
        for _ in range(n):
            c = int(rng.integers(1, classes + 1))
            query, *supports = (str(k) for k in rng.choice(by_class[c], shot + 1, replace=False))
            out.append({"query": query, "supports": supports, "class_id": c})
        return out


def score(model: torch.nn.Module, paths: dict[int, Path], pool: Pool, transform: TestTransform, classes: int,
          cache_mib: int) -> tuple[list[dict[str, Any]], float]:
    """The lists through the real scoring path (`evaluation.score_lists`: with a cache, one per model,
    class by class across the lists); per-seed scores and seconds."""
    cfg = Config(eval=EvalConfig(test_size=transform.size, feature_cache_mib=cache_mib))
    start = time.perf_counter()
    scores = evaluation.score_lists(cfg, model, paths, pool, transform, classes, False, "bench")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(CONFIGS), default="small")
    parser.add_argument("--method", default="bam")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--cache-mib", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params, side = CONFIGS[args.size]
    torch.manual_seed(0)
    model = build_model(ModelConfig(method=args.method, **params), shot=args.shot,
                        base_classes=base_classes("pascal", 0)).to(device).eval()
    pool = Pool(args.images, args.classes, side)
    folder = Path(tempfile.mkdtemp(prefix="fssmeta-eval-cache-"))
    paths = {}
    for seed in range(args.seeds):
        paths[seed] = folder / f"seed{seed}.json"
        paths[seed].write_text(json.dumps({"episodes": pool.episodes(args.episodes, args.classes, args.shot, seed)}))
    transform = TestTransform("original", side, canvas=get_method(args.method).test_canvas("method"))
    warm = folder / "warm.json"
    warm.write_text(json.dumps({"episodes": json.loads(paths[0].read_text())["episodes"][:3]}))
    score(model, {0: warm}, pool, transform, args.classes, 0)
    caches: list[FeatureCache] = []
    real_caching = evaluation.caching

    def keep(model: torch.nn.Module, cache: FeatureCache | None):  # remember the cache the scoring made
        caches.append(cache)
        return real_caching(model, cache)

    evaluation.caching = keep
    plain, plain_s = score(model, paths, pool, transform, args.classes, 0)
    cached, cached_s = score(model, paths, pool, transform, args.classes, args.cache_mib)
    cache = caches[-1]
    same = plain == cached  # every seed's mIoU, FB-IoU and per-class IoU, exactly
    n = args.episodes * args.seeds
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    print(f"machine: {platform.platform()}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device} ({gpu})")
    print(f"{args.method} {args.size} at {side}, {args.shot}-shot: {args.episodes} episodes x {args.seeds} seeds "
          f"over {args.images} images, {args.classes} classes")
    print(f"uncached: {n / plain_s:8.2f} episodes/s ({plain_s:.1f} s)")
    print(f"cached:   {n / cached_s:8.2f} episodes/s ({cached_s:.1f} s), speedup {plain_s / cached_s:.2f}x")
    print(cache.describe() + f" (bound {args.cache_mib} MiB)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_peak = f", CUDA max allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""
    print(f"peak RSS {peak:.0f} MiB{cuda_peak}")
    print(f"scores identical (mIoU, FB-IoU, per-class IoU of every list): {same}")
    if not same:
        raise SystemExit("the cached evaluation differs from the uncached one")


if __name__ == "__main__":
    main()
