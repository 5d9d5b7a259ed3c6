"""Datasets yielding `Episode` batches from fixed lists and from the on-the-fly training sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fssmeta.config import DataConfig, TrainConfig, TransformConfig
from fssmeta.data.dataset import (
    BaseSegmentationDataset,
    EpisodeDataset,
    IndexSource,
    TrainEpisodeDataset,
    episode_label,
    episode_loader,
)
from fssmeta.data.prepare import load_fold, load_index, prepare, present_classes
from fssmeta.data.sampler import TrainEpisodeSampler, sample_episodes
from fssmeta.data.transforms import TestTransform, TrainTransform
from fssmeta.episode import Episode
from fssmeta.stages import training_loader
from tests.conftest import box_mask, write_voc


@pytest.fixture
def prepared(tmp_path):
    """Train: classes c and c%20+1 side by side (48x64 each half); test: six 40x64 images per class."""
    masks = {f"tr{c:02d}": box_mask((48, 64), [(c, 0, 0, 48, 32), (c % 20 + 1, 0, 32, 48, 32)]) for c in range(1, 21)}
    masks |= {f"te{i:03d}": box_mask((40, 64), [(i % 20 + 1, 4, 4, 30, 40)], band=True) for i in range(120)}
    root = write_voc(tmp_path / "VOC2012", masks, [f"tr{c:02d}" for c in range(1, 21)], [f"te{i:03d}" for i in range(120)])
    cfg = DataConfig(dataset="pascal", root=str(root), prepared=str(tmp_path / "prepared"), val_list="",
                     min_object_pixels=0, exclude_novel_images=False)
    prepare(cfg, progress=False)
    return tmp_path / "prepared"


def test_episode_label_maps_class_other_and_ignore():
    mask = np.array([[0, 3, 5], [255, 3, 7]], np.uint8)
    np.testing.assert_array_equal(episode_label(mask, 3), [[0, 1, 0], [255, 1, 0]])


@pytest.mark.parametrize("shot", [1, 5])
def test_fixed_episodes_resized_batch(prepared, shot):
    index = load_index(prepared)
    entries = [(k, cs) for k, cs in load_fold(prepared, 1)["test"]]
    episodes = sample_episodes(entries, shot, 4, seed=0)
    dataset = EpisodeDataset(episodes, IndexSource(index), TestTransform("resized", 32))
    batch = next(iter(episode_loader(dataset, batch_size=2)))
    assert isinstance(batch, Episode)
    assert batch.support_imgs.shape == (2, shot, 3, 32, 32) and batch.support_imgs.dtype == torch.float32
    assert batch.support_masks.shape == (2, shot, 32, 32) and batch.support_masks.dtype == torch.int64
    assert batch.query_img.shape == (2, 3, 32, 32) and batch.query_mask.shape == (2, 32, 32)
    assert batch.class_id.tolist() == [episodes[0]["class_id"], episodes[1]["class_id"]]
    assert set(batch.query_mask.unique().tolist()) == {0, 1, 255}
    assert (batch.support_masks == 1).any(dim=(2, 3)).all()  # every support shows its class


def test_original_resolution_scores_at_image_size(prepared):
    index = load_index(prepared)
    entries = [(k, cs) for k, cs in load_fold(prepared, 0)["test"]]
    transform = TestTransform("original", 32)
    dataset = EpisodeDataset(sample_episodes(entries, 1, 2, seed=0), IndexSource(index), transform)
    ep = next(iter(episode_loader(dataset, batch_size=1)))
    assert ep.query_img.shape == (1, 3, 32, 32)
    # the 40x64 ground truth itself (PFENet's scoring at original size); the logits are mapped onto it
    assert ep.query_mask.shape == (1, 40, 64)
    assert transform.score_logits(torch.zeros(1, 2, 32, 32), (40, 64)).shape == (1, 2, 40, 64)
    with pytest.raises(ValueError, match="batch_size 1"):
        episode_loader(dataset, batch_size=2)


def test_training_episodes_are_seeded_per_epoch_and_rank(prepared):
    index = load_index(prepared)
    entries = [(k, cs) for k, cs in load_fold(prepared, 0)["train"]]
    sampler = TrainEpisodeSampler(entries, shot=1, seed=0)
    transform = TrainTransform(TransformConfig(crop_size=40))

    def first(rank, epoch, world_size=2, batch_size=3):
        dataset = TrainEpisodeDataset(sampler, IndexSource(index, ("train",)), transform, length=3, rank=rank,
                                      world_size=world_size, batch_size=batch_size)
        dataset.set_epoch(epoch)
        return next(iter(episode_loader(dataset, batch_size=batch_size)))

    a = first(0, 0)
    assert a.support_imgs.shape == (3, 1, 3, 40, 40) and a.query_mask.shape == (3, 40, 40)
    assert all(6 <= c <= 20 for c in a.class_id.tolist())  # fold 0 trains on base classes only
    assert torch.equal(a.query_img, first(0, 0).query_img)
    assert not torch.equal(a.query_img, first(1, 0).query_img)
    assert not torch.equal(a.query_img, first(0, 1).query_img)
    # DDP equivalence: the two ranks' batches together are the single-process batch of the global size
    single = TrainEpisodeDataset(sampler, IndexSource(index, ("train",)), transform, length=6)
    joint = torch.cat([a.query_img, first(1, 0).query_img])
    assert torch.equal(joint, torch.stack([single[i].query_img for i in range(6)]))


@pytest.mark.parametrize("kind", ["episodes", "base"])
def test_loader_workers_see_each_epoch_as_the_main_process_does(prepared, kind):
    # Persistent workers kept the copy of the dataset they started with, so every epoch after the first
    # repeated the first one's episodes and augmentations; the training loader's workers start each epoch.
    index = load_index(prepared)
    entries = load_fold(prepared, 0)["train"]
    transform = TrainTransform(TransformConfig(crop_size=40))
    if kind == "episodes":
        dataset = TrainEpisodeDataset(TrainEpisodeSampler(entries, shot=1, seed=0), IndexSource(index, ("train",)),
                                      transform, length=4)
    else:
        dataset = BaseSegmentationDataset([k for k, _ in entries], IndexSource(index, ("train",)), transform,
                                          base_classes=list(range(6, 21)), length=4)

    def epochs(num_workers: int) -> list[list[torch.Tensor]]:
        loader = training_loader(dataset, TrainConfig(batch_size=2, num_workers=num_workers))
        seen = []
        for epoch in range(3):
            dataset.set_epoch(epoch)  # what fit does before each epoch
            seen.append([batch[2] if kind == "episodes" else batch[0] for batch in loader])  # query / image
        return seen

    in_process, workers = epochs(0), epochs(1)
    assert not torch.equal(in_process[0][0], in_process[1][0])  # the epochs differ...
    for mine, theirs in zip(in_process, workers, strict=True):  # ...and the workers see the same ones
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_present_classes_follow_data_query_class(prepared):
    index, lists = load_index(prepared), load_fold(prepared, 0)  # fold 0: novel 1..5, base 6..20
    train = present_classes(index, DataConfig(), lists, "train")
    assert train["tr05"] == [6] and train["tr20"] == [20] and train["tr07"] == [7, 8]  # base classes only
    assert present_classes(index, DataConfig(), lists, "test")["te000"] == [1]
    assert present_classes(index, DataConfig(query_class="qualifying"), lists, "test") is None
    assert present_classes(index, DataConfig(train_pool="hsnet"), lists, "train") is None  # lines name a class


def test_train_query_class_sets_the_training_rule_apart_from_the_test_lists(prepared):
    from fssmeta.stages import training_data

    index, lists = load_index(prepared), load_fold(prepared, 0)
    same = DataConfig()
    assert training_data(same) is same  # `same`: the training episodes follow data.query_class
    apart = DataConfig(train_query_class="qualifying")
    assert training_data(apart).query_class == "qualifying" and apart.query_class == "present"
    assert present_classes(index, training_data(apart), lists, "train") is None  # the qualifying lists
    assert present_classes(index, apart, lists, "test")["te000"] == [1]  # the test pool keeps its rule
    flipped = DataConfig(query_class="qualifying", train_query_class="present")
    assert present_classes(index, training_data(flipped), lists, "train")["tr07"] == [7, 8]
