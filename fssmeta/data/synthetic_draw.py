"""Drawing for the synthetic dataset: shape polygons, textures, colours, cluttered backgrounds, scenes and
the appearance shifts of the cross-domain targets. Every function draws from the `rng` it is given."""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image, ImageDraw

SOURCE_SHAPES = ("disc", "square", "triangle", "star", "cross")
SOURCE_TEXTURES = ("stripes", "dots", "checker", "rings", "waves")
TARGET_SHAPES = ("hexagon", "crescent", "heart", "arrow", "ring")
TARGET_TEXTURES = ("hatch", "bricks", "spiral", "speckle", "diamonds", "sunburst", "zigzag")

# One shared pool: every object (and every clutter patch) draws its two colours from it, so colour
# never identifies a class.
COLOUR_POOL = np.array(
    [[220, 40, 40], [40, 170, 60], [40, 80, 220], [240, 210, 40], [40, 200, 210], [200, 60, 200],
     [250, 140, 30], [120, 60, 170], [240, 240, 240], [25, 25, 25], [130, 80, 40], [250, 160, 190],
     [150, 220, 60], [20, 40, 110], [30, 120, 120], [128, 128, 128]], dtype=np.float32)
# Colour pairs far enough apart that the texture stays visible.
_PAIRS = np.array([(i, j) for i in range(len(COLOUR_POOL)) for j in range(len(COLOUR_POOL))
                   if np.linalg.norm(COLOUR_POOL[i] - COLOUR_POOL[j]) > 120])

Parts = list[tuple[np.ndarray, int]]  # polygons (N, 2) in drawing order with their fill: 1 draws, 0 cuts


def _circle(n: int, radius: float = 1.0, cx: float = 0.0, cy: float = 0.0, phase: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False) + phase
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    t = np.arange(2 * points) * np.pi / points - np.pi / 2
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.0


_W = 0.32  # half width of the cross arms
_UNIT_PARTS: dict[str, Parts] = {
    "disc": [(_circle(40), 1)],
    "square": [(np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]), 1)],
    "triangle": [(_circle(3, 1.15, 0.0, 0.2, -np.pi / 2), 1)],
    "star": [(_star(5, 1.15, 0.48), 1)],
    "cross": [(np.array([[-_W, -1], [_W, -1], [_W, -_W], [1, -_W], [1, _W], [_W, _W], [_W, 1], [-_W, 1],
                         [-_W, _W], [-1, _W], [-1, -_W], [-_W, -_W]], dtype=float), 1)],
    "hexagon": [(_circle(6), 1)],
    "crescent": [(_circle(40), 1), (_circle(40, 0.8, 0.5, -0.15), 0)],
    "heart": [(_heart(), 1)],
    "arrow": [(np.array([[-1, -0.3], [0.15, -0.3], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, 0.3],
                         [-1, 0.3]]), 1)],
    "ring": [(_circle(40), 1), (_circle(40, 0.55), 0)],
}


