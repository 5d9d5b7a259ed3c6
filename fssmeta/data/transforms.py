"""Image/mask transforms: PFENet-family training augmentation, the two test resolutions and the test canvases
(docs/protocol.md section 4)."""

from __future__ import annotations

import random
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fssmeta.config import TransformConfig
from fssmeta.episode import IGNORE_INDEX
from fssmeta.losses import resize_logits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)

# PFENet's RandRotate is built without `p`, so its default 0.5 applies: half the images are not rotated.
ROTATE_PROB = 0.5
# PFENet's RandomGaussianBlur is cv2.GaussianBlur(img, (5, 5), 0); sigma 0 means OpenCV's
# 0.3 * ((5 - 1) * 0.5 - 1) + 0.8 = 1.1.
BLUR_KERNEL, BLUR_SIGMA = 5, 1.1
# PFENet's and BAM's test resizes round the content's height and width down to a multiple of 8.
CONTENT_MULTIPLE = 8
CANVASES = ("pfenet", "bam", "mean")
# PFENet's Crop re-draws the random crop (at most 31 more times) while it keeps < 85% of the foreground.
CROP_KEEP_FRACTION, CROP_REDRAWS = 0.85, 31


def _check_inputs(image: np.ndarray, mask: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be uint8 (H, W) = {image.shape[:2]}, got {mask.dtype} {mask.shape}")


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """image: (h, w, 3) float in [0, 1]; mask: (h, w) labels -> normalised (3, h, w) float32, (h, w) int64."""
    normalized = (image.astype(np.float32) - _MEAN) / _STD
    image_tensor = torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))
    return image_tensor, torch.from_numpy(mask.astype(np.int64))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) normalised float tensor -> (h, w, 3) uint8 RGB, for plots."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"denormalize: expected (3, h, w), got {tuple(image.shape)}")
    pixels = image.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy() * _STD + _MEAN
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


class TrainTransform:
    """PFENet's training augmentation, in its order: random scale, rotate, Gaussian blur, horizontal flip,
    pad to the crop size (image with the mean colour, mask with 255), random crop.

    Support and query images of an episode are each passed through separately. Not thread-safe: each call
    installs its random state into the shared albumentations pipeline (DataLoader workers are processes).
    """

    def __init__(self, cfg: TransformConfig) -> None:
        self.crop_size = cfg.crop_size
        # The pipeline runs on float images in [0, 1] (PFENet augments float32 images): the mean-colour
        # fill is then exact, so padding normalises to exactly 0. Not 0-255 floats: albumentations clips
        # float images to [0, 1] in GaussianBlur.
        constant = {"border_mode": cv2.BORDER_CONSTANT, "fill": IMAGENET_MEAN, "fill_mask": IGNORE_INDEX}
        self._augment = A.Compose([
            # One factor for both sides (PFENet's RandScale without aspect_ratio).
            A.RandomScale(scale_limit=(cfg.scale_min - 1.0, cfg.scale_max - 1.0),
                          interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=1.0),
            A.Rotate(limit=(-cfg.rotate_degrees, cfg.rotate_degrees), interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=cv2.INTER_NEAREST, p=ROTATE_PROB, **constant),
            A.GaussianBlur(blur_limit=(BLUR_KERNEL, BLUR_KERNEL), sigma_limit=(BLUR_SIGMA, BLUR_SIGMA),
                           p=cfg.blur_prob),
            A.HorizontalFlip(p=cfg.flip_prob),
            # Centre padding: PFENet puts floor(pad / 2) on top/left and the rest on bottom/right.
            A.PadIfNeeded(min_height=cfg.crop_size, min_width=cfg.crop_size, position="center", **constant),
        ])

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator | int) -> tuple[torch.Tensor, torch.Tensor]:
        """image (H, W, 3) uint8 RGB, mask (H, W) uint8 -> (3, c, c) float32, (c, c) int64; c = crop_size.

        Deterministic given `rng`: an int seeds a fresh generator; a Generator is consumed (advanced).
        """
        _check_inputs(image, mask)
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        # albumentations 2 draws from a numpy Generator and a Python Random held by each transform;
        # set_random_state shares one pair across the pipeline, both derived from `generator`.
        py_random = random.Random(int(generator.integers(2**63)))
        self._augment.set_random_state(generator, py_random)
        out = self._augment(image=image.astype(np.float32) / 255.0, mask=mask)
        image_crop, mask_crop = self._random_crop(out["image"], out["mask"], generator)
        return _to_tensors(image_crop, mask_crop)

    def _random_crop(self, image: np.ndarray, mask: np.ndarray,
                     generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """PFENet's `Crop(crop_type='rand')` on an input already padded to at least crop_size."""
        size = self.crop_size
        height, width = mask.shape
        # PFENet counts label 1 on binarised masks; on class-id masks every object label counts.
        foreground = (mask != 0) & (mask != IGNORE_INDEX)
        total = int(foreground.sum())
        for _ in range(1 + CROP_REDRAWS):
            top = int(generator.integers(0, height - size + 1))
            left = int(generator.integers(0, width - size + 1))
            if foreground[top : top + size, left : left + size].sum() >= CROP_KEEP_FRACTION * total:
                break
        # After all redraws PFENet keeps the last crop, whatever it holds.
        return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]


