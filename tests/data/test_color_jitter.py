"""Colour jitter (mmjax.data.color_jitter) against torchvision's ColorJitter on PIL images."""

import itertools

import numpy as np
import pytest
from PIL import Image
from references import require

from mmjax.data import color_jitter
from mmjax.data.color_jitter import ColorJitter
from mmjax.data.preprocess import Preprocess

torch = require("torch")
TF = require("torchvision.transforms.functional")
TorchColorJitter = require("torchvision.transforms").ColorJitter

H, W = 48, 64
_TORCH_ADJUST = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                 "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


def _image(seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise, with some saturated and dark pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    base = np.stack([x, y, 1 - x * y], -1) * 255 + rng.normal(0, 25, (H, W, 3))
    base[:4] = [255, 0, 0]
    base[-4:, :8] = 0
    return np.clip(base, 0, 255).astype(np.uint8)


def _torch_apply(image: np.ndarray, steps) -> np.ndarray:
    img = Image.fromarray(image)
    for name, factor in steps:
        img = _TORCH_ADJUST[name](img, factor)
    return np.asarray(img)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


@pytest.mark.parametrize("name, factors", [
    ("brightness", [0.0, 0.6, 0.93, 1.0, 1.27, 1.4]),
    ("contrast", [0.0, 0.6, 0.93, 1.27, 1.4]),
    ("saturation", [0.0, 0.6, 0.93, 1.27, 1.4]),
    ("hue", [-0.5, -0.31, -0.002, 0.1, 0.25, 0.5]),
])
def test_each_adjustment_matches_torchvision(name, factors):
    image = _image()
    diffs = []
    for factor in factors:
        ours = color_jitter.apply(image, [(name, factor)])
        theirs = _torch_apply(image, [(name, factor)])
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        diffs.append(_max_diff(ours, theirs))
        if factor not in (1.0, -0.002):  # identities (hue -0.002 rounds to no shift)
            assert not np.array_equal(ours, image), (name, factor)
    print(f"color_jitter {name} max diff vs torchvision (grey levels) per factor {factors}: {diffs}")
    assert max(diffs) == 0


def test_composed_jitter_matches_torchvision_color_jitter():
    """torchvision's ColorJitter, with its factors and order drawn from a torch seed, equals our
    `apply` given the same factors in the same order."""
    image, diffs, orders = _image(1), [], set()
    for seed in range(12):
        jitter = TorchColorJitter(0.4, 0.4, 0.4, 0.1)
        torch.manual_seed(seed)
        order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation,
                                            jitter.hue)
        steps = [(color_jitter.ADJUSTMENTS[i], factors[i]) for i in order.tolist()]
        orders.add(tuple(name for name, _ in steps))
        torch.manual_seed(seed)
        theirs = np.asarray(jitter(Image.fromarray(image)))
        diffs.append(_max_diff(color_jitter.apply(image, steps), theirs))
    print(f"color_jitter composed (4 adjustments, random order) max diff vs torchvision: {max(diffs)}")
    assert len(orders) > 1 and max(diffs) == 0


def test_sampled_factors_and_order():
    op, rng = ColorJitter(0.4, 0.4, 0.4), np.random.default_rng(0)
    draws = [op.sample(rng) for _ in range(3000)]
    assert all(sorted(name for name, _ in d) == ["brightness", "contrast", "saturation"]
               for d in draws)  # hue 0 is off, as in torchvision
    orders = {tuple(name for name, _ in d) for d in draws}
    assert len(orders) == 6  # every order of the three
    for name in ("brightness", "contrast", "saturation"):
        values = np.array([f for d in draws for n, f in d if n == name])
        assert 0.6 <= values.min() < 0.61 and 1.39 < values.max() <= 1.4
        assert abs(values.mean() - 1.0) < 0.02 and abs(values.std() - 0.8 / 12 ** 0.5) < 0.01
    hue = np.array([f for _ in range(500) for n, f in ColorJitter(0, 0, 0, 0.2).sample(rng)])
    assert len(hue) == 500 and -0.2 <= hue.min() < -0.19 and 0.19 < hue.max() <= 0.2
    # A large jitter clips the lower bound at 0; a pair is used as given.
    assert ColorJitter(brightness=1.5).ranges["brightness"] == (0.0, 2.5)
    assert ColorJitter(contrast=(0.2, 0.3)).ranges["contrast"] == (0.2, 0.3)
    assert ColorJitter(0, 0, 0, 0).sample(rng) == []


