"""Data-side sections: the dataset (`data`, its cross-domain `targets`), the synthetic generator, the fixed
episode lists and the training augmentation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fssmeta.config.base import NonNegative, Positive, Section


class TargetConfig(Section):
    """One cross-domain target set in a PATNet layout, or PASCAL VOC val (`pascal`: RMT's cross-dataset setting)."""

    layout: Literal["deepglobe", "isic", "chest_xray", "fss1000", "suim", "pascal"]
    root: str
    # RMT's COCO-20i -> PASCAL: leave out the target classes the source model trained on (matched by name,
    # PASCAL's to COCO's; docs/protocol.md section 5), so each source split is scored on its unseen classes only.
    exclude_seen_classes: bool = False


class DataConfig(Section):
    """Which dataset, where it lives, and the protocol switches that change its lists (docs/protocol.md sections 1-2)."""

    dataset: Literal["synthetic", "pascal", "coco"] = "synthetic"
    root: str = "data/synthetic"
    # Reader used for the synthetic dataset, which is written in both layouts.
    format: Literal["voc", "coco"] = "voc"
    coco_split: Literal["interleaved", "consecutive"] = "interleaved"
    train_pool: Literal["pfenet", "hsnet"] = "pfenet"
    exclude_novel_images: bool = True
    # PFENet/BAM small-object rule: a class counts for an image only with >= 2*32*32 pixels. 0 disables it.
    min_object_pixels: int = 2048
    crowd: Literal["foreground", "ignore"] = "foreground"
    # The query's class in an `image`-order episode (docs/protocol.md section 3): `present` = any fold class
    # in the query image at any pixel count (PFENet/BAM `__getitem__`); `qualifying` = only the classes that
    # pass `min_object_pixels` (fssmeta's earlier convention). Supports always follow the small-object rule.
    query_class: Literal["present", "qualifying"] = "present"
    # The query's class in the TRAINING episodes (meta-training, the tune trials): `same` = `query_class`
    # (the official codes use one rule for both); `present` / `qualifying` set it apart from the test lists.
    train_query_class: Literal["same", "present", "qualifying"] = "same"
    # A COCO annotation whose segmentation is `[]`: left out with a warning (counted in the mask cache
    # manifest), or reported as an error by `prepare`.
    coco_empty_segmentation: Literal["skip", "error"] = "skip"
    # PASCAL list files (relative to root); lines are `<id>` or `JPEGImages/<id>.jpg SegmentationClassAug/<id>.png`.
    train_lists: tuple[str, ...] = ("ImageSets/Segmentation/train.txt", "ImageSets/SegmentationAug/train_noval.txt")
    test_list: str = "ImageSets/Segmentation/val.txt"
    # Pool for checkpoint selection; empty = the test pool, drawn with `episodes.val_seeds`.
    val_list: str = "ImageSets/Segmentation/selection.txt"
    mask_dir: str = "SegmentationClassAug"
    cache_dir: str = "data/cache"
    prepared: str = "data/prepared"
    targets: dict[str, TargetConfig] = {}

    @property
    def training_query_class(self) -> str:
        """The rule the training episodes follow: `train_query_class`, or `query_class` for `same`."""
        return self.query_class if self.train_query_class == "same" else self.train_query_class


class SynthesizeConfig(Section):
    """The procedurally generated few-shot dataset (the embedded default)."""

    out: str = "data/synthetic"
    seed: int = 0
    image_size: int = 160
    train_images: int = 1200
    test_images: int = 300
    val_images: int = 150
    target_images_per_class: int = 40
    max_objects: int = 4
    boundary_width: int = 2


class EpisodesConfig(Section):
    """Fixed test and validation episode lists (docs/protocol.md section 3)."""

    out: str = "data/episodes"
    folds: Annotated[tuple[NonNegative, ...], Field(min_length=1)] = (0, 1, 2, 3)
    shots: Annotated[tuple[Positive, ...], Field(min_length=1)] = (1, 5)
    orders: tuple[Literal["image", "class"], ...] = ("image", "class")
    test_episodes: Positive = 1000
    test_seeds: Annotated[tuple[int, ...], Field(min_length=1)] = (0, 1, 2, 3, 4)
    val_episodes: Positive = 200
    val_seeds: Annotated[tuple[int, ...], Field(min_length=1)] = (1000,)
    target_episodes: Positive = 600
    # Share of each cross-domain target's images per class held out as its selection pool (its `val` lists:
    # promotion and target-scored sweeps); the target's test lists never use them. 0 = PATNet's whole pool for
    # test, no selection lists, and no promotion on the targets (docs/protocol.md section 5).
    target_val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    # N of iFSL's FS-CS lists (docs/protocol.md section 3): > 1 also writes N-way test lists (each support class
    # drawn as the official loader does, the query's own with probability 1/2), scored with ER beside mIoU by
    # a method whose record says `fscs`. 1 = the 1-way lists only, as before.
    ways: Positive = 1


class TransformConfig(Section):
    """PFENet-family training augmentation."""

    crop_size: int = 473
    scale_min: float = 0.9
    scale_max: float = 1.1
    rotate_degrees: float = 10.0
    blur_prob: float = 0.5
    flip_prob: float = 0.5
