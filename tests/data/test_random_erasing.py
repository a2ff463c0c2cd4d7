"""Random erasing (mmjax.data.random_erasing) against the spec and timm's RandomErasing."""

import math
import random

import numpy as np
import pytest
from references import require

from mmjax.data.preprocess import Preprocess
from mmjax.data.random_erasing import RandomErasing

H, W = 64, 80


def _float_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(H, W, 3)).astype(np.float32)


def _rectangle(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of the erased region, checking that it is exactly one rectangle."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    assert mask[top:bottom, left:right].all() and mask.sum() == (bottom - top) * (right - left)
    return bottom - top, right - left


def _our_rectangles(n: int) -> np.ndarray:
    """(n, 2) heights and widths erased by 'pixel' mode at probability 1."""
    op, rng, image = RandomErasing(probability=1.0, mode="pixel"), np.random.default_rng(0), _float_image()
    shapes = []
    for _ in range(n):
        out = op(image, rng)
        changed = out != image
        assert (changed.all(-1) == changed.any(-1)).all()  # every channel of an erased pixel
        shapes.append(_rectangle(changed.any(-1)))  # and nothing outside the rectangle changed
    return np.array(shapes)


def _timm_rectangles(n: int) -> np.ndarray:
    torch = require("torch")
    TimmRandomErasing = require("timm.data.random_erasing").RandomErasing

    random.seed(0)
    op = TimmRandomErasing(probability=1.0, mode="const", max_count=1, device="cpu")
    shapes = []
    for _ in range(n):
        image = torch.ones(3, H, W)
        op(image)
        shapes.append(_rectangle((image == 0).any(0).numpy()))
    return np.array(shapes)


def test_erased_region_statistics_match_timm():
    ours, theirs = _our_rectangles(3000), _timm_rectangles(3000)
    stats = {}
    for name, shapes in [("mmjax", ours), ("timm", theirs)]:
        area = shapes.prod(1) / (H * W)
        log_aspect = np.log(shapes[:, 0] / shapes[:, 1])
        # The spec: area fraction U(0.02, 1/3) and log-uniform aspect in [0.3, 1/0.3], up to
        # rounding the sides to whole pixels.
        assert area.min() > 0.015 and area.max() < 0.36
        assert np.exp(log_aspect).min() > 0.25 and np.exp(log_aspect).max() < 4.0
        stats[name] = (np.quantile(area, [0.1, 0.25, 0.5, 0.75, 0.9]),
                       np.quantile(log_aspect, [0.1, 0.25, 0.5, 0.75, 0.9]))
    print("random_erasing area quantiles mmjax", stats["mmjax"][0].round(3),
          "timm", stats["timm"][0].round(3))
    print("random_erasing log-aspect quantiles mmjax", stats["mmjax"][1].round(3),
          "timm", stats["timm"][1].round(3))
    np.testing.assert_allclose(stats["mmjax"][0], stats["timm"][0], atol=0.02)
    np.testing.assert_allclose(stats["mmjax"][1], stats["timm"][1], atol=0.12)
    assert abs(np.mean(ours.prod(1) / (H * W)) - (0.02 + 1 / 3) / 2) < 0.015  # U(0.02, 1/3) mean


def test_probability_and_untouched_images():
    op, rng, image = RandomErasing(0.25), np.random.default_rng(1), _float_image()
    outs = [op(image, rng) for _ in range(4000)]
    erased = [not np.array_equal(out, image) for out in outs]
    assert abs(np.mean(erased) - 0.25) < 0.03
    assert all(out is image for out, e in zip(outs, erased) if not e)  # no copy when skipped
    assert image.dtype == np.float32 and np.array_equal(image, _float_image())  # input kept


def test_fill_modes():
    image, rng = np.full((H, W, 3), 7.0, np.float32), np.random.default_rng(2)
    pixel_op, values = RandomErasing(1.0, mode="pixel"), []
    for _ in range(50):
        out = pixel_op(image, rng)
        values.append(out[out != 7.0])
    pixel = np.concatenate(values)
    assert abs(pixel.mean()) < 0.02 and abs(pixel.std() - 1) < 0.02  # N(0, 1) per pixel
    out = RandomErasing(1.0, mode="rand")(image, rng)
    region = out[(out != 7.0).any(-1)]
    assert len(region) > 0 and (region == region[0]).all()  # one colour per rectangle
    out = RandomErasing(1.0, mode="const")(image, rng)
    assert set(np.unique(out)) == {0.0, 7.0}


def test_max_count_erases_up_to_that_many_rectangles():
    op, rng = RandomErasing(1.0, mode="const", max_count=3), np.random.default_rng(3)
    image = np.ones((H, W, 3), np.float32)
    areas = [np.mean(op(image, rng) == 0) for _ in range(300)]
    assert min(areas) > 0 and max(areas) < 0.36


def test_pp_string_after_normalize_is_reproducible():
    pp = Preprocess("normalize('imagenet')|random_erasing(probability=1.0, mode='pixel', max_count=1)")
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    a, b, c = (pp({"image": image}, np.random.default_rng(s))["image"] for s in (5, 5, 6))
    assert a.dtype == np.float32 and a.shape == (H, W, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_refuses_uint8_and_bad_arguments():
    with pytest.raises(ValueError, match=r"'random_erasing'.*float image.*after normalize.*uint8"):
        Preprocess("random_erasing(0.25)")({"image": np.zeros((8, 8, 3), np.uint8)})
    with pytest.raises(ValueError, match=r"'random_erasing'.*\(8, 8\)"):
        RandomErasing()(np.zeros((8, 8), np.float32), np.random.default_rng(0))
    for pp, match in [("random_erasing(probability=2)", "probability must be in"),
                      ("random_erasing(min_area=0.5, max_area=0.2)", "min_area <= max_area"),
                      ("random_erasing(min_aspect=0)", "0 < min_aspect"),
                      ("random_erasing(mode='noise')", "mode must be one of"),
                      ("random_erasing(max_count=0)", "max_count must be a positive int"),
                      ("random_erasing(probability='x')", "probability must be a number"),
                      ("random_erasing(prob=0.25)", "'random_erasing': bad arguments")]:
        with pytest.raises(ValueError, match=match):
            Preprocess(pp)
    assert math.isclose(RandomErasing().area[1], 1 / 3)