@pytest.mark.parametrize("args", [(0.4, 0.4, 0.4, 0.0), (1.5, 0, (0.5, 2.0), (-0.5, 0.1)),
                                  (0, (1.0, 1.0), 0, 0)])
def test_ranges_match_torchvision(args):
    ours, theirs = ColorJitter(*args), TorchColorJitter(*args)
    for name in color_jitter.ADJUSTMENTS:
        assert ours.ranges[name] == getattr(theirs, name), name


def test_pp_string_is_reproducible_and_changes_the_image():
    pp = Preprocess("color_jitter(0.4, 0.4, 0.4)|keep('image')")
    image = _image(2)
    a, b, c = (pp({"image": image}, np.random.default_rng(s))["image"] for s in (5, 5, 6))
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, image)
    assert np.array_equal(image, _image(2))  # input untouched
    steps = ColorJitter(0.4, 0.4, 0.4).sample(np.random.default_rng(5))
    np.testing.assert_array_equal(a, _torch_apply(image, steps))  # the drawn steps, torchvision's ops


@pytest.mark.parametrize("pp, match", [
    ("color_jitter(-0.1)", "brightness must be non-negative"),
    ("color_jitter(hue=0.6)", r"hue factor range.*-0.5 <= min <= max <= 0.5.*half turn"),
    ("color_jitter(hue=(-0.7, 0.2))", "hue factor range"),
    ("color_jitter(contrast=(1.5, 0.5))", "contrast factor range"),
    ("color_jitter(saturation=(-0.5, 1.0))", "saturation factor range"),
    ("color_jitter(saturation='x')", "saturation must be a number or a .min, max. pair"),
    ("color_jitter(brightness=(0.5, 1.0, 2.0))", "brightness must be a number or"),
    ("color_jitter(brightness=True)", "brightness must be a number or"),
    ("color_jitter(gamma=0.4)", "'color_jitter': bad arguments"),
])
def test_bad_arguments(pp, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(pp)


def test_bad_images():
    op, rng = ColorJitter(), np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"'color_jitter'.*uint8.*float32.*before value_range/normalize"):
        Preprocess("normalize('imagenet')|color_jitter(0.4, 0.4, 0.4)")({"image": _image()})
    with pytest.raises(ValueError, match=r"'color_jitter'.*\(8, 8\)"):
        op(np.zeros((8, 8), np.uint8), rng)
    with pytest.raises(ValueError, match=r"'color_jitter'.*\(8, 8, 4\)"):
        op(np.zeros((8, 8, 4), np.uint8), rng)
    with pytest.raises(ValueError, match="unknown adjustment 'gamma'"):
        color_jitter.apply(_image(), [("gamma", 1.2)])


def test_flipped_view_input():
    """A non-contiguous view (e.g. after flip_lr) is handled like its copy."""
    image, steps = _image(3)[:, ::-1], [("contrast", 1.3), ("hue", 0.2)]
    np.testing.assert_array_equal(color_jitter.apply(image, steps),
                                  _torch_apply(np.ascontiguousarray(image), steps))


def test_every_order_is_possible_with_hue():
    rng, op = np.random.default_rng(4), ColorJitter(0.4, 0.4, 0.4, 0.1)
    orders = {tuple(n for n, _ in op.sample(rng)) for _ in range(1500)}
    assert orders == set(itertools.permutations(color_jitter.ADJUSTMENTS))
