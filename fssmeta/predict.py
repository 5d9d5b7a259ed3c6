"""Segment a query from supports with a trained model: the one core behind serving (the MLflow pyfunc model) and
`fssmeta predict`, with the image and mask decoding rules both use."""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fssmeta.config import Config
from fssmeta.episode import IGNORE_INDEX

MAX_IMAGE_PIXELS = 4096 * 4096  # per image, checked from the header before any pixel is decoded
MAX_PIXELS_ENV = "FSSMETA_MAX_IMAGE_PIXELS"  # overrides MAX_IMAGE_PIXELS; read at every call
IMAGE_FORMATS = ("PNG", "JPEG")
REQUEST_COLUMNS = ("query_img", "support_imgs", "support_masks")

MASK_RULE = """Masks are single-channel PNGs (8-bit, palette or 16-bit; RGB/RGBA ones are converted to grayscale):
  0 = background; 255 = ignore when the mask also holds other non-zero values (PASCAL: 255 outlines the
  objects), else foreground (a plain black/white mask); any other value = foreground (e.g. a VOC class id).
  A JPEG mask (lossy) is thresholded at 128 instead, with no ignore label."""

PYFUNC_INPUT = f"""Input: a pandas DataFrame (over HTTP: `dataframe_records` or `dataframe_split`), one episode per row:
  query_img      a base64-encoded PNG or JPEG image (any size)
  support_imgs   a list of `shot` base64-encoded PNG or JPEG images (sizes may differ from the query's)
  support_masks  a list of `shot` base64-encoded masks, each the size of its support image
{MASK_RULE}
Images hold at most {MAX_PIXELS_ENV} pixels (default {MAX_IMAGE_PIXELS}).
Output: one dict per row, at the query's own size:
  mask                    base64 PNG, mode L, 255 = foreground, 0 = background
  foreground_probability  base64 PNG, mode L, round(255 * p)
  foreground_fraction     share of the query's pixels in the mask
  height, width           the query's size"""


class RequestError(ValueError):
    """Bad prediction input: an undecodable or too large image, a wrong mask, a wrong number of supports."""


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


# --------------------------------------------------------------------------------------------- decoding


