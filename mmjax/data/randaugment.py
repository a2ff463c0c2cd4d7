"""RandAugment (Cubuk et al. 2020) with timm's semantics, on uint8 (H, W, 3) numpy images.

`randaugment(num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True)` is timm's
`rand-m9-mstd0.5-inc1`, the policy of DeiT, BEiT and MAE fine-tuning. Each of `num_layers`
layers picks one op uniformly (with replacement) and applies it with probability `prob`, at a
magnitude drawn from N(magnitude, magnitude_std) and clipped to [0, magnitude_max]; `op_table`
maps that magnitude (10 = timm's maximum) and a random sign to the op's argument. Geometric ops
fill uncovered pixels with `fill`, the normalisation mean in 0..255 (timm's `img_mean`).

The ops are PIL's, as in timm, so each matches timm's op exactly. Randomness comes only from the
numpy Generator passed in (timm draws from Python's and numpy's global generators).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mmjax.data.image_ops import NORMALIZE_PRESETS, check_image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# `interpolation='random'` picks one of these per op, as timm does when no interpolation is set.
_RANDOM_RESAMPLE = ("bilinear", "bicubic")


class Geometry(NamedTuple):
    """How the geometric ops fill uncovered pixels and resample."""

    fill: tuple[int, int, int]
    resample: Image.Resampling


# ---- the ops: (PIL image, argument, geometry) -> PIL image --------------------------------------

def auto_contrast(img: Image.Image, _arg: None, _geo: Geometry) -> Image.Image:
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image, _arg: None, _geo: Geometry) -> Image.Image:
    return ImageOps.equalize(img)


def invert(img: Image.Image, _arg: None, _geo: Geometry) -> Image.Image:
    return ImageOps.invert(img)


def posterize(img: Image.Image, bits: int, _geo: Geometry) -> Image.Image:
    """Keeps the `bits` most significant bits of each channel. 0 bits gives black, as in TF and
    in older Pillow; Pillow 13's ImageOps.posterize refuses it, so this builds its own table."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * 3)


def solarize(img: Image.Image, threshold: int, _geo: Geometry) -> Image.Image:
    """Inverts the pixels at or above `threshold`."""
    return ImageOps.solarize(img, threshold)


def solarize_add(img: Image.Image, add: int, _geo: Geometry) -> Image.Image:
    """Adds `add` (saturating at 255) to the pixels below 128."""
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


def color(img: Image.Image, factor: float, _geo: Geometry) -> Image.Image:
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img: Image.Image, factor: float, _geo: Geometry) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(factor)


def brightness(img: Image.Image, factor: float, _geo: Geometry) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, factor: float, _geo: Geometry) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(factor)


def rotate(img: Image.Image, degrees: float, geo: Geometry) -> Image.Image:
    return img.rotate(degrees, resample=geo.resample, fillcolor=geo.fill)


def _affine(img: Image.Image, matrix: tuple[float, ...], geo: Geometry) -> Image.Image:
    """Output pixel (x, y) samples input (a x + b y + c, d x + e y + f)."""
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=geo.resample,
                         fillcolor=geo.fill)


def shear_x(img: Image.Image, factor: float, geo: Geometry) -> Image.Image:
    return _affine(img, (1, factor, 0, 0, 1, 0), geo)


def shear_y(img: Image.Image, factor: float, geo: Geometry) -> Image.Image:
    return _affine(img, (1, 0, 0, factor, 1, 0), geo)


def translate_x(img: Image.Image, fraction: float, geo: Geometry) -> Image.Image:
    """Shifts by `fraction` of the width."""
    return _affine(img, (1, 0, fraction * img.width, 0, 1, 0), geo)


def translate_y(img: Image.Image, fraction: float, geo: Geometry) -> Image.Image:
    """Shifts by `fraction` of the height."""
    return _affine(img, (1, 0, 0, 0, 1, fraction * img.height), geo)


# ---- magnitude -> argument ----------------------------------------------------------------------

