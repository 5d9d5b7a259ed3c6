"""Segment a query from supports with a trained model: the one core behind serving (the MLflow pyfunc model) and
`fssmeta predict`; both decode their inputs with fssmeta/decoding.py.

Cost is bounded by the query's own size: every image is refused from its header beyond the pixel, longer-side
and aspect-ratio limits (fssmeta/decoding.py), a served request beyond its row and time limits
(fssmeta/served.py), the
model runs on its fixed `eval.test_size` canvas, and its logits are resampled straight to the query's (H, W),
never through a square of the longer side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fssmeta.config import Config
from fssmeta.decoding import RequestError, check_image_size, png_bytes


def load_checkpoint_model(checkpoint: str | Path, info: dict[str, Any]) -> tuple[Any, Config]:
    """The trained model (eval mode, CPU) and its config, rebuilt from a checkpoint and `info` (fold, shot,
    base_classes) by `runs.model_from_checkpoint`; weights load with `torch.load(weights_only=True)`."""
    from fssmeta.checkpoint import read_checkpoint
    from fssmeta.runs import model_from_checkpoint

    return model_from_checkpoint(read_checkpoint(checkpoint), shot=int(info["shot"]),
                                 base_classes=list(info["base_classes"]), source=checkpoint)


def load_training_checkpoint(checkpoint: str | Path, *, shot: int | None = None,
                             fold: int | None = None) -> tuple[Any, Config, dict[str, Any]]:
    """A checkpoint written by training, with no registry info: the model (eval mode, CPU), its config and
    the info derived from that config: shot `train.shot` and fold `train.fold` unless given, base classes
    from `runs.fold_base_classes`."""
    from fssmeta.checkpoint import read_checkpoint
    from fssmeta.runs import fold_base_classes, model_from_checkpoint, stored_config

    payload = read_checkpoint(checkpoint)
    cfg = stored_config(payload, checkpoint)
    fold = cfg.train.fold if fold is None else fold
    info = {"fold": fold, "shot": cfg.train.shot if shot is None else shot,
            "base_classes": fold_base_classes(cfg, fold), "method": cfg.model.method}
    model, cfg = model_from_checkpoint(payload, shot=info["shot"], base_classes=info["base_classes"], source=checkpoint)
    return model, cfg, info


# --------------------------------------------------------------------------------------------- the core

def check_supports(shot: int, supports: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   names: Sequence[str] | None = None) -> None:
    """RequestError unless there are `shot` RGB supports with one 0/1/255 mask each, of its image's size and
    with a foreground pixel. `names` label the masks in messages (default `support_masks[i]`)."""
    if not supports:
        raise RequestError(f"no support image given: this is a {shot}-shot model, it takes {shot} support "
                           f"image(s) with their masks")
    if len(masks) != len(supports):
        raise RequestError(f"{len(supports)} support image(s) but {len(masks)} support mask(s): one mask per image")
    if len(supports) != shot:
        raise RequestError(f"this is a {shot}-shot model: it takes {shot} support image(s), got {len(supports)}")
    names = list(names) if names is not None else [f"support_masks[{i}]" for i in range(len(masks))]
    for i, (image, mask) in enumerate(zip(supports, masks)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RequestError(f"support image {i}: expected (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        if mask.dtype != np.uint8 or not np.isin(mask, (0, 1, 255)).all():
            raise RequestError(f"{names[i]}: expected uint8 labels 0, 1 and 255")
        if mask.shape != image.shape[:2]:
            raise RequestError(f"{names[i]}: the mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its support "
                               f"image is {image.shape[0]}x{image.shape[1]}: they must have the same size")
        if not (mask == 1).any():
            raise RequestError(f"{names[i]}: the mask has no foreground pixel (all background or ignore)")


def segment_arrays(model: Any, cfg: Config, shot: int, query: np.ndarray, supports: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray]) -> np.ndarray:
    """Foreground probability (H, W) float32 of `query` (H, W, 3) uint8 RGB at its own size, given `shot`
    supports (h, w, 3) uint8 and their (h, w) masks (0/1/255), resized as `cfg.eval` scores them.
    The model's device is used as it is; `foreground_mask` turns the probability into the mask. Every image
    must be within the size limits (`check_image_size`); the largest tensor is the (H, W) output."""
    import torch

    from fssmeta.episode import Episode

    check_sizes(query, supports)
    check_supports(shot, supports, masks)
    transform, query_img, query_mask, support_imgs, support_masks = scoring_tensors(model, cfg, query, supports,
                                                                                    masks)
    episode = Episode(support_imgs=support_imgs[None], support_masks=support_masks[None],  # (1, S, ...)
                      query_img=query_img, query_mask=query_mask,
                      class_id=torch.tensor([-1], device=query_img.device))  # novel: matches no base class
    with torch.inference_mode():
        logits = model(episode).logits.float()  # (1, 2, s, s)
        # softmax over two classes = sigmoid of their difference, and bilinear resampling is linear: resample
        # the one difference channel, not both.
        margin = at_query_size(transform, logits[:, 1:] - logits[:, :1], query.shape[:2])  # (1, 1, H, W)
        return margin[0, 0].sigmoid_().cpu().numpy().astype(np.float32, copy=False)  # (H, W)


def check_sizes(query: np.ndarray, supports: Sequence[np.ndarray]) -> None:
    """RequestError unless the query is (H, W, 3) uint8 and every image is within the size limits."""
    if query.dtype != np.uint8 or query.ndim != 3 or query.shape[2] != 3:
        raise RequestError(f"query image: expected (H, W, 3) uint8 RGB, got {query.dtype} {query.shape}")
    check_image_size(query.shape[1], query.shape[0], "query image")
    for i, image in enumerate(supports):
        check_image_size(image.shape[1], image.shape[0], f"support image {i}")


def scoring_tensors(model: Any, cfg: Config, query: np.ndarray, supports: Sequence[np.ndarray],
                     masks: Sequence[np.ndarray]) -> tuple[Any, ...]:
    """The scoring transform (`cfg.eval`) and the model-device tensors of checked images: transform, query
    (1, 3, s, s), its blank mask (1, s, s), supports (S, 3, s, s), support masks (S, s, s)."""
    import torch

    from fssmeta.evaluation import scoring_transform

    transform = scoring_transform(cfg)
    query_img, query_mask = transform(query, np.zeros(query.shape[:2], np.uint8))
    pairs = [transform(image, mask) for image, mask in zip(supports, masks)]
    device = next(model.parameters()).device
    return (transform, query_img[None].to(device), query_mask[None].to(device),
            torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device))


def at_query_size(transform: Any, logits: Any, size: tuple[int, int]) -> Any:
    """(1, K, s, s) canvas logits -> (1, K, H, W) at the query's size, as evaluation scores them (the content
    crop -> (H, W), or the whole square -> (H, W); on the `mean` canvas at `original` resolution without
    building the longer side's square)."""
    if transform.resolution == "original" and transform.canvas == "mean":
        return _mean_canvas_logits(logits, size)
    return transform.score_logits(logits, size)