def max_image_pixels() -> int:
    """The pixel limit per image: FSSMETA_MAX_IMAGE_PIXELS if set, else MAX_IMAGE_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}: expected a positive integer, got {value!r}")
    return limit


def mask_labels(values: np.ndarray) -> np.ndarray:
    """Stored mask values (H, W) -> labels 0/1/255 by the rule in MASK_RULE."""
    values = np.asarray(values)
    labels = (values != 0).astype(np.uint8)
    if (values == 255).any() and ((values != 0) & (values != 255)).any():
        labels[values == 255] = IGNORE_INDEX
    return labels


def decode_image(data: bytes, what: str, *, mask: bool = False, form: str = "a PNG or JPEG image") -> np.ndarray:
    """PNG or JPEG bytes -> an RGB image (H, W, 3) uint8, or with `mask` labels (H, W) uint8 0/1/255.

    The size is checked against `max_image_pixels()` from the header, before any pixel is decoded; every
    failure is a RequestError naming `what`.
    """
    limit = max_image_pixels()
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own limit, far above the default one
        raise RequestError(f"{what}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"{what}: not {form}") from None
    with image:
        width, height = image.size
        if width * height > limit:
            raise RequestError(f"{what}: image too large: {width}x{height} = {width * height} pixels, at most "
                               f"{limit} allowed ({MAX_PIXELS_ENV})")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise RequestError(f"{what}: not {form} (corrupt or truncated: {exc})") from None
        if not mask:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        if image.format in ("JPEG", "MPO"):  # lossy: 255 and 0 come back as 250-255 and 0-5
            return (np.asarray(image.convert("L")) >= 128).astype(np.uint8)
        single = image.mode in ("L", "P") or image.mode.startswith("I")  # "1" and colour: to 8-bit gray
        return mask_labels(np.asarray(image if single else image.convert("L")))


def decode_base64(value: Any, what: str, *, mask: bool = False) -> np.ndarray:
    """A base64-encoded PNG or JPEG string (whitespace and a `data:...;base64,` prefix allowed) -> `decode_image`."""
    form = "a base64-encoded PNG or JPEG image"
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise RequestError(f"{what}: not {form} (got a {type(value).__name__}, expected a string)")
    if value.startswith("data:") and "," in value:
        value = value.partition(",")[2]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not {form} (invalid base64)") from None
    return decode_image(data, what, mask=mask, form=form)


def read_image_file(path: str | Path, what: str, *, mask: bool = False) -> np.ndarray:
    """A PNG or JPEG file -> `decode_image`; a missing file is a RequestError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"{what} {path}: file not found")
    return decode_image(path.read_bytes(), f"{what} {path}", mask=mask)


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


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
    The model's device is used as it is; `foreground_mask` turns the probability into the mask."""
    import torch

    from fssmeta.episode import Episode
    from fssmeta.evaluation import scoring_transform

    if query.dtype != np.uint8 or query.ndim != 3 or query.shape[2] != 3:
        raise RequestError(f"query image: expected (H, W, 3) uint8 RGB, got {query.dtype} {query.shape}")
    check_supports(shot, supports, masks)
    transform = scoring_transform(cfg)
    query_img, query_mask = transform(query, np.zeros(query.shape[:2], np.uint8))
    pairs = [transform(image, mask) for image, mask in zip(supports, masks)]
    device = next(model.parameters()).device
    episode = Episode(
        support_imgs=torch.stack([p[0] for p in pairs])[None].to(device),  # (1, S, 3, s, s)
        support_masks=torch.stack([p[1] for p in pairs])[None].to(device),  # (1, S, s, s)
        query_img=query_img[None].to(device),  # (1, 3, s, s)
        query_mask=query_mask[None].to(device),
        class_id=torch.tensor([-1], device=device),  # novel: matches no base class
    )
    with torch.inference_mode():
        logits = model(episode).logits.float()  # (1, 2, s, s)
    logits = transform.score_logits(logits, query.shape[:2])  # (1, 2, H, W), as evaluation scores it
    return logits.softmax(dim=1)[0, 1].cpu().numpy().astype(np.float32)  # (H, W)


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


def _image_list(value: Any, what: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise RequestError(f"{what}: expected a list of base64-encoded PNG or JPEG images, got a "
                           f"{type(value).__name__}")
    return list(value)


def segment_record(model: Any, cfg: Config, shot: int, record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One request row (see PYFUNC_INPUT) -> its output dict; `where` ("row 0") prefixes every error."""
    missing = [c for c in REQUEST_COLUMNS if c not in record]
    if missing:
        raise RequestError(f"{where}: missing field(s) {', '.join(missing)}")
    query = decode_base64(record["query_img"], f"{where} query_img")
    images = _image_list(record["support_imgs"], f"{where} support_imgs")
    labels = _image_list(record["support_masks"], f"{where} support_masks")
    supports = [decode_base64(v, f"{where} support_imgs[{i}]") for i, v in enumerate(images)]
    masks = [decode_base64(v, f"{where} support_masks[{i}]", mask=True) for i, v in enumerate(labels)]
    try:
        check_supports(shot, supports, masks, [f"support_masks[{i}]" for i in range(len(masks))])
    except RequestError as exc:
        raise RequestError(f"{where}: {exc}") from None
    prob = segment_arrays(model, cfg, shot, query, supports, masks)
    mask = foreground_mask(prob)
    return {"mask": base64.b64encode(png_bytes(mask * 255)).decode("ascii"),
            "foreground_probability": base64.b64encode(png_bytes(probability_image(prob))).decode("ascii"),
            "foreground_fraction": float(mask.mean()), "height": int(mask.shape[0]), "width": int(mask.shape[1])}
