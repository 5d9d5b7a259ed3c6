"""File-level helpers every reader shares: safe image / mask reads that name the file, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Bad input data; the message names the file (or list, or key) and what is wrong."""


class Problems:
    """Collects every bad file of a pass, then raises one `DataError` listing them all.

    `prepare` reports all the bad files of a dataset at once instead of stopping at the first.
    """

    def __init__(self, what: str, limit: int = 200) -> None:
        self.what = what
        self.limit = limit
        self.items: list[str] = []

    def add(self, path: str | Path, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def add_error(self, error: DataError) -> None:
        self.items.append(str(error))

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[: self.limit]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DataError(f"{self.what}: {len(self.items)} problem(s)\n  " + "\n  ".join(shown) + tail)


@dataclass(frozen=True)
class SampleRef:
    """One image of a segmentation dataset and its class-id mask (0 background, 1..C classes, 255 ignore)."""

    key: str  # unique within the dataset: the VOC image id, or the COCO image id as a string
    image: Path
    mask: Path


@contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """PIL's `Image.open`, with a missing, unreadable or corrupt file raised as a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as img:
            yield img
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt {what} ({exc})") from None


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3). Grayscale and palette files are expanded to RGB."""
    with open_image(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path) -> np.ndarray:
    """A single-channel label mask as uint8 (H, W), read with PIL and never colour-converted.

    VOC `SegmentationClass` PNGs are palette images whose pixel values are the class ids; converting them
    to RGB or grayscale would destroy the ids (docs/protocol.md section 1), so palette ('P') and 8-bit ('L') are read as
    they are and anything else is rejected.
    """
    with open_image(path, "mask") as img:
        if img.mode not in ("L", "P"):
            raise DataError(f"{path}: mask must be a single-channel 8-bit or palette PNG, got mode {img.mode}")
        return np.asarray(img, dtype=np.uint8).copy()


def read_rgb_mask(path: str | Path) -> np.ndarray:
    """A colour-coded mask (SUIM) as uint8 (H, W, 3)."""
    with open_image(path, "mask") as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_gray_mask(path: str | Path) -> np.ndarray:
    """A target-domain mask as 8-bit grayscale (H, W), whatever its stored mode (PATNet convention)."""
    with open_image(path, "mask") as img:
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) read from the header only."""
    with open_image(path) as img:
        return img.height, img.width


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    A failure midway leaves the old file (or no file) in place, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_png_atomic(path: str | Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG; with `palette`, as a VOC-style palette image."""
    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img.putpalette(palette)  # an 'L' image becomes 'P' with its values (the class ids) unchanged
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from None


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 entries, 768 ints), as the VOC release stores it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend([r, g, b])
    return palette
