"""Random erasing (Zhong et al. 2020) with timm's `RandomErasing` semantics.

With probability `probability`, erases `count` rectangles (count uniform in [1, max_count])
whose area is a uniform fraction in [min_area, max_area] of the image (split over the count)
and whose height/width ratio is log-uniform in [min_aspect, 1 / min_aspect]; a sample that does
not fit is redrawn up to 10 times, then skipped. The rectangle is filled with per-pixel
standard-normal noise ('pixel'), one normal colour ('rand') or zeros ('const'). timm applies it
after normalisation, where N(0, 1) is the data's own scale, so the op takes float images only:
place it after `normalize` in a pp string. Randomness comes only from the numpy Generator.
"""

from __future__ import annotations

import math

import numpy as np

from mmjax.data.image_ops import check_image

MODES = ("pixel", "rand", "const")


def _error(message: str) -> ValueError:
    return ValueError(f"pp op 'random_erasing': {message}")


class RandomErasing:
    """The pp op `random_erasing(...)`: `(float image, rng) -> float image`.

    `random_erasing(0.25, mode='pixel', max_count=1)` is what DeiT, BEiT and MAE fine-tune with.
    """

    def __init__(
        self,
        probability: float = 0.25,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        mode: str = "pixel",
        max_count: int = 1,
    ):
        numbers = {"probability": probability, "min_area": min_area, "max_area": max_area,
                       "min_aspect": min_aspect, "max_aspect": max_aspect or min_aspect}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _error(f"{name} must be a number, got {value!r}")
        if not 0 <= probability <= 1:
            raise _error(f"probability must be in [0, 1], got {probability!r}")
        if not 0 < min_area <= max_area <= 1:
            raise _error(f"need 0 < min_area <= max_area <= 1, got {min_area!r}, {max_area!r}")
        max_aspect = 1 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise _error(f"need 0 < min_aspect <= max_aspect, got {min_aspect!r}, {max_aspect!r}")
        if mode not in MODES:
            raise _error(f"mode must be one of {list(MODES)}, got {mode!r}")
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise _error(f"max_count must be a positive int, got {max_count!r}")
        self.probability = float(probability)
        self.area = (float(min_area), float(max_area))
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.mode = mode
        self.max_count = max_count

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        check_image("random_erasing", image, uint8=False)
        if image.dtype.kind != "f":
            raise _error(
                f"expected a float image (timm erases after normalisation: place "
                f"random_erasing after normalize or value_range), got dtype {image.dtype}"
            )
        if rng.random() >= self.probability:
            return image
        height, width, channels = image.shape
        count = 1 if self.max_count == 1 else int(rng.integers(1, self.max_count + 1))
        out = image.copy()
        for _ in range(count):
            for _attempt in range(10):
                area = rng.uniform(*self.area) * height * width / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if h < height and w < width:
                    top = int(rng.integers(height - h + 1))
                    left = int(rng.integers(width - w + 1))
                    out[top:top + h, left:left + w] = self._values(rng, (h, w, channels))
                    break
        return out

    def _values(self, rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
        if self.mode == "pixel":
            return rng.standard_normal(shape, dtype=np.float32)
        if self.mode == "rand":
            return rng.standard_normal((1, 1, shape[2]), dtype=np.float32)
        return np.zeros((1, 1, shape[2]), np.float32)

    def __repr__(self) -> str:
        return (f"RandomErasing(probability={self.probability}, area={self.area}, "
                f"mode={self.mode!r}, max_count={self.max_count})")
