"""Data-layer throughput: synthetic images/s and training-loader episodes/s at crop 473.

Run: `.venv/bin/python benchmarks/data.py [--episodes N]`. Prints one line per figure; the README records
them with the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fssmeta.config import DataConfig, SynthesizeConfig, TransformConfig
from fssmeta.data.dataset import IndexSource, TrainEpisodeDataset, episode_loader
from fssmeta.data.prepare import load_fold, load_index, prepare
from fssmeta.data.sampler import TrainEpisodeSampler
from fssmeta.data.synthetic import synthesize
from fssmeta.data.transforms import TrainTransform


def bench_synthesize(root: Path, images: int, size: int) -> float:
    cfg = SynthesizeConfig(out=str(root / "synthetic"), train_images=images, test_images=images // 4,
                           val_images=images // 8, image_size=size, target_images_per_class=8)
    start = time.perf_counter()
    synthesize(cfg, progress=False)
    elapsed = time.perf_counter() - start
    total = cfg.train_images + cfg.test_images + cfg.val_images
    print(f"synthesize: {total / elapsed:.1f} images/s ({total} source images at {size}x{size} + targets, {elapsed:.1f} s)")
    return elapsed


def bench_loader(data: DataConfig, shot: int, workers: int, episodes: int, crop: int) -> None:
    index = load_index(data.prepared)
    entries = [(k, cs) for k, cs in load_fold(data.prepared, 0)["train"]]
    dataset = TrainEpisodeDataset(TrainEpisodeSampler(entries, shot, seed=0), IndexSource(index, ("train",)),
                                  TrainTransform(TransformConfig(crop_size=crop)), length=episodes)
    loader = episode_loader(dataset, batch_size=1, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    n = 1
    for batch in iterator:
        n += 1
        assert batch.support_imgs.shape[1:] == (shot, 3, crop, crop)
    elapsed = time.perf_counter() - start
    print(f"train loader: {shot}-shot, {workers} workers, crop {crop}: {(n - 1) / elapsed:.1f} episodes/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=400, help="synthetic image side (PASCAL-like ~500x375)")
    parser.add_argument("--crop", type=int, default=473)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench_synthesize(root, args.images, args.image_size)
        data = DataConfig(root=str(root / "synthetic"), prepared=str(root / "prepared"), cache_dir=str(root / "cache"))
        prepare(data, progress=False)
        for shot in (1, 5):
            for workers in (0, 2):
                bench_loader(data, shot, workers, args.episodes, args.crop)


if __name__ == "__main__":
    main()
