"""Decoding what a user sends: PNG / JPEG images and support masks (EXIF orientation, bit depth, the mask rule
and its two options) and the per-image size limits, each checked from the header before any pixel is decoded.
`fssmeta predict` and the served model (fssmeta/predict.py) both read their inputs here."""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fssmeta.episode import IGNORE_INDEX

# Limits per image, checked from the header before any pixel is decoded; each read from its environment variable
# at every call. The output (H, W) probability and its PNGs scale with the pixels; the side and aspect limits keep
# a sliver from shrinking to nothing on the model's square canvas (at 64:1 and test_size 473 the short side
# keeps 7 pixels).
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PIXELS_ENV = "FSSMETA_MAX_IMAGE_PIXELS"
MAX_IMAGE_SIDE = 8192
MAX_SIDE_ENV = "FSSMETA_MAX_IMAGE_SIDE"
MAX_ASPECT_RATIO = 64  # longer side / shorter side
MAX_ASPECT_ENV = "FSSMETA_MAX_ASPECT_RATIO"
IMAGE_FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MASK_RULE = """Masks are single-channel PNGs (8-bit, palette or 16-bit; RGB/RGBA ones are converted to grayscale),
read by one of three rules:
  default: 0 = background. One non-zero value only (a plain 0/255 or 0/1 mask): it is foreground. One value v
    besides 0 and 255 (a PASCAL one-class mask): v = foreground, 255 = ignore (PASCAL outlines objects with it).
    Several values besides 0 and 255 (a multi-class label map, or an anti-aliased mask's soft edge) are
    ambiguous: an error that lists them; choose one of the two options below.
  mask threshold T (`--mask-threshold T`, request field `mask_threshold`): value >= T = foreground, else
    background, no ignore label; for anti-aliased 0/255 masks (e.g. T = 128).
  mask class ID (`--mask-class ID`, request field `mask_class`): a label map; value == ID = foreground,
    255 = ignore (unless ID is 255), any other value = background; the mask must hold ID.
  A JPEG mask (lossy) is thresholded at 128 (or T) with no ignore label; a mask class needs a PNG.
Images and masks are first turned upright by their EXIF orientation (as viewers show them), and 16-bit images
scaled to 8 bits by their bit depth."""


class RequestError(ValueError):
    """Bad prediction input: an undecodable or too large image, a wrong mask, a wrong number of supports."""


def env_limit(name: str, default: int) -> int:
    """The positive integer in environment variable `name`, else `default`; a malformed value is a ValueError
    naming the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return limit


def max_image_pixels() -> int:
    """The pixel limit per image: FSSMETA_MAX_IMAGE_PIXELS if set, else MAX_IMAGE_PIXELS."""
    return env_limit(MAX_PIXELS_ENV, MAX_IMAGE_PIXELS)


def max_image_side() -> int:
    """The limit on an image's longer side: FSSMETA_MAX_IMAGE_SIDE if set, else MAX_IMAGE_SIDE."""
    return env_limit(MAX_SIDE_ENV, MAX_IMAGE_SIDE)


def max_aspect_ratio() -> int:
    """The limit on longer side / shorter side: FSSMETA_MAX_ASPECT_RATIO if set, else MAX_ASPECT_RATIO."""
    return env_limit(MAX_ASPECT_ENV, MAX_ASPECT_RATIO)


def check_image_size(width: int, height: int, what: str) -> None:
    """RequestError naming the limit and its variable unless a width x height image is within the pixel,
    longer-side and aspect-ratio limits."""
    pixels, side, short = width * height, max(width, height), max(1, min(width, height))
    if pixels > (limit := max_image_pixels()):
        raise RequestError(f"{what}: image too large: {width}x{height} = {pixels} pixels, at most {limit} allowed "
                           f"({MAX_PIXELS_ENV})")
    if side > (limit := max_image_side()):
        raise RequestError(f"{what}: image too long: {width}x{height}, its longer side {side} pixels, at most "
                           f"{limit} allowed ({MAX_SIDE_ENV})")
    if side > short * (limit := max_aspect_ratio()):
        raise RequestError(f"{what}: image too thin: {width}x{height}, an aspect ratio of {side / short:.1f}:1, at "
                           f"most {limit}:1 allowed ({MAX_ASPECT_ENV})")


def check_mask_options(threshold: int | None, class_id: int | None) -> None:
    """RequestError unless at most one of a mask threshold (1-65535) and a mask class (1-65535) is given."""
    if threshold is not None and class_id is not None:
        raise RequestError("mask threshold and mask class both given: use one (a threshold for anti-aliased 0/255 "
                           "masks, a class for label maps)")
    for name, value in (("mask threshold", threshold), ("mask class", class_id)):
        if value is not None and not 1 <= value <= 65535:
            raise RequestError(f"{name} {value}: expected an integer from 1 to 65535")