class ResizeTransform:
    """The HSNet family's training input: image and mask resized to size x size exactly as at `resized` test
    time, no augmentation. Same call as `TrainTransform`; `rng` is accepted and unused."""

    def __init__(self, size: int) -> None:
        self.crop_size = size
        self._resize = TestTransform("resized", size)

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self._resize(image, mask)


def training_transform(kind: Literal["pfenet", "resize"], cfg: TransformConfig) -> TrainTransform | ResizeTransform:
    """A method's training transform (`Method.transform`): PFENet's augmentation cropped to
    `transform.crop_size`, or a plain resize to `transform.crop_size` square."""
    if kind == "pfenet":
        return TrainTransform(cfg)
    if kind == "resize":
        return ResizeTransform(cfg.crop_size)
    raise ValueError(f"unknown training transform {kind!r}; expected pfenet or resize")


class TestTransform:
    """Deterministic test-time resizing in one of the two published conventions (`eval.resolution`).

    original (PFENet family): the content keeps its aspect at the top-left of a size x size canvas (image
        bilinear, mask nearest, mask padding 255), drawn on one of three canvases (`eval.canvas`):
        pfenet  PFENet's `test_Resize`: an image whose longer side exceeds `size` is scaled so that side is
                `size`, then both sides are rounded down to a multiple of 8; a smaller image is left unscaled.
                Black padding in pixel space, so after normalisation the pad is -mean / std.
        bam     BAM's `Resize` (its configs' `resized_val: True`): always scaled so the longer side is `size`
                (up or down), both sides rounded down to a multiple of 8; black padding.
        mean    fssmeta's earlier canvas: always scaled, no rounding, padded with the mean colour (0 after
                normalisation).
        Scored against `score_mask`, the original mask, after `score_logits` maps the prediction back.
    resized (HSNet family): image and mask resized to size x size without keeping aspect; scored there.
    """

    __test__ = False  # the name starts with "Test": keep pytest from collecting it

    def __init__(self, resolution: Literal["original", "resized"], size: int,
                 canvas: Literal["pfenet", "bam", "mean"] = "pfenet") -> None:
        if resolution not in ("original", "resized"):
            raise ValueError(f"resolution must be 'original' or 'resized', got {resolution!r}")
        if canvas not in CANVASES:
            raise ValueError(f"canvas must be one of {', '.join(CANVASES)}, got {canvas!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.resolution = resolution
        self.size = size
        self.canvas = canvas

    def content_shape(self, height: int, width: int) -> tuple[int, int]:
        """Height and width the image content occupies in the model input."""
        if self.resolution == "resized":
            return self.size, self.size
        if self.canvas == "pfenet" and max(height, width) <= self.size:
            return height, width  # test_Resize's find_new_hw returns the original size, not rounded
        # find_new_hw: the longer side (the height on a tie) becomes `size`, the other is truncated with int().
        if height >= width:
            new_h, new_w = self.size, int(width * (self.size / height))
        else:
            new_h, new_w = int(height * (self.size / width)), self.size
        if self.canvas == "mean":
            return max(1, new_h), max(1, new_w)
        return _round_down(new_h), _round_down(new_w)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """image (H, W, 3) uint8 RGB, mask (H, W) uint8 -> model input (3, s, s) float32, (s, s) int64."""
        _check_inputs(image, mask)
        if self.resolution == "resized":
            # HSNet resizes the PIL image with torchvision's Resize (PIL bilinear, antialiased when
            # shrinking) and the mask with F.interpolate(mode="nearest"); we call the same two.
            resized = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BILINEAR)
            return _to_tensors(np.asarray(resized, dtype=np.float32) / 255.0, self._resize_mask(mask))

        new_h, new_w = self.content_shape(*mask.shape)
        # cv2 on float32 pixels, as PFENet's and BAM's test resizes do (an unscaled image is copied unchanged).
        content = cv2.resize(image.astype(np.float32) / 255.0, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        canvas = np.zeros((self.size, self.size, 3), dtype=np.float32)  # pfenet / bam: black before normalising
        if self.canvas == "mean":
            canvas[:] = _MEAN  # normalises to 0
        canvas[:new_h, :new_w] = content
        mask_canvas = np.full((self.size, self.size), IGNORE_INDEX, dtype=np.uint8)
        mask_canvas[:new_h, :new_w] = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        return _to_tensors(canvas, mask_canvas)

    def score_mask(self, mask: np.ndarray) -> torch.Tensor:
        """The ground truth predictions are scored against, (h', w') int64: the original (H, W) mask at
        `original` resolution, the mask resized nearest to size x size at `resized`."""
        if mask.dtype != np.uint8 or mask.ndim != 2:
            raise ValueError(f"mask must be uint8 (H, W), got {mask.dtype} {mask.shape}")
        if self.resolution == "resized":
            return torch.from_numpy(self._resize_mask(mask).astype(np.int64))
        return torch.from_numpy(mask.astype(np.int64))

    def score_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Model logits (B, K, h, w) over the whole input -> (B, K, H', W') aligned with `score_mask` of
        size (H', W'); bilinear with align_corners=True, as the PFENet family upsamples its predictions.

        original, pfenet / bam: the logits are cropped to the content (rounded to multiples of 8, or an
            unscaled image) and that crop is upsampled to the original (H, W).
        original, mean: fssmeta's earlier scoring, unchanged: the whole canvas upsampled to the longer side L
            and cut to (H, W) (the content has the same scale along both axes there).
        resized: upsampled to (H', W').
        """
        height, width = size
        if self.resolution == "resized":
            return resize_logits(logits, (height, width))
        if self.canvas == "mean":
            side = max(height, width)
            return resize_logits(logits, (side, side))[..., :height, :width]
        new_h, new_w = self.content_shape(height, width)
        # Logits at a lower resolution than the input hold the content in the same fraction of the canvas.
        rows = max(1, round(new_h * logits.shape[-2] / self.size))
        cols = max(1, round(new_w * logits.shape[-1] / self.size))
        return resize_logits(logits[..., :rows, :cols], (height, width))

    def _resize_mask(self, mask: np.ndarray) -> np.ndarray:
        as_float = torch.from_numpy(mask).float()[None, None]  # (1, 1, H, W)
        resized = F.interpolate(as_float, size=(self.size, self.size), mode="nearest")
        return resized[0, 0].numpy().astype(np.uint8)


def _round_down(side: int) -> int:
    """PFENet's and BAM's `(int(side / 8)) * 8`. A side under 8 (a sliver, where theirs would fail on a zero
    size) is kept as it is."""
    return side // CONTENT_MULTIPLE * CONTENT_MULTIPLE or max(1, side)