class OpSpec(NamedTuple):
    fn: Callable[[Image.Image, Any, Geometry], Image.Image]
    arg: Callable[[float, int], Any]  # (magnitude, sign +1/-1) -> the op's argument


def _no_arg(m: float, sign: int) -> None:
    return None


def _enhance(m: float, sign: int) -> float:
    """0.1 (strong) .. 1.9 (strong the other way) as the magnitude goes 0 .. 10; unsigned."""
    return m / 10 * 1.8 + 0.1


def _enhance_increasing(m: float, sign: int) -> float:
    """1 (identity) moving to 0.1 or 1.9 (random sign) as the magnitude goes 0 .. 10."""
    return max(0.1, 1.0 + sign * m / 10 * 0.9)


def op_table(translate_pct: float = 0.45) -> dict[str, OpSpec]:
    """Every op name (timm's spelling) -> its function and magnitude mapping."""
    return {
        "AutoContrast": OpSpec(auto_contrast, _no_arg),
        "Equalize": OpSpec(equalize, _no_arg),
        "Invert": OpSpec(invert, _no_arg),
        "Rotate": OpSpec(rotate, lambda m, s: s * m / 10 * 30.0),  # degrees, ±30
        "Posterize": OpSpec(posterize, lambda m, s: int(m / 10 * 4)),  # bits kept, 0 .. 4
        "PosterizeIncreasing": OpSpec(posterize, lambda m, s: 4 - int(m / 10 * 4)),  # 4 .. 0
        "Solarize": OpSpec(solarize, lambda m, s: min(256, int(m / 10 * 256))),  # 0 .. 256
        "SolarizeIncreasing": OpSpec(solarize, lambda m, s: 256 - min(256, int(m / 10 * 256))),
        "SolarizeAdd": OpSpec(solarize_add, lambda m, s: min(128, int(m / 10 * 110))),  # 0 .. 110
        "Color": OpSpec(color, _enhance),
        "ColorIncreasing": OpSpec(color, _enhance_increasing),
        "Contrast": OpSpec(contrast, _enhance),
        "ContrastIncreasing": OpSpec(contrast, _enhance_increasing),
        "Brightness": OpSpec(brightness, _enhance),
        "BrightnessIncreasing": OpSpec(brightness, _enhance_increasing),
        "Sharpness": OpSpec(sharpness, _enhance),
        "SharpnessIncreasing": OpSpec(sharpness, _enhance_increasing),
        "ShearX": OpSpec(shear_x, lambda m, s: s * m / 10 * 0.3),  # ±0.3
        "ShearY": OpSpec(shear_y, lambda m, s: s * m / 10 * 0.3),
        "TranslateXRel": OpSpec(translate_x, lambda m, s: s * m / 10 * translate_pct),
        "TranslateYRel": OpSpec(translate_y, lambda m, s: s * m / 10 * translate_pct),
    }


# timm's op sets: `_RAND_TRANSFORMS` (increasing=False) and `_RAND_INCREASING_TRANSFORMS`.
_COMMON_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate")
_GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
STANDARD_OPS = (*_COMMON_OPS, "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
                "Brightness", "Sharpness", *_GEOMETRIC_OPS)
