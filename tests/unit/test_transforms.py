"""Transforms: shapes and dtypes, nearest-only masks, padding values and placement, the test canvases and
their scoring, seeded determinism."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from fssmeta.config import TransformConfig
from fssmeta.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform, denormalize

# Augmentations switched off, so that only padding and cropping act.
STILL = {"scale_min": 1.0, "scale_max": 1.0, "rotate_degrees": 0.0, "blur_prob": 0.0, "flip_prob": 0.0}


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def labelled_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blocky class ids {0, 3, 7} with a 255 border, like a VOC mask."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(np.array([0, 3, 7], dtype=np.uint8), size=(height // 5 + 1, width // 5 + 1))
    mask = np.kron(blocks, np.ones((5, 5), dtype=np.uint8))[:height, :width]
    mask[0, :] = 255
    return np.ascontiguousarray(mask)


def normalised(rgb: tuple[float, float, float]) -> torch.Tensor:
    return (torch.tensor(rgb) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_train_shapes_dtypes_and_labels() -> None:
    transform = TrainTransform(TransformConfig(crop_size=48))
    image, mask = random_image(60, 70), labelled_mask(60, 70)
    for seed in range(8):
        image_t, mask_t = transform(image, mask, seed)
        assert image_t.shape == (3, 48, 48) and image_t.dtype == torch.float32
        assert mask_t.shape == (48, 48) and mask_t.dtype == torch.int64
        # Nearest everywhere: no interpolated label like 1, 2 or 5 can appear.
        assert set(mask_t.unique().tolist()) <= {0, 3, 7, 255}


def test_tiny_image_padded_to_crop() -> None:
    transform = TrainTransform(TransformConfig(crop_size=16, **STILL))
    image = np.full((8, 8, 3), 255, dtype=np.uint8)
    mask = np.ones((8, 8), dtype=np.uint8)
    image_t, mask_t = transform(image, mask, 0)
    # 8 rows of padding: 4 on top and 4 below (PFENet's floor(pad / 2)); likewise left/right.
    expected = torch.full((16, 16), 255, dtype=torch.int64)
    expected[4:12, 4:12] = 1
    assert torch.equal(mask_t, expected)
    assert torch.allclose(image_t[:, mask_t == 255], torch.tensor(0.0), atol=1e-6)  # mean colour -> 0
    white = normalised((1.0, 1.0, 1.0))[:, None]
    assert torch.allclose(image_t[:, mask_t == 1], white, atol=1e-5)


def test_rotation_fills_corners_with_ignore() -> None:
    config = TransformConfig(crop_size=32, scale_min=1.0, scale_max=1.0, rotate_degrees=45.0,
                             blur_prob=0.0, flip_prob=0.0)
    transform = TrainTransform(config)
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    mask = np.ones((32, 32), dtype=np.uint8)  # no 0 anywhere: any 0 would be an artefact
    rotated = 0
    for seed in range(12):
        image_t, mask_t = transform(image, mask, seed)
        assert set(mask_t.unique().tolist()) <= {1, 255}
        if mask_t[0, 0] == 255:
            rotated += 1
            assert torch.allclose(image_t[:, 0, 0], torch.zeros(3), atol=1e-6)
    assert rotated > 0  # rotation has probability 0.5 per call (PFENet); 12 calls make a miss unlikely


def test_seeded_determinism() -> None:
    transform = TrainTransform(TransformConfig(crop_size=48, rotate_degrees=10.0))
    image, mask = random_image(60, 70), labelled_mask(60, 70)
    first, again = transform(image, mask, 123), transform(image, mask, 123)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = transform(image, mask, 124)
    assert not torch.equal(first[0], other[0])
    # A generator gives the same stream as its seed would, and is advanced by each call.
    generator_a, generator_b = np.random.default_rng(7), np.random.default_rng(7)
    from_a, from_b = transform(image, mask, generator_a), transform(image, mask, generator_b)
    assert torch.equal(from_a[0], from_b[0])
    assert not torch.equal(transform(image, mask, generator_a)[0], from_a[0])


def test_original_resolution_places_content_top_left() -> None:
    transform = TestTransform("original", size=40, canvas="mean")
    image = np.full((50, 80, 3), 255, dtype=np.uint8)
    mask = labelled_mask(50, 80)
    mask[0, :] = 3  # no 255 inside the content, so every 255 below is padding
    image_t, mask_t = transform(image, mask)
    assert image_t.shape == (3, 40, 40) and mask_t.shape == (40, 40) and mask_t.dtype == torch.int64
    # Longer side 80 -> 40 (factor 1/2): content 25 x 40 at the top-left, padding below.
    assert transform.content_shape(50, 80) == (25, 40)
    assert (mask_t[:25] != 255).all() and (mask_t[25:] == 255).all()
    assert set(mask_t.unique().tolist()) <= {0, 3, 7, 255}
    assert torch.allclose(image_t[:, :25], normalised((1.0, 1.0, 1.0))[:, None, None], atol=1e-5)
    assert torch.allclose(image_t[:, 25:], torch.tensor(0.0), atol=1e-6)
    # A tall image pads on the right instead.
    _, tall_mask = transform(np.zeros((80, 50, 3), dtype=np.uint8), np.zeros((80, 50), dtype=np.uint8))
    assert (tall_mask[:, :25] == 0).all() and (tall_mask[:, 25:] == 255).all()


def test_original_score_mask_is_the_original_mask() -> None:
    mask = labelled_mask(50, 80)
    for canvas in ("pfenet", "bam", "mean"):
        score = TestTransform("original", size=40, canvas=canvas).score_mask(mask)
        assert score.dtype == torch.int64 and torch.equal(score, torch.from_numpy(mask).long())


def test_mean_canvas_scores_as_before() -> None:
    # fssmeta's earlier scoring: the whole canvas upsampled to the longer side, cut to the original size.
    logits = torch.randn(1, 2, 40, 40, generator=torch.Generator().manual_seed(0))
    scored = TestTransform("original", size=40, canvas="mean").score_logits(logits, (50, 80))
    expected = torch.nn.functional.interpolate(logits, size=(80, 80), mode="bilinear", align_corners=True)
    assert torch.equal(scored, expected[..., :50, :80])


NORMALISED_BLACK = normalised((0.0, 0.0, 0.0))


@pytest.mark.parametrize("canvas", ["pfenet", "bam"])
def test_official_canvas_pads_with_normalised_black(canvas) -> None:
    transform = TestTransform("original", size=40, canvas=canvas)
    image = np.full((50, 80, 3), 255, dtype=np.uint8)
    mask = np.zeros((50, 80), dtype=np.uint8)
    image_t, mask_t = transform(image, mask)
    # 80 -> 40; the height int(50 * 0.5) = 25 is rounded down to 24.
    assert transform.content_shape(50, 80) == (24, 40)
    assert torch.allclose(image_t[:, :24], normalised((1.0, 1.0, 1.0))[:, None, None], atol=1e-5)
    assert torch.allclose(image_t[:, 24:], NORMALISED_BLACK[:, None, None], atol=1e-6)  # -mean / std
    assert (mask_t[:24] == 0).all() and (mask_t[24:] == 255).all()


@pytest.mark.parametrize("canvas", ["pfenet", "bam"])
@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (481, 481), (1000, 90), (474, 20)])
def test_scaled_content_is_a_multiple_of_8(canvas, shape) -> None:
    new_h, new_w = TestTransform("original", size=473, canvas=canvas).content_shape(*shape)
    assert new_h % 8 == 0 and new_w % 8 == 0 and max(new_h, new_w) == 472


def test_pfenet_leaves_a_small_image_unscaled_and_bam_scales_it() -> None:
    image, mask = random_image(30, 21, seed=1), labelled_mask(30, 21)
    pfenet = TestTransform("original", size=40, canvas="pfenet")
    # test_Resize scales only when the longer side exceeds the test size; otherwise no rounding either.
    assert pfenet.content_shape(30, 21) == (30, 21) and pfenet.content_shape(40, 33) == (40, 33)
    assert pfenet.content_shape(41, 33) == (40, 32)
    image_t, mask_t = pfenet(image, mask)
    unscaled = (torch.from_numpy(image).float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image_t[:, :30, :21], unscaled.permute(2, 0, 1), atol=1e-5)
    assert torch.equal(mask_t[:30, :21], torch.from_numpy(mask).long()) and (mask_t[30:] == 255).all()
    # BAM's Resize scales it up: 30 -> 40, int(21 * 40 / 30) = 28 -> 24.
    assert TestTransform("original", size=40, canvas="bam").content_shape(30, 21) == (40, 24)


def test_bam_canvas_matches_bams_resize_by_hand() -> None:
    # BAM util/transform.py Resize.find_new_hw on a VOC-sized 375 x 500 image at 473: the width is longer,
    # ratio 473 / 500; new_h = int(375 * 0.946) = 354 -> int(354 / 8) * 8 = 352; new_w = 473 -> 472.
    transform = TestTransform("original", size=473, canvas="bam")
    assert transform.content_shape(375, 500) == (352, 472)
    assert transform.content_shape(200, 100) == (472, 232)  # upscaled: int(100 * 2.365) = 236 -> 232
    # Pixels: cv2 bilinear on 0-255 floats into a zero canvas, then (x - 255 mean) / (255 std).
    image, mask = random_image(30, 50, seed=2), labelled_mask(30, 50)
    small = TestTransform("original", size=41, canvas="bam")
    assert small.content_shape(30, 50) == (24, 40)  # int(30 * 0.82) = 24; 41 -> 40
    back = np.zeros((41, 41, 3), np.float32)
    back[:24, :40] = cv2.resize(image.astype(np.float32), (40, 24), interpolation=cv2.INTER_LINEAR)
    expected = (back - 255 * np.array(IMAGENET_MEAN, np.float32)) / (255 * np.array(IMAGENET_STD, np.float32))
    back_mask = np.full((41, 41), 255, np.uint8)
    back_mask[:24, :40] = cv2.resize(mask, (40, 24), interpolation=cv2.INTER_NEAREST)
    image_t, mask_t = small(image, mask)
    assert torch.allclose(image_t, torch.from_numpy(expected.transpose(2, 0, 1)), atol=1e-4)
    assert torch.equal(mask_t, torch.from_numpy(back_mask).long())


def one_hot_logits(label: torch.Tensor) -> torch.Tensor:
    """(h, w) 0/1/255 labels -> (1, 2, h, w) logits whose argmax is the label (255 counts as background)."""
    foreground = (label == 1).float()
    return torch.stack([1.0 - foreground, foreground])[None] * 10.0


@pytest.mark.parametrize("canvas", ["pfenet", "bam"])
@pytest.mark.parametrize("shape", [(120, 200), (70, 50), (150, 93)])
def test_prediction_is_cropped_to_the_content_and_scored_at_original_size(canvas, shape) -> None:
    height, width = shape
    mask = np.zeros(shape, np.uint8)
    mask[height // 4 : height // 2, width // 3 : (3 * width) // 4] = 1
    transform = TestTransform("original", size=97, canvas=canvas)
    _, mask_t = transform(random_image(height, width), mask)
    logits = one_hot_logits(mask_t)
    logits[:, 1, mask_t == 255] = 10.0  # garbage "foreground" on the padding: the crop must drop it
    scored = transform.score_logits(logits, shape)
    assert scored.shape == (1, 2, height, width)
    pred = scored.argmax(dim=1)[0]
    truth = transform.score_mask(mask)
    intersection = int(((pred == 1) & (truth == 1)).sum())
    union = int(((pred == 1) | (truth == 1)).sum())
    assert intersection / union > 0.9
    assert not pred[-1].any() and not pred[:, -1].any()  # nothing of the padding leaks in
    if transform.content_shape(height, width) == shape:  # unscaled: exact
        assert torch.equal(pred, truth)


def test_resized_resolution() -> None:
    transform = TestTransform("resized", size=40)
    image, mask = random_image(50, 80), labelled_mask(50, 80)
    image_t, mask_t = transform(image, mask)
    assert image_t.shape == (3, 40, 40) and image_t.dtype == torch.float32
    assert mask_t.shape == (40, 40) and mask_t.dtype == torch.int64
    assert set(mask_t.unique().tolist()) <= {0, 3, 7, 255}
    assert (mask_t[0] == 255).all()  # the 255 top row survives nearest resizing; no padding anywhere else
    score = transform.score_mask(mask)
    assert torch.equal(score, mask_t)


def test_denormalize_inverts_the_input_normalisation() -> None:
    image = random_image(24, 24, seed=3)
    image_t, _ = TestTransform("resized", size=24)(image, np.zeros((24, 24), dtype=np.uint8))
    assert np.array_equal(denormalize(image_t), image)


def test_bad_inputs_raise() -> None:
    transform = TestTransform("original", size=40)
    with pytest.raises(ValueError, match="uint8"):
        transform(np.zeros((10, 10, 3), dtype=np.float32), np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="mask"):
        transform(np.zeros((10, 10, 3), dtype=np.uint8), np.zeros((10, 11), dtype=np.uint8))
    with pytest.raises(ValueError, match="resolution"):
        TestTransform("native", size=40)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="canvas"):
        TestTransform("original", size=40, canvas="grey")  # type: ignore[arg-type]


def test_flip_and_scale_move_image_and_mask_together() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :2] = 255
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :2] = 1  # object in the two leftmost columns, drawn white in the image
    flip = {**STILL, "flip_prob": 1.0}
    image_t, mask_t = TrainTransform(TransformConfig(crop_size=8, **flip))(image, mask, 0)
    assert (mask_t[:, 6:] == 1).all() and (mask_t[:, :6] == 0).all()
    assert (image_t[:, :, 6:] > 1.5).all() and (image_t[:, :, :6] < -1.5).all()
    double = {**STILL, "scale_min": 2.0, "scale_max": 2.0}
    image_t, mask_t = TrainTransform(TransformConfig(crop_size=16, **double))(image, mask, 0)
    assert (mask_t[:, :4] == 1).all() and (mask_t[:, 4:] == 0).all()  # 8x8 -> 16x16, no padding left


def test_augmented_geometry_stays_aligned() -> None:
    transform = TrainTransform(TransformConfig(crop_size=48, rotate_degrees=10.0, blur_prob=0.0))
    mask = labelled_mask(60, 70)
    image = np.where((mask == 3)[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    for seed in range(5):
        image_t, mask_t = transform(image, mask, seed)
        red = image_t[0]  # bilinear blurs only the edges: the bulk follows the mask
        assert red[mask_t == 3].median() > 1.5 and red[mask_t == 0].median() < -1.5


def test_crop_redraws_to_keep_the_object() -> None:
    # PFENet's Crop: redraw while less than 85% of the foreground is inside (at most 31 redraws).
    transform = TrainTransform(TransformConfig(crop_size=16, **STILL))
    mask = np.zeros((16, 64), dtype=np.uint8)
    mask[4:12, 40:48] = 1  # a single draw keeps all of it only when the left edge is in 32..40 (9 of 49)
    image = random_image(16, 64)
    for seed in range(10):
        _, mask_t = transform(image, mask, seed)
        assert int((mask_t == 1).sum()) >= 0.85 * 64


def test_eval_canvas_method_means_the_methods_own() -> None:
    from fssmeta.evaluation import scoring_transform
    from fssmeta.params import load_config

    cfg = load_config(None)
    assert cfg.eval.canvas == "method"
    assert scoring_transform(cfg, "bam").canvas == "bam" and scoring_transform(cfg, "pfenet").canvas == "pfenet"
    assert scoring_transform(load_config(None, ["eval.canvas=mean"]), "bam").canvas == "mean"
    assert scoring_transform(load_config(None, ["eval.canvas=bam"]), "pfenet").canvas == "bam"
