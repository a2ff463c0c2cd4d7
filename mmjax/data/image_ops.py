"""Numpy/PIL image transforms behind the preprocessing ops in `mmjax.data.preprocess`.

Images are (H, W, 3) arrays, uint8 until `value_range`/`normalize` turn them into
float32. Every function validates its input and raises a ValueError that names
the pp op and the shape/dtype it received, since a silent broadcast or a wrong
channel order would otherwise surface as a puzzling loss curve.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

Size = int | tuple[int, int] | list[int]

NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


def check_image(op: str, image: Any, *, uint8: bool = True) -> np.ndarray:
    """Returns `image` as an (H, W, 3) array or raises a ValueError naming `op`."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"pp op {op!r}: expected an image array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"pp op {op!r}: expected an RGB image of shape (H, W, 3), got shape "
            f"{image.shape} dtype {image.dtype}"
        )
    if uint8 and image.dtype != np.uint8:
        raise ValueError(
            f"pp op {op!r}: expected a uint8 image, got shape {image.shape} dtype {image.dtype} "
            f"(place {op!r} before value_range/normalize)"
        )
    if min(image.shape[:2]) < 1:
        raise ValueError(f"pp op {op!r}: got an empty image of shape {image.shape}")
    return image


def hw(op: str, size: Size) -> tuple[int, int]:
    """Parses an int or (height, width) size argument."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, size
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and s > 0 for s in size)):
        return int(size[0]), int(size[1])
    raise ValueError(f"pp op {op!r}: size must be a positive int or (height, width), got {size!r}")


def decode(data: Any) -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, ...) to uint8 RGB; arrays pass through."""
    if isinstance(data, np.ndarray) and data.dtype.kind not in "OS":
        return data
    if isinstance(data, np.ndarray):
        data = data.item()
    if not isinstance(data, bytes):
        raise ValueError(f"pp op 'decode': expected bytes or an array, got {type(data).__name__}")
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize(image: np.ndarray, size: Size, method: str = "bilinear") -> np.ndarray:
    """Resizes a uint8 image to `size` with PIL (antialiased when shrinking)."""
    return _resize(image, size, method, op="resize")


def _resize(image: np.ndarray, size: Size, method: str, op: str) -> np.ndarray:
    check_image(op, image)
    h, w = hw(op, size)
    if method not in _RESAMPLE:
        raise ValueError(f"pp op {op!r}: method must be one of {sorted(_RESAMPLE)}, got {method!r}")
    if image.shape[:2] == (h, w):
        return image
    resized = Image.fromarray(image).resize((w, h), resample=_RESAMPLE[method])
    return np.asarray(resized, dtype=np.uint8)


def resize_small(image: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
    check_image("resize_small", image)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"pp op 'resize_small': size must be a positive int, got {size!r}")
    h, w = image.shape[:2]
    scale = size / min(h, w)
    target = (max(size, round(h * scale)), max(size, round(w * scale)))
    return _resize(image, target, method, op="resize_small")


def _check_fits(op: str, image: np.ndarray, h: int, w: int) -> None:
    if image.shape[0] < h or image.shape[1] < w:
        raise ValueError(
            f"pp op {op!r}: crop size {(h, w)} is larger than the image of shape {image.shape}; "
            f"resize first"
        )


def central_crop(image: np.ndarray, size: Size) -> np.ndarray:
    """Crops the centre `size` window."""
    check_image("central_crop", image, uint8=False)
    h, w = hw("central_crop", size)
    _check_fits("central_crop", image, h, w)
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[top:top + h, left:left + w]


def random_crop(image: np.ndarray, size: Size, *, rng: np.random.Generator) -> np.ndarray:
    """Crops a uniformly placed `size` window."""
    check_image("random_crop", image, uint8=False)
    h, w = hw("random_crop", size)
    _check_fits("random_crop", image, h, w)
    top = int(rng.integers(image.shape[0] - h + 1))
    left = int(rng.integers(image.shape[1] - w + 1))
    return image[top:top + h, left:left + w]


def inception_crop(
    image: np.ndarray,
    size: Size | None = None,
    area_min: float = 0.05,
    area_max: float = 1.0,
    method: str = "bilinear",
    *,
    rng: np.random.Generator,
) -> np.ndarray:
    """Random resized crop: area fraction in [area_min, area_max], aspect ratio in [3/4, 4/3].

    Falls back to the whole image after 10 rejected samples, as in Inception
    training. The crop is resized to `size` (kept as is when size is None).
    """
    check_image("inception_crop", image)
    if not 0.0 < area_min <= area_max <= 1.0:
        raise ValueError(
            f"pp op 'inception_crop': need 0 < area_min <= area_max <= 1, "
            f"got {area_min}, {area_max}"
        )
    height, width = image.shape[:2]
    crop = image
    for _ in range(10):
        area = height * width * rng.uniform(area_min, area_max)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h, w = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
        if 0 < h <= height and 0 < w <= width:
            top = int(rng.integers(height - h + 1))
            left = int(rng.integers(width - w + 1))
            crop = image[top:top + h, left:left + w]
            break
    if size is None:
        return crop
    return _resize(np.ascontiguousarray(crop), size, method, op="inception_crop")


def flip_lr(image: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Mirrors the image left-right with probability 1/2."""
    check_image("flip_lr", image, uint8=False)
    return image[:, ::-1] if rng.random() < 0.5 else image


def value_range(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Maps uint8 [0, 255] linearly to float32 [lo, hi]."""
    check_image("value_range", image)
    scale = np.float32((hi - lo) / 255.0)
    return image.astype(np.float32) * scale + np.float32(lo)


def normalize(
    image: np.ndarray,
    mean: float | str | tuple[float, ...] = "imagenet",
    std: float | tuple[float, ...] | None = None,
) -> np.ndarray:
    """float32 (x / 255 - mean) / std per channel; `mean` may name a preset ("clip", "imagenet")."""
    check_image("normalize", image)
    if isinstance(mean, str):
        if mean not in NORMALIZE_PRESETS or std is not None:
            raise ValueError(
                f"pp op 'normalize': presets are {sorted(NORMALIZE_PRESETS)} (without std), "
                f"got mean={mean!r}, std={std!r}"
            )
        mean, std = NORMALIZE_PRESETS[mean]
    if std is None:
        raise ValueError("pp op 'normalize': give a preset name or both mean and std")
    mean_arr = np.broadcast_to(np.asarray(mean, np.float32), (3,))
    std_arr = np.broadcast_to(np.asarray(std, np.float32), (3,))
    if np.any(std_arr <= 0):
        raise ValueError(f"pp op 'normalize': std must be positive, got {std!r}")
    return (image.astype(np.float32) / np.float32(255.0) - mean_arr) / std_arr
