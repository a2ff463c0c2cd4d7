"""RandAugment (mmjax.data.randaugment) against timm's `timm.data.auto_augment`."""

import math

import numpy as np
import pytest
from PIL import Image
from references import require

from mmjax.data import randaugment as ra
from mmjax.data.preprocess import Preprocess

aa = require("timm.data.auto_augment")

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet normalisation
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}


def _image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Random uint8 pixels over a gradient, in a narrower range than 0..255 per channel, so
    that auto-contrast and equalize have work to do; non-square to catch x/y mix-ups."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 60, w)[None, :, None] + np.linspace(0, 30, h)[:, None, None]
    noise = rng.integers(0, 150, (h, w, 3)) + rng.integers(0, 40, (1, 1, 3))
    return np.clip(noise + gradient, 0, 255).astype(np.uint8)


def _timm_op(image, name, magnitude, sign, interpolation="bicubic", monkeypatch=None,
             magnitude_max=None):
    """timm's AugmentOp at a fixed magnitude (prob 1, no noise) with the sign forced."""
    hparams = {"img_mean": FILL, "interpolation": RESAMPLE[interpolation], "translate_pct": 0.45}
    if magnitude_max is not None:
        hparams["magnitude_max"] = magnitude_max
    monkeypatch.setattr(aa, "_randomly_negate", (lambda v: v) if sign > 0 else (lambda v: -v))
    op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    return np.asarray(op(Image.fromarray(image)))


def test_op_sets_are_timms():
    assert tuple(aa._RAND_INCREASING_TRANSFORMS) == ra.INCREASING_OPS
    assert tuple(aa._RAND_TRANSFORMS) == ra.STANDARD_OPS


@pytest.mark.parametrize("name", sorted(ra.op_table()))
def test_magnitude_to_argument_matches_timm(name, monkeypatch):
    timm_level_to_arg = getattr(aa, "LEVEL_TO_ARG", None) or aa._LEVEL_TO_ARG
    spec = ra.op_table(translate_pct=0.45)[name]
    for sign in (1, -1):
        monkeypatch.setattr(aa, "_randomly_negate", (lambda v: v) if sign > 0 else (lambda v: -v))
        for m in [*np.linspace(0, 15, 61), 8.73, 9.41]:
            level_fn = timm_level_to_arg[name]
            expected = level_fn(float(m), {"translate_pct": 0.45})[0] if level_fn else None
            assert spec.arg(float(m), sign) == expected, (name, m, sign)


@pytest.mark.parametrize("name", sorted(ra.op_table()))
def test_each_op_matches_timm(name, monkeypatch):
    augment = ra.RandAugment(fill=FILL)
    max_diff, zero_bits = 0, 0
    for seed in range(2):
        image = _image(seed)
        for m in (0.0, 3.0, 7.3, 9.0, 10.0):
            for sign in (1, -1):
                ours = augment.apply(image, [ra.Layer(name, m, sign, "bicubic")])
                assert ours.dtype == np.uint8 and ours.shape == image.shape
                try:
                    theirs = _timm_op(image, name, m, sign, monkeypatch=monkeypatch)
                except ValueError as e:  # Pillow >= 13 refuses posterize to 0 bits
                    assert "Posterize" in name and "bits" in str(e)
                    assert ra.op_table()[name].arg(m, sign) == 0 and not ours.any()
                    zero_bits += 1
                    continue
                max_diff = max(max_diff, int(np.abs(ours.astype(int) - theirs).max()))
    note = f" ({zero_bits} cases of 0 bits: timm raises on this Pillow, mmjax gives black)"
    print(f"randaugment {name}: max |mmjax - timm| = {max_diff} grey levels{note if zero_bits else ''}")
    assert max_diff == 0


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_geometric_ops_other_interpolation_and_magnitude_max(interpolation, monkeypatch):
    augment = ra.RandAugment(fill=(10, 200, 30), magnitude_max=15)
    image = _image(3)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        ours = augment.apply(image, [ra.Layer(name, 13.0, -1, interpolation)])
        hparams = {"img_mean": (10, 200, 30), "interpolation": RESAMPLE[interpolation],
                       "magnitude_max": 15}
        monkeypatch.setattr(aa, "_randomly_negate", lambda v: -v)
        theirs = np.asarray(aa.AugmentOp(name, 1.0, 13, hparams)(Image.fromarray(image)))
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_composed_layers_match_timm_applied_in_sequence(monkeypatch):
    augment = ra.RandAugment(num_layers=3, prob=0.8, fill=FILL, interpolation="random")
    rng = np.random.default_rng(0)
    for seed in range(30):
        image = _image(seed)
        layers = augment.sample(rng)
        expected = image
        for layer in layers:
            expected = _timm_op(expected, layer.name, layer.magnitude, layer.sign,
                                layer.interpolation, monkeypatch)
        np.testing.assert_array_equal(augment.apply(image, layers), expected)