def rasterise(parts: Parts, size: int) -> np.ndarray:
    """Draw polygons on a (size, size) canvas; polygons need no anti-aliasing, so the mask is exact."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in parts:
        draw.polygon(points.ravel().tolist(), fill=fill)
    return np.asarray(canvas) > 0


# Area of each unit shape, measured on a raster (exact for holes and the crescent's partial cut), so a
# shape can be drawn with a requested pixel area. Irregular blobs are close to a unit disc.
UNIT_AREA = {name: float(rasterise([(p * 100 + 128, f) for p, f in parts], 256).sum()) / 100**2
             for name, parts in _UNIT_PARTS.items()} | {"blob": math.pi}


def _blob(rng: np.random.Generator) -> Parts:
    # Low harmonics with at least a third-order lump, so a blob never passes for a disc or an ellipse.
    t = np.linspace(0.0, 2 * np.pi, 36, endpoint=False)
    amps = rng.uniform(0.08, 0.25, 4)
    amps[1] = rng.uniform(0.22, 0.35)
    radius = 1 + sum(a * np.cos(k * t + p) for k, a, p in zip(range(2, 6), amps, rng.uniform(0, 2 * np.pi, 4)))
    radius = np.maximum(radius, 0.35)
    return [(np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1), 1)]


def texture_pattern(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 0/1 pattern over object-local coordinates measured in texture periods (it rotates with the object)."""
    pu, pv = rng.random(2)  # lattice phase, so patterns are not always aligned with the object centre
    a, b = u + pu, v + pv
    if name == "stripes":
        p = a % 1 < 0.5
    elif name == "dots":
        p = (a % 1 - 0.5) ** 2 + (b % 1 - 0.5) ** 2 < 0.1
    elif name == "checker":
        p = (np.floor(a) + np.floor(b)) % 2 < 1
    elif name == "rings":
        p = np.hypot(u, v) % 1 < 0.5
    elif name == "waves":
        p = (b + 0.35 * np.sin(np.pi * a)) % 1 < 0.5
    elif name == "hatch":
        p = (a % 1 < 0.22) | (b % 1 < 0.22)
    elif name == "bricks":
        p = (b % 1 < 0.2) | ((0.5 * a + 0.5 * np.floor(b)) % 1 < 0.1)
    elif name == "spiral":
        p = (0.8 * np.hypot(u, v) + np.arctan2(v, u) / (2 * np.pi)) % 1 < 0.5
    elif name == "speckle":
        angles, freqs, phases = rng.uniform(0, np.pi, 5), rng.uniform(1.5, 3.5, 5), rng.uniform(0, 6.3, 5)
        field = sum(np.cos(f * (u * np.cos(d) + v * np.sin(d)) + ph) for d, f, ph in zip(angles, freqs, phases))
        p = field > 0
    elif name == "diamonds":
        p = np.abs(a % 1 - 0.5) + np.abs(b % 1 - 0.5) < 0.28
    elif name == "sunburst":
        p = (np.arctan2(v, u) * (6 / np.pi) + pu) % 1 < 0.5
    elif name == "zigzag":
        p = (b + 1.2 * np.abs(0.5 * a % 1 - 0.5)) % 1 < 0.5
    else:
        raise ValueError(f"unknown texture {name!r}")
    return p.astype(np.float32)


def colour_pair(rng: np.random.Generator) -> np.ndarray:
    """Two contrasting colours (2, 3) from the shared pool, jittered."""
    i, j = _PAIRS[rng.integers(len(_PAIRS))]
    return COLOUR_POOL[[i, j]] + rng.normal(0.0, 12.0, (2, 3)).astype(np.float32)


def draw_object(image: np.ndarray, rng: np.random.Generator, shape: str, texture: str,
                centre: tuple[float, float], radius: float, alpha: float = 1.0) -> np.ndarray:
    """Paint a textured shape into `image` (H, W, 3) float32 in place; return its (H, W) bool mask."""
    size = image.shape[0]
    angle, aspect = rng.uniform(0, 2 * np.pi), math.exp(rng.uniform(-0.25, 0.25))
    cos, sin = math.cos(angle), math.sin(angle)
    parts = _blob(rng) if shape == "blob" else _UNIT_PARTS[shape]
    rotation = np.array([[cos, sin], [-sin, cos]])  # row vectors times this = rotate by `angle`
    placed = [((p * [aspect, 1 / aspect]) @ rotation * radius + centre, fill) for p, fill in parts]
    mask = rasterise(placed, size)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx -= centre[0]
    dy -= centre[1]
    period = max(4.0, radius * rng.uniform(0.3, 0.5))
    pattern = texture_pattern(texture, (dx * cos + dy * sin) / period, (dy * cos - dx * sin) / period, rng)
    colours = colour_pair(rng)
    # A soft lighting gradient across the object, so it is not perfectly flat.
    light = 1.0 + 0.12 * (dx * rng.normal() + dy * rng.normal()) / radius
    paint = (colours[0] + pattern[..., None] * (colours[1] - colours[0])) * light[..., None]
    inside = mask[y0:y1, x0:x1]
    region = image[y0:y1, x0:x1]
    region[inside] = (1 - alpha) * region[inside] + alpha * paint[inside]
    return mask


def smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """(size, size, 3) float32 noise with about `cells` bumps per side (bicubic upsampling of a grid)."""
    grid = rng.normal(0.0, amplitude, (cells, cells, 3)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def draw_background(rng: np.random.Generator, size: int, clutter_textures: tuple[str, ...],
                    decoys: tuple[tuple[str, str], ...] = ()) -> np.ndarray:
    """Smooth noise, textured irregular blobs, lines and sometimes a decoy shape: (size, size, 3) float32."""
    image = rng.uniform(50, 200, 3).astype(np.float32) + smooth_noise(rng, size, 4, 35.0)
    image += smooth_noise(rng, size, 12, 10.0)
    for _ in range(int(rng.integers(1, 4))):
        texture = clutter_textures[rng.integers(len(clutter_textures))]
        draw_object(image, rng, "blob", texture, tuple(rng.uniform(0, size, 2)), size * rng.uniform(0.08, 0.25),
                    alpha=rng.uniform(0.4, 0.75))
    for _ in range(int(rng.integers(0, 4))):
        p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(image, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])),
                 colour_pair(rng)[0].tolist(), int(rng.integers(1, 4)))
    # A shape with the one texture it never carries as a class: background, a hard negative.
    if decoys and rng.random() < 0.35:
        shape, texture = decoys[rng.integers(len(decoys))]
        draw_object(image, rng, shape, texture, tuple(rng.uniform(0.15, 0.85, 2) * size),
                    size * rng.uniform(0.08, 0.16))
    return image


