"""Tests for pp strings (mmjax.data.preprocess) and the image ops behind them."""

import io

import numpy as np
import pytest
from PIL import Image

from mmjax.data import image_ops
from mmjax.data.preprocess import KNOWN_OPS, Preprocess, parse_op, split_ops


def fake_tokenizer(texts):
    """list[str] -> int (N, 6): word lengths, zero-padded."""
    out = np.zeros((len(texts), 6), np.int64)
    for i, text in enumerate(texts):
        lengths = [len(w) for w in text.split()][:6]
        out[i, :len(lengths)] = lengths
    return out


def _image(h=32, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _run(pp, example=None, seed=0, tokenizer=None):
    example = {"image": _image(), "caption": "a red circle"} if example is None else example
    return Preprocess(pp, tokenizer)(example, np.random.default_rng(seed))


def test_parse():
    assert split_ops("a(1)|b|c('x|y', k=(1, 2))") == ["a(1)", "b", "c('x|y', k=(1, 2))"]
    assert parse_op("value_range(-1, 1)") == ("value_range", (-1, 1), {})
    assert parse_op("flip_lr") == ("flip_lr", (), {})
    assert parse_op("tokenize(key='caption', out='text')") == (
        "tokenize", (), {"key": "caption", "out": "text"})
    assert parse_op("resize((20, 40))") == ("resize", ((20, 40),), {})
    for bad in ["resize(size)", "__import__('os').system('true')", "resize(1", "x.y(1)",
                "keep(*['a'])"]:
        with pytest.raises(ValueError, match="cannot parse"):
            parse_op(bad)


def test_full_default_pipeline():
    pp = ("resize(36)|random_crop(32)|flip_lr|value_range(-1,1)|"
          "tokenize(key='caption', out='text')|keep('image','text','label')")
    out = _run(pp, {"image": _image(), "caption": "a red circle", "label": np.int64(3)},
               tokenizer=fake_tokenizer)
    assert sorted(out) == ["image", "label", "text"]
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
    assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
    assert out["text"].dtype == np.int32 and out["text"].tolist() == [1, 3, 6, 0, 0, 0]


@pytest.mark.parametrize("pp, shape", [
    ("resize(36)", (36, 36, 3)),
    ("resize((20, 40))", (20, 40, 3)),
    ("resize(16, method='bicubic')", (16, 16, 3)),
    ("resize_small(16)", (16, 24, 3)),
    ("central_crop(24)", (24, 24, 3)),
    ("central_crop((10, 20))", (10, 20, 3)),
    ("random_crop(24)", (24, 24, 3)),
    ("inception_crop(16)", (16, 16, 3)),
    ("inception_crop(16, area_min=0.5, area_max=0.5)", (16, 16, 3)),
    ("flip_lr", (32, 48, 3)),
    ("decode", (32, 48, 3)),
])
def test_uint8_ops_shapes(pp, shape):
    out = _run(pp)["image"]
    assert out.shape == shape and out.dtype == np.uint8


def test_crops_take_pixels_from_the_image():
    image = _image()
    out = _run("central_crop((10, 20))", {"image": image})["image"]
    np.testing.assert_array_equal(out, image[11:21, 14:34])
    out = _run("random_crop(8)", {"image": image})["image"]
    windows = [image[i:i + 8, j:j + 8] for i in range(25) for j in range(41)]
    assert any(np.array_equal(out, w) for w in windows)


def test_flip_lr_flips_about_half_the_time():
    image = _image()
    flipped = [np.array_equal(_run("flip_lr", {"image": image}, seed=s)["image"], image[:, ::-1])
               for s in range(200)]
    assert 60 < sum(flipped) < 140


def test_value_range():
    image = np.array([[[0, 128, 255]]], np.uint8)
    out = _run("value_range(-1, 1)", {"image": image})["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [-1.0, 128 / 255 * 2 - 1, 1.0], atol=1e-6)
    out = _run("value_range(0, 1)", {"image": image})["image"]
    np.testing.assert_allclose(out[0, 0], [0.0, 128 / 255, 1.0], atol=1e-6)


def test_normalize():
    image = np.full((2, 2, 3), 255, np.uint8)
    mean, std = image_ops.NORMALIZE_PRESETS["clip"]
    out = _run("normalize('clip')", {"image": image})["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (1 - np.array(mean)) / np.array(std), rtol=1e-5)
    out = _run("normalize(0.5, 0.5)", {"image": image})["image"]
    np.testing.assert_allclose(out, 1.0)
    out = _run("normalize(mean=(0.0, 0.5, 1.0), std=(1.0, 1.0, 2.0))", {"image": image})["image"]
    np.testing.assert_allclose(out[0, 0], [1.0, 0.5, 0.0])
    assert _run("normalize('imagenet')", {"image": image})["image"].dtype == np.float32


def test_decode_bytes():
    image = _image(8, 12)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    out = _run("decode", {"image": buffer.getvalue()})["image"]
    np.testing.assert_array_equal(out, image)


def test_tokenize_rename_keep():
    out = _run("tokenize", {"caption": b"big blue star"}, tokenizer=fake_tokenizer)
    assert out["text"].tolist() == [3, 4, 4, 0, 0, 0] and out["caption"] == b"big blue star"
    out = _run("tokenize(key='captions', out='tokens')", {"captions": ["a b", "ccc"]},
               tokenizer=fake_tokenizer)
    assert out["tokens"].shape == (2, 6) and out["tokens"].dtype == np.int32
    out = _run("tokenize(suffix=' ###')", {"caption": b"big star"}, tokenizer=fake_tokenizer)
    assert out["text"].tolist() == [3, 4, 3, 0, 0, 0]       # MiniGPT-4's end symbol, written as text
    out = _run("tokenize(prefix='Question: ', suffix=' Answer:')", {"caption": "big star"}, tokenizer=fake_tokenizer)
    assert out["text"].tolist() == [9, 3, 4, 7, 0, 0]       # BLIP-2's zero-shot VQA prompt
    out = _run("rename(text='caption', img='image')", {"caption": "x", "image": 1})
    assert out == {"text": "x", "img": 1}
    assert _run("keep('b')", {"a": 1, "b": 2}) == {"b": 2}


def test_image_key_argument():
    out = _run("resize(8, key='other')", {"image": _image(), "other": _image(4, 4)})
    assert out["other"].shape == (8, 8, 3) and out["image"].shape == (32, 48, 3)


@pytest.mark.parametrize("pp", ["random_crop(16)", "inception_crop(16)", "flip_lr",
                                "resize(40)|random_crop(32)|flip_lr|value_range(-1,1)"])
def test_random_ops_deterministic_per_seed(pp):
    image = _image()
    a = _run(pp, {"image": image}, seed=5)["image"]
    b = _run(pp, {"image": image}, seed=5)["image"]
    np.testing.assert_array_equal(a, b)
    others = [_run(pp, {"image": image}, seed=s)["image"] for s in range(6, 16)]
    assert any(not np.array_equal(a, o) for o in others)


def test_input_is_not_modified():
    example = {"image": _image(), "caption": "x"}
    _run("resize(8)|keep('image')", example)
    assert example["image"].shape == (32, 48, 3) and "caption" in example


@pytest.mark.parametrize("pp, image, match", [
    ("resize(16)", np.zeros((32, 32), np.uint8), r"'resize'.*shape \(32, 32\)"),
    ("resize(16)", np.zeros((32, 32, 3), np.float32), r"'resize'.*dtype float32"),
    ("resize(16)", np.zeros((32, 32, 4), np.uint8), r"'resize'.*\(32, 32, 4\)"),
    ("value_range(0, 1)", np.zeros((8, 8, 3), np.float32), r"'value_range'.*float32"),
    ("normalize('clip')", np.zeros((8, 8, 1), np.uint8), r"'normalize'.*\(8, 8, 1\)"),
    ("random_crop(16)", np.zeros((32, 32), np.uint8), r"'random_crop'.*\(32, 32\)"),
    ("random_crop(16)", np.zeros((8, 8, 3), np.uint8), r"'random_crop'.*larger than"),
    ("central_crop(16)", np.zeros((8, 40, 3), np.uint8), r"'central_crop'.*larger than"),
    ("inception_crop(16)", np.zeros((8, 8, 3), np.int32), r"'inception_crop'.*int32"),
    ("flip_lr", np.zeros((8, 8, 2), np.uint8), r"'flip_lr'.*\(8, 8, 2\)"),
    ("resize_small(16)", [[1, 2]], r"'resize_small'.*list"),
])
def test_bad_images_raise(pp, image, match):
    with pytest.raises(ValueError, match=match):
        _run(pp, {"image": image})


def test_unknown_op_lists_known_ops():
    with pytest.raises(ValueError, match="unknown pp op 'blur'.*inception_crop.*value_range"):
        Preprocess("resize(8)|blur(3)")
    assert {"resize", "tokenize", "keep", "normalize"} <= set(KNOWN_OPS)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="'resize': bad arguments"):
        Preprocess("resize(8, 9, 10, 11)")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Preprocess("tokenize")
    with pytest.raises(ValueError, match="empty op"):
        Preprocess("resize(8)||flip_lr")
    with pytest.raises(ValueError, match="size must be"):
        _run("resize(-3)")
    with pytest.raises(ValueError, match="presets"):
        _run("normalize('cifar')")
    with pytest.raises(KeyError, match="no key 'label'"):
        _run("keep('label')")


def test_format_joins_example_fields_and_draws_one_of_several_templates():
    from mmjax.data.preprocess import Preprocess as P

    one = P("format('{caption} question: {question}', out='doc')")({"caption": b"a red circle", "question": "where?"},
                                                                   np.random.default_rng(0))
    assert one["doc"] == "a red circle question: where?"
    several = P("format(['{caption}', 'q {question}'], out='doc')")
    docs = {several({"caption": "c", "question": "x"}, np.random.default_rng(seed))["doc"] for seed in range(20)}
    assert docs == {"c", "q x"}
    with pytest.raises(KeyError, match="answer"):
        P("format('{answer}')")({"caption": "c"}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="must name example fields"):
        P("format('no fields')")