def _mean_canvas_logits(logits: Any, size: tuple[int, int]) -> Any:
    """(1, K, h, w) -> (1, K, H, W) with the values of `TestTransform.score_logits` on the `mean` canvas (the
    whole canvas upsampled to L x L, L the longer side, then cut to (H, W)) without building the L x L square:
    a separable bilinear (align_corners=True) resampling at the same source positions."""
    import torch

    height, width = size
    side = max(height, width)
    rows = _bilinear_matrix(height, logits.shape[-2], side)  # (H, h)
    cols = _bilinear_matrix(width, logits.shape[-1], side)  # (W, w)
    return torch.einsum("hy,kyx,wx->khw", rows, logits[0].to(rows), cols)[None].to(logits.dtype)  # (1, K, H, W)


def _bilinear_matrix(count: int, source: int, side: int) -> Any:
    """(count, source) weights sampling output positions 0..count-1 of an align_corners=True resize of
    `source` samples to `side` (>= count) samples."""
    import torch

    step = (source - 1) / (side - 1) if side > 1 else 0.0
    position = torch.arange(count, dtype=torch.float64) * step
    low = position.floor().long().clamp_(0, source - 1)
    high = (low + 1).clamp_(max=source - 1)
    frac = (position - low).clamp_(0, 1)
    weights = torch.zeros(count, source, dtype=torch.float64)
    index = torch.arange(count)
    weights.index_put_((index, low), 1 - frac, accumulate=True)
    weights.index_put_((index, high), frac, accumulate=True)
    return weights.float()


def foreground_mask(prob: np.ndarray) -> np.ndarray:
    """(H, W) probability -> (H, W) uint8 0/1 mask: p >= 0.5, the argmax of the two classes."""
    return (prob >= 0.5).astype(np.uint8)


def probability_image(prob: np.ndarray) -> np.ndarray:
    """(H, W) probability -> (H, W) uint8 round(255 * p)."""
    return np.rint(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8)


def overlay(query: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The query (H, W, 3) with the foreground tinted 50% red and the mask's outline in yellow."""
    out = query.astype(np.float32)
    fg = mask.astype(bool)
    out[fg] = 0.5 * out[fg] + 0.5 * np.array([255.0, 0.0, 0.0])
    padded = np.pad(fg, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[fg & ~inner] = (255.0, 255.0, 0.0)  # a foreground pixel with a background 4-neighbour
    return out.round().astype(np.uint8)


def save_prediction(out: Path, stem: str, query: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Write `<stem>_mask.png` (0/255), `<stem>_probability.png` and `<stem>_overlay.png` into `out`; returns
    the query's size, foreground fraction and file names."""
    mask = foreground_mask(prob)
    files = {"mask": f"{stem}_mask.png", "probability": f"{stem}_probability.png", "overlay": f"{stem}_overlay.png"}
    for kind, array in (("mask", mask * 255), ("probability", probability_image(prob)),
                        ("overlay", overlay(query, mask))):
        (out / files[kind]).write_bytes(png_bytes(array))
    return {"height": int(mask.shape[0]), "width": int(mask.shape[1]), "foreground_fraction": float(mask.mean()),
            "files": files}
