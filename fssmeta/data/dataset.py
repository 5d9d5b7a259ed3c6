"""Datasets that yield `Episode` items: fixed lists for evaluation, on-the-fly episodes for training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fssmeta.data.io import DataError, read_image, read_mask
from fssmeta.data.sampler import TrainEpisodeSampler
from fssmeta.data.transforms import TestTransform, TrainTransform
from fssmeta.episode import IGNORE_INDEX, Episode


class PairSource(Protocol):
    """Loads an image and its episode label (1 = the episode's class, 0 = anything else, 255 = ignore)."""

    def load(self, key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]: ...


def episode_label(mask: np.ndarray, class_id: int) -> np.ndarray:
    """Class `class_id` -> 1, every other class -> 0, 255 stays 255 (docs/protocol.md section 3)."""
    label = np.zeros_like(mask)
    label[mask == class_id] = 1
    label[mask == IGNORE_INDEX] = IGNORE_INDEX
    return label


class IndexSource:
    """Images of a prepared source dataset (`index.json` rows), looked up by key."""

    def __init__(self, index: dict[str, Any], pools: Sequence[str] = ("train", "test", "val")) -> None:
        self.rows = {row["key"]: row for pool in pools for row in index["pools"][pool]}

    def load_raw(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The image and its class-id mask."""
        row = self.rows.get(key)
        if row is None:
            raise DataError(f"image {key!r} is not in the prepared index; re-run `fssmeta prepare`")
        return read_image(row["image"]), read_mask(row["mask"])

    def load(self, key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.load_raw(key)
        return image, episode_label(mask, class_id)


class TargetSource:
    """Samples of a cross-domain `TargetSet`, keyed by sample index; masks are already binary.

    Class ids are 1-based like everywhere else in fssmeta (0 is background): id = class_index + 1.
    """

    def __init__(self, target_set: Any) -> None:
        self.target_set = target_set

    def load(self, key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.target_set.samples[int(key)]
        if sample.class_index + 1 != class_id:
            raise DataError(f"target {self.target_set.name}: sample {key} is class {sample.class_index + 1}, "
                            f"the episode asks for {class_id}")
        return self.target_set.load(int(key))


def _stack(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class EpisodeDataset(Dataset):
    """A fixed episode list (as written by `fssmeta episodes`) scored under a test convention."""

    def __init__(self, episodes: Sequence[dict[str, Any]], source: PairSource, transform: TestTransform) -> None:
        self.episodes = list(episodes)
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> Episode:
        ep = self.episodes[i]
        c = ep["class_id"]
        supports = [self.transform(*self.source.load(k, c)) for k in ep["supports"]]
        image, label = self.source.load(ep["query"], c)
        query_img, _ = self.transform(image, label)
        support_imgs, support_masks = _stack(supports)
        # (S,3,H,W) (S,H,W) (3,H,W) (H',W'): the query mask is at scoring resolution (docs/protocol.md section 4)
        return Episode(support_imgs, support_masks, query_img, self.transform.score_mask(label), torch.tensor(c))


class TrainEpisodeDataset(Dataset):
    """`length` training episodes per epoch and rank, drawn on the fly by a `TrainEpisodeSampler`.

    Item `i` of `rank` is global episode `(i // B) * B * W + rank * B + i % B` (B the per-rank batch, W the
    world size): step s of a W-worker run sees exactly the episodes of step s of a 1-worker run with batch
    B * W, so DDP with the same global batch and seed reproduces single-process training.
    """

    def __init__(self, sampler: TrainEpisodeSampler, source: PairSource, transform: TrainTransform,
                 length: int, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sampler, self.source, self.transform = sampler, source, transform
        self.length, self.rank, self.world_size, self.batch_size, self.epoch = length, rank, world_size, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def global_index(self, i: int) -> int:
        b = self.batch_size
        return (i // b) * b * self.world_size + self.rank * b + i % b

    def __getitem__(self, i: int) -> Episode:
        ep, rng = self.sampler.draw(self.epoch, 0, self.global_index(i))
        c = ep["class_id"]
        pairs = [self.transform(*self.source.load(k, c), rng=int(rng.integers(2**31)))
                 for k in [ep["query"], *ep["supports"]]]
        support_imgs, support_masks = _stack(pairs[1:])
        return Episode(support_imgs, support_masks, pairs[0][0], pairs[0][1], torch.tensor(c))


class BaseSegmentationDataset(Dataset):
    """The base-learner stage (BAM stage 1): supervised segmentation of the fold's training images.

    Base class `base_classes[i]` -> label i + 1; novel classes and background -> 0; 255 stays 255. Each
    epoch visits the images in an order drawn from (seed, epoch); augmentation is seeded per item.
    """

    def __init__(self, keys: Sequence[str], source: IndexSource, transform: TrainTransform,
                 base_classes: Sequence[int], seed: int = 0, length: int = 0) -> None:
        if not keys:
            raise DataError("base-learner stage: the fold's training list is empty")
        self.keys, self.source, self.transform, self.seed = list(keys), source, transform, seed
        self.length = length or len(self.keys)
        self.lut = np.zeros(256, np.uint8)
        self.lut[np.asarray(base_classes, dtype=np.int64)] = np.arange(1, len(base_classes) + 1)
        self.lut[IGNORE_INDEX] = IGNORE_INDEX
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.keys))
        image, mask = self.source.load_raw(self.keys[int(order[i % len(self.keys)])])
        return self.transform(image, self.lut[mask], rng=int(np.random.default_rng([self.seed, self.epoch, i]).integers(2**31)))


def episode_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0,
                   worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """A loader of `Episode` batches. At `original` test resolution every query mask has its own size,
    so evaluation runs one episode per batch (as PFENet's test does)."""
    transform = getattr(dataset, "transform", None)
    if isinstance(transform, TestTransform) and transform.resolution == "original" and batch_size != 1:
        raise ValueError("eval.resolution=original scores each query at its own size: use batch_size 1")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      worker_init_fn=worker_init_fn, persistent_workers=num_workers > 0)