def _values_listing(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:12])
    return shown + (f", ... ({len(values)} values)" if len(values) > 12 else "")


def mask_labels(values: np.ndarray, what: str = "mask", *, threshold: int | None = None,
                class_id: int | None = None) -> np.ndarray:
    """Stored mask values (H, W) -> labels 0/1/255 by the rule in MASK_RULE: `threshold` T or `class_id` ID if
    given (at most one), else the default rule; an ambiguous mask or a missing class is a RequestError naming
    `what`."""
    values = np.asarray(values)
    check_mask_options(threshold, class_id)
    if threshold is not None:
        return (values >= threshold).astype(np.uint8)
    if values.dtype == np.uint8:  # the values present: bincount is linear, unique sorts
        present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    else:
        present = np.unique(values)
    if class_id is not None:
        if class_id not in present:
            raise RequestError(f"{what}: mask class {class_id} is not in the mask (values found: "
                               f"{_values_listing(present)})")
        labels = (values == class_id).astype(np.uint8)
        if class_id != 255:
            labels[values == 255] = IGNORE_INDEX
        return labels
    classes = present[(present != 0) & (present != 255)]
    if len(classes) > 1:
        raise RequestError(f"{what}: ambiguous mask: it holds {len(classes)} values besides 0 and 255 "
                           f"({_values_listing(classes)}): for a label map pick one class with --mask-class ID "
                           f"(request field mask_class), for an anti-aliased 0/255 mask give --mask-threshold T "
                           f"(mask_threshold), e.g. 128")
    labels = (values != 0).astype(np.uint8)
    if len(classes) == 1 and 255 in present:
        labels[values == 255] = IGNORE_INDEX
    return labels


def _to_8bit(image: Image.Image, data: bytes) -> np.ndarray:
    """A 16- or 32-bit grayscale image ('I;16*', 'I') -> (H, W) uint8 scaled by its bit depth (the PNG header's;
    Pillow's own conversion clips at 255 instead)."""
    depth = data[24] if data.startswith(PNG_SIGNATURE) and len(data) > 24 else 16
    top = (1 << depth) - 1
    values = np.clip(np.asarray(image).astype(np.int64), 0, top)
    return ((values * 255 + top // 2) // top).astype(np.uint8)


def decode_image(data: bytes, what: str, *, mask: bool = False, form: str = "a PNG or JPEG image",
                 mask_threshold: int | None = None, mask_class: int | None = None) -> np.ndarray:
    """PNG or JPEG bytes -> an RGB image (H, W, 3) uint8, or with `mask` labels (H, W) uint8 0/1/255 by
    MASK_RULE (`mask_threshold` / `mask_class` choose its options), both turned upright by the EXIF orientation.

    The size is checked against the limits (`check_image_size`) from the header, before any pixel is decoded;
    every failure is a RequestError naming `what`.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own limit, far above the default one
        raise RequestError(f"{what}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"{what}: not {form}") from None
    with image:
        check_image_size(*image.size, what)
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # as viewers show it; the result carries no orientation
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise RequestError(f"{what}: not {form} (corrupt or truncated: {exc})") from None
        if not mask:
            if image.mode.startswith("I"):  # 16-bit grayscale PNG (16-bit RGB comes as 8-bit "RGB" already)
                return np.repeat(_to_8bit(image, data)[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        if image.format in ("JPEG", "MPO"):  # lossy: 255 and 0 come back as 250-255 and 0-5
            if mask_class is not None:
                raise RequestError(f"{what}: a JPEG mask is lossy: a mask class needs a PNG label map")
            check_mask_options(mask_threshold, None)
            return (np.asarray(image.convert("L")) >= (mask_threshold or 128)).astype(np.uint8)
        single = image.mode in ("L", "P") or image.mode.startswith("I")  # "1" and colour: to 8-bit gray
        return mask_labels(np.asarray(image if single else image.convert("L")), what, threshold=mask_threshold,
                           class_id=mask_class)


def decode_base64(value: Any, what: str, *, mask: bool = False, mask_threshold: int | None = None,
                  mask_class: int | None = None) -> np.ndarray:
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
    return decode_image(data, what, mask=mask, form=form, mask_threshold=mask_threshold, mask_class=mask_class)


def read_image_file(path: str | Path, what: str, *, mask: bool = False, mask_threshold: int | None = None,
                    mask_class: int | None = None) -> np.ndarray:
    """A PNG or JPEG file -> `decode_image`; a missing file is a RequestError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"{what} {path}: file not found")
    return decode_image(path.read_bytes(), f"{what} {path}", mask=mask, mask_threshold=mask_threshold,
                        mask_class=mask_class)


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