INCREASING_OPS = (*_COMMON_OPS, "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                  "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", *_GEOMETRIC_OPS)


class Layer(NamedTuple):
    """One sampled, applied op."""

    name: str
    magnitude: float  # after noise and clipping
    sign: int  # +1 or -1, the direction of the signed ops
    interpolation: str


def _error(message: str) -> ValueError:
    return ValueError(f"pp op 'randaugment': {message}")


def _number(name: str, value: Any, lo: float, hi: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _error(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def fill_color(fill: str | int | Sequence[int]) -> tuple[int, int, int]:
    """A normalize preset name (-> its mean in 0..255, as timm rounds it), a grey level or RGB."""
    if isinstance(fill, str):
        if fill not in NORMALIZE_PRESETS:
            raise _error(f"fill must be one of {sorted(NORMALIZE_PRESETS)} or 0..255 ints, "
                         f"got {fill!r}")
        return tuple(min(255, round(255 * x)) for x in NORMALIZE_PRESETS[fill][0])
    values = [fill] * 3 if isinstance(fill, int) else list(fill)
    if len(values) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise _error(f"fill must be a preset name, an int or 3 ints in 0..255, got {fill!r}")
    return tuple(values)


class RandAugment:
    """The pp op `randaugment(...)`: `(uint8 image, rng) -> uint8 image`.

    The defaults are timm's `rand-m9-mstd0.5-inc1`. `magnitude_std` > 100 samples the
    magnitude uniformly from [0, magnitude] (timm's `mstd101`); `magnitude_max` above 10
    extrapolates the op ranges as TF's RandAugment does (timm's `mmax`).
    """

    def __init__(
        self,
        num_layers: int = 2,
        magnitude: float = 9,
        magnitude_std: float = 0.5,
        increasing: bool = True,
        prob: float = 0.5,
        magnitude_max: float = 10,
        fill: str | int | Sequence[int] = "imagenet",
        interpolation: str = "bicubic",
        translate_pct: float = 0.45,
    ):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise _error(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(increasing, bool):
            raise _error(f"increasing must be True or False, got {increasing!r}")
        if interpolation not in (*_RESAMPLE, "random"):
            raise _error(f"interpolation must be one of {[*_RESAMPLE, 'random']}, "
                         f"got {interpolation!r}")
        self.num_layers = num_layers
        self.magnitude = _number("magnitude", magnitude, 0.0)
        self.magnitude_std = _number("magnitude_std", magnitude_std, 0.0)
        self.magnitude_max = _number("magnitude_max", magnitude_max, 0.0)
        self.prob = _number("prob", prob, 0.0, 1.0)
        self.fill = fill_color(fill)
        self.interpolation = interpolation
        self.table = op_table(_number("translate_pct", translate_pct, 0.0, 1.0))
        self.ops = INCREASING_OPS if increasing else STANDARD_OPS

    def sample(self, rng: np.random.Generator) -> list[Layer]:
        """Draws the layers to apply (those that pass the `prob` coin), in order."""
        layers = []
        for index in rng.integers(len(self.ops), size=self.num_layers):
            if rng.random() >= self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 100:
                magnitude = rng.uniform(0.0, magnitude)
            elif self.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.magnitude_std)
            magnitude = min(max(float(magnitude), 0.0), self.magnitude_max)
            sign = 1 if rng.random() < 0.5 else -1
            interpolation = self.interpolation
            if interpolation == "random":
                interpolation = _RANDOM_RESAMPLE[rng.integers(len(_RANDOM_RESAMPLE))]
            layers.append(Layer(self.ops[index], magnitude, sign, interpolation))
        return layers

    def apply(self, image: np.ndarray, layers: Sequence[Layer]) -> np.ndarray:
        """Applies `layers` (any op names of `op_table`) to a uint8 image, deterministically."""
        check_image("randaugment", image)
        if not layers:
            return image
        img = Image.fromarray(image)
        for layer in layers:
            if layer.name not in self.table:
                raise _error(f"unknown op {layer.name!r}; known: {sorted(self.table)}")
            spec = self.table[layer.name]
            geometry = Geometry(self.fill, _RESAMPLE[layer.interpolation])
            img = spec.fn(img, spec.arg(layer.magnitude, layer.sign), geometry)
        return np.array(img, dtype=np.uint8)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, self.sample(rng))

    def __repr__(self) -> str:
        return (f"RandAugment(num_layers={self.num_layers}, magnitude={self.magnitude}, "
                f"magnitude_std={self.magnitude_std}, ops={len(self.ops)}, prob={self.prob}, "
                f"fill={self.fill}, interpolation={self.interpolation!r})")
