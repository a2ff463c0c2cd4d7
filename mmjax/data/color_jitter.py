"""Colour jitter with torchvision's `ColorJitter` semantics on uint8 (H, W, 3) RGB images.

BEiT pretraining applies `ColorJitter(0.4, 0.4, 0.4)` to the decoded image before the crop.
Each enabled adjustment draws its factor uniformly from its range (a number `v` means
[max(0, 1 - v), 1 + v], hue `h` means [-h, h]; a (min, max) pair is used as given) and the four
are applied in a random order. The adjustments are PIL's, as on torchvision's PIL path, so each
matches torchvision exactly: brightness blends with black, contrast with the rounded mean of the
greyscale image, saturation with the greyscale image, and hue shifts H in PIL's 8-bit HSV.
Randomness comes only from the numpy Generator passed in (torchvision draws from torch's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance

from mmjax.data.image_ops import check_image

ADJUSTMENTS = ("brightness", "contrast", "saturation", "hue")
Jitter = float | Sequence[float]


def _error(message: str) -> ValueError:
    return ValueError(f"pp op 'color_jitter': {message}")


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """Scales every channel by `factor` (0 gives black)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """Moves pixels away from (factor > 1) or towards the mean grey level of the image."""
    return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    """Moves pixels away from (factor > 1) or towards their own grey level."""
    return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """Rotates the hue by `factor` turns (in [-0.5, 0.5]), truncated to PIL's 1/255 steps."""
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, np.int32) + int(factor * 255)) % 256  # wraps around, as a uint8 would
    h = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


_ADJUST = {"brightness": adjust_brightness, "contrast": adjust_contrast,
           "saturation": adjust_saturation, "hue": adjust_hue}


def _factor_range(name: str, value: Jitter) -> tuple[float, float] | None:
    """The (min, max) range of `name`'s factor, or None when it is the identity."""
    center, bound = (0.0, (-0.5, 0.5)) if name == "hue" else (1.0, (0.0, float("inf")))

    def is_number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if is_number(value):
        if value < 0:
            raise _error(f"{name} must be non-negative, got {value!r}")
        low, high = center - value, center + value
        if name != "hue":
            low = max(low, 0.0)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(is_number, value)):
        low, high = float(value[0]), float(value[1])
    else:
        raise _error(f"{name} must be a number or a (min, max) pair of numbers, got {value!r}")
    if not bound[0] <= low <= high <= bound[1]:
        limit = "0.5 (a half turn)" if name == "hue" else "[0, inf)"
        raise _error(f"{name} factor range must satisfy {bound[0]} <= min <= max <= {bound[1]}, "
                     f"got [{low}, {high}] from {value!r} (the limit is {limit})")
    return None if low == high == center else (low, high)


class ColorJitter:
    """The pp op `color_jitter(brightness, contrast, saturation, hue)`: uint8 image -> uint8 image.

    `color_jitter(0.4, 0.4, 0.4)` is BEiT pretraining's; place it before `normalize`.
    """

    def __init__(self, brightness: Jitter = 0.4, contrast: Jitter = 0.4, saturation: Jitter = 0.4,
                 hue: Jitter = 0.0):
        values = {"brightness": brightness, "contrast": contrast, "saturation": saturation,
                  "hue": hue}
        self.ranges = {name: _factor_range(name, values[name]) for name in ADJUSTMENTS}

    def sample(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        """The (adjustment, factor) pairs to apply, in order; disabled adjustments are left out."""
        order = rng.permutation(len(ADJUSTMENTS))
        factors = {name: float(rng.uniform(*r)) for name, r in self.ranges.items() if r is not None}
        return [(ADJUSTMENTS[i], factors[ADJUSTMENTS[i]]) for i in order
                if ADJUSTMENTS[i] in factors]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return apply(image, self.sample(rng))

    def __repr__(self) -> str:
        return "ColorJitter(" + ", ".join(f"{k}={v}" for k, v in self.ranges.items()) + ")"


def apply(image: np.ndarray, steps: Sequence[tuple[str, float]]) -> np.ndarray:
    """Applies the (adjustment, factor) `steps` in order to a uint8 (H, W, 3) image."""
    check_image("color_jitter", image)
    if not steps:
        return image
    img = Image.fromarray(np.ascontiguousarray(image))
    for name, factor in steps:
        if name not in _ADJUST:
            raise _error(f"unknown adjustment {name!r}; known: {list(ADJUSTMENTS)}")
        img = _ADJUST[name](img, factor)
    return np.array(img, dtype=np.uint8)
