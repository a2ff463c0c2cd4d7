"""Scene sampling and anti-aliased rendering for the procedural shapes data set.

A scene is one coloured shape on a plain background. The class (colour x shape)
is chosen by the caller; every other factor (size, grid position, jitter,
background shade, noise) is a nuisance drawn from the per-example generator, so
the images are reproducible from a seed alone.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "medium", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
BACKGROUNDS: tuple[str, ...] = ("dark", "gray", "light")

_BASE_RGB = {
    "red": (210, 40, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
}
_RADIUS = {"small": 0.14, "medium": 0.19, "large": 0.25}  # fraction of the side
_BACKGROUND_GRAY = {"dark": (25, 70), "gray": (95, 150), "light": (180, 235)}
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Scene:
    """All factors of one image; positions and radius are in [0, 1] units."""

    color: int
    shape: int
    size: int
    row: int
    column: int
    background: int
    center: tuple[float, float]  # (x, y)
    radius: float
    angle: float  # radians
    rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    noise_std: float
    noise_seed: int


def class_index(color: int, shape: int) -> int:
    """Index of the (colour, shape) class; classes are ordered colour-major."""
    return color * len(SHAPES) + shape


def sample_scene(rng: np.random.Generator, label: int) -> Scene:
    """Draws the nuisance factors of a scene whose class is `label`."""
    color, shape = divmod(label, len(SHAPES))
    size = int(rng.integers(len(SIZES)))
    row, column = int(rng.integers(3)), int(rng.integers(3))
    background = int(rng.integers(len(BACKGROUNDS)))

    radius = _RADIUS[SIZES[size]] * rng.uniform(0.92, 1.08)
    margin = radius * 1.3
    usable = 1.0 - 2 * margin
    cx = margin + (column + 0.5) / 3 * usable + rng.uniform(-1, 1) * usable / 10
    cy = margin + (row + 0.5) / 3 * usable + rng.uniform(-1, 1) * usable / 10
    angle = 0.0 if SHAPES[shape] == "circle" else math.radians(rng.uniform(-12, 12))

    base = np.array(_BASE_RGB[COLORS[color]], dtype=np.float64)
    rgb = np.clip(base + rng.normal(0, 12, size=3), 0, 255).astype(int)
    gray = rng.uniform(*_BACKGROUND_GRAY[BACKGROUNDS[background]])
    bg = np.clip(gray + rng.uniform(-8, 8, size=3), 0, 255).astype(int)
    return Scene(
        color=int(color),
        shape=int(shape),
        size=size,
        row=row,
        column=column,
        background=background,
        center=(float(cx), float(cy)),
        radius=float(radius),
        angle=float(angle),
        rgb=tuple(int(v) for v in rgb),
        background_rgb=tuple(int(v) for v in bg),
        noise_std=float(rng.uniform(1.0, 5.0)),
        noise_seed=int(rng.integers(2**31)),
    )


def _outline(shape: str) -> list[tuple[float, float]]:
    """Polygon vertices of a unit-radius shape centred on the origin (y down)."""
    def ring(n: int, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
        pts = []
        for k in range(n):
            a = math.radians(start_deg + 360.0 * k / n)
            r = radii[k % len(radii)]
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [1.2], 45.0)
    if shape == "diamond":
        return [(1.0, 0.0), (0.0, 1.3), (-1.0, 0.0), (0.0, -1.3)]
    if shape == "triangle":
        return [(x, y + 0.15) for x, y in ring(3, [1.3], -90.0)]
    if shape == "star":
        return ring(10, [1.35, 0.55], -90.0)
    if shape == "cross":
        w, length = 0.38, 1.1
        return [(w, -length), (w, -w), (length, -w), (length, w), (w, w), (w, length),
                (-w, length), (-w, w), (-length, w), (-length, -w), (-w, -w), (-w, -length)]
    raise ValueError(f"no outline for shape {shape!r}")


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """Renders `scene` as a uint8 (image_size, image_size, 3) array.

    The shape is drawn at 4x resolution and box-downsampled for anti-aliasing,
    then light Gaussian noise is added.
    """
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), scene.background_rgb)
    draw = ImageDraw.Draw(canvas)
    cx, cy = scene.center[0] * big, scene.center[1] * big
    r = scene.radius * big
    if SHAPES[scene.shape] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=scene.rgb)
    else:
        cos, sin = math.cos(scene.angle), math.sin(scene.angle)
        points = [
            (cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
            for x, y in _outline(SHAPES[scene.shape])
        ]
        draw.polygon(points, fill=scene.rgb)
    small = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    noise_rng = np.random.default_rng(scene.noise_seed)
    noisy = small + noise_rng.normal(0.0, scene.noise_std, size=small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