def _centre(rng: np.random.Generator, size: int, radius: float, inside: bool) -> tuple[float, float]:
    if not inside:
        return tuple(rng.uniform(0.1, 0.9, 2) * size)
    margin = min(1.2 * radius, size / 2)  # keep the whole shape in the frame
    return tuple(rng.uniform(margin, size - margin, 2))


def render_scene(rng: np.random.Generator, size: int, objects: list[tuple[str, str, float, bool]],
                 clutter_textures: tuple[str, ...], decoys: tuple[tuple[str, str], ...] = ()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Draw `objects` (shape, texture, area in pixels, keep inside the frame) in order over a background.

    Returns the float image (H, W, 3) and the visible-instance map (H, W) uint8: k + 1 where object k is
    the topmost, 0 elsewhere (later objects occlude earlier ones).
    """
    image = draw_background(rng, size, clutter_textures, decoys)
    labels = np.zeros((size, size), np.uint8)
    for k, (shape, texture, area, inside) in enumerate(objects):
        radius = math.sqrt(area / UNIT_AREA[shape])
        mask = draw_object(image, rng, shape, texture, _centre(rng, size, radius, inside), radius)
        labels[mask] = k + 1
    return image, labels


def render_tiles(rng: np.random.Generator, size: int, textures: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Irregular textured regions over a plain background: no shape cue, only the texture names the class."""
    image = rng.uniform(40, 120, 3).astype(np.float32) + smooth_noise(rng, size, 3, 12.0)
    labels = np.zeros((size, size), np.uint8)
    for k, texture in enumerate(textures):
        radius = size * math.sqrt(rng.uniform(0.08, 0.25) / math.pi)
        mask = draw_object(image, rng, "blob", texture, tuple(rng.uniform(0.2, 0.8, 2) * size), radius)
        labels[mask] = k + 1
    return image, labels


def finish(rng: np.random.Generator, image: np.ndarray, noise: float = 4.0) -> np.ndarray:
    """Sensor noise and quantisation: float (H, W, C) -> uint8."""
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def to_gray(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Grayscale, low contrast, noisy: (H, W, 3) float -> (H, W) uint8."""
    luma = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    luma = 128 + (luma - 128) * rng.uniform(0.3, 0.45) + rng.uniform(-20, 20)
    return finish(rng, luma, noise=rng.uniform(6.0, 12.0))


def to_hazy(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A strong colour cast, haze thickening towards the top, and blur: (H, W, 3) float -> uint8."""
    size = image.shape[0]
    cast = rng.uniform(0.5, 0.8, 3).astype(np.float32)
    cast[rng.integers(3)] = rng.uniform(1.1, 1.3)
    haze = rng.uniform(190, 240) * (0.85 + 0.15 * cast / cast.max())
    depth = np.linspace(rng.uniform(0.3, 0.45), rng.uniform(0.55, 0.75), size, dtype=np.float32)[:, None, None]
    hazy = image * cast * depth + haze * (1 - depth)
    sigma = rng.uniform(1.0, 1.8)
    return finish(rng, cv2.GaussianBlur(hazy.astype(np.float32), (0, 0), sigma), noise=3.0)


def to_underwater(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Red absorbed, a blue-green veil, uneven light: (H, W, 3) float -> uint8."""
    size = image.shape[0]
    tint = np.array([rng.uniform(0.35, 0.55), rng.uniform(0.8, 0.95), rng.uniform(0.9, 1.05)], np.float32)
    veil = np.array([10, rng.uniform(70, 110), rng.uniform(100, 140)], np.float32)
    light = 1.0 + smooth_noise(rng, size, 3, 0.15)
    return finish(rng, (image * tint * 0.7 + veil * 0.3) * light, noise=5.0)