def test_call_is_sample_then_apply_and_reproducible():
    image = _image(0)
    augment = Preprocess("randaugment(num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True)")
    runs = [augment({"image": image}, np.random.default_rng(s))["image"] for s in (7, 7, 8, 9, 10)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert any(not np.array_equal(runs[0], r) for r in runs[2:])
    assert runs[0].dtype == np.uint8 and runs[0].shape == image.shape
    cloudpickle = require("cloudpickle")  # how grain ships the pp to its workers
    shipped = cloudpickle.loads(cloudpickle.dumps(augment))
    np.testing.assert_array_equal(shipped({"image": image}, np.random.default_rng(7))["image"], runs[0])
    op = ra.RandAugment()
    for seed in range(10):
        layers = op.sample(np.random.default_rng(seed))
        np.testing.assert_array_equal(op(image, np.random.default_rng(seed)), op.apply(image, layers))


def _expected_clipped_normal(mean, std, hi):
    """Mean and P(X >= hi) of min(N(mean, std), hi)."""
    z = (hi - mean) / std
    pdf, tail = math.exp(-z * z / 2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(z / math.sqrt(2))
    return mean - std * (pdf - z * tail), tail


def test_sampling_statistics_follow_the_spec():
    n = 20_000
    rng = np.random.default_rng(0)
    op = ra.RandAugment(num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True)
    layers = [layer for _ in range(n) for layer in op.sample(rng)]
    assert abs(len(layers) / (2 * n) - 0.5) < 0.01  # each layer applied with prob 0.5
    names = [layer.name for layer in layers]
    assert set(names) == set(ra.INCREASING_OPS)
    expected = len(layers) / len(ra.INCREASING_OPS)  # uniform choice, with replacement
    for name in ra.INCREASING_OPS:
        assert abs(names.count(name) - expected) < 5 * math.sqrt(expected), name
    magnitudes = np.array([layer.magnitude for layer in layers])
    mean, at_max = _expected_clipped_normal(9.0, 0.5, 10.0)
    assert magnitudes.min() >= 0 and magnitudes.max() == 10.0
    assert abs(magnitudes.mean() - mean) < 0.015 and 0.46 < magnitudes.std() < 0.51
    assert abs(np.mean(magnitudes == 10.0) - at_max) < 0.005
    assert abs(np.mean([layer.sign > 0 for layer in layers]) - 0.5) < 0.01
    assert {layer.interpolation for layer in layers} == {"bicubic"}

    fixed = ra.RandAugment(num_layers=3, magnitude_std=0.0, prob=1.0, increasing=False)
    samples = [fixed.sample(rng) for _ in range(500)]
    assert all(len(s) == 3 for s in samples)
    assert {layer.magnitude for s in samples for layer in s} == {9.0}
    assert {layer.name for s in samples for layer in s} == set(ra.STANDARD_OPS)
    uniform = [layer.magnitude for _ in range(4000)
               for layer in ra.RandAugment(magnitude_std=1000, prob=1.0).sample(rng)]
    assert min(uniform) >= 0 and max(uniform) <= 9 and abs(np.mean(uniform) - 4.5) < 0.15
    random_interp = ra.RandAugment(prob=1.0, interpolation="random")
    assert {layer.interpolation for _ in range(50)
            for layer in random_interp.sample(rng)} == {"bilinear", "bicubic"}
    image = _image(0)
    assert ra.RandAugment(prob=0.0)(image, rng) is image


def test_fill_presets():
    assert ra.fill_color("imagenet") == FILL
    assert ra.fill_color(128) == (128, 128, 128) and ra.fill_color([1, 2, 3]) == (1, 2, 3)


@pytest.mark.parametrize("pp, match", [
    ("randaugment(num_layers=0)", "num_layers must be a positive int"),
    ("randaugment(magnitude=-1)", "magnitude must be a number"),
    ("randaugment(magnitude='9')", "magnitude must be a number"),
    ("randaugment(prob=1.5)", r"prob must be a number in \[0.0, 1.0\]"),
    ("randaugment(fill='cifar')", "fill must be one of"),
    ("randaugment(fill=(1, 2))", "fill must be a preset name"),
    ("randaugment(fill=(1, 2, 300))", "fill must be a preset name"),
    ("randaugment(interpolation='lanczos')", "interpolation must be one of"),
    ("randaugment(increasing=1)", "increasing must be True or False"),
    ("randaugment(layers=2)", "'randaugment': bad arguments"),
])
def test_bad_arguments_fail_when_the_pp_string_is_built(pp, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(pp)


def test_bad_images_and_op_names():
    with pytest.raises(ValueError, match=r"'randaugment'.*uint8.*before value_range/normalize"):
        Preprocess("normalize('imagenet')|randaugment")({"image": _image(0)})
    with pytest.raises(ValueError, match=r"'randaugment'.*\(48, 64\)"):
        ra.RandAugment()(_image(0)[..., 0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown op 'Cutout'"):
        ra.RandAugment().apply(_image(0), [ra.Layer("Cutout", 5.0, 1, "bicubic")])
