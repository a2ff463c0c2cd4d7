"""Tests for the embedded mmjax_shapes data set (mmjax.data.shapes)."""

import collections
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import shapes
from mmjax.data import shapes_captions as captions
from mmjax.data import shapes_render as render


def _read_all(builder, split):
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_prepare_is_deterministic(tmp_path):
    a = shapes.prepare(tmp_path / "a", num_train=48, num_test=24)
    b = shapes.prepare(tmp_path / "b", num_train=48, num_test=24)
    for split, n in (("train", 48), ("test", 24)):
        xs, ys = _read_all(a, split), _read_all(b, split)
        assert len(xs) == len(ys) == n
        for x, y in zip(xs, ys):
            assert x.keys() == y.keys()
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])


def test_generate_example_is_pure():
    x = shapes.generate_example(7, seed=3, image_size=32)
    y = shapes.generate_example(7, seed=3, image_size=32)
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["caption"] == y["caption"]
    z = shapes.generate_example(7, seed=4, image_size=32)
    assert not np.array_equal(x["image"], z["image"])


def test_small_split_contents(shapes_data_dir):
    builder = shapes.prepare(shapes_data_dir, num_train=240, num_test=60)
    train = _read_all(builder, "train")
    assert len(train) == 240 and builder.info.splits["test"].num_examples == 60
    x = train[0]
    assert x["image"].shape == (32, 32, 3) and x["image"].dtype == np.uint8
    assert builder.info.features["label"].names == shapes.CLASS_NAMES
    counts = collections.Counter(int(e["label"]) for e in train)
    assert len(counts) == len(shapes.CLASS_NAMES)
    assert max(counts.values()) <= 1.5 * min(counts.values())


def test_classes():
    assert len(shapes.CLASS_NAMES) >= 20
    assert len(set(shapes.CLASS_NAMES)) == len(shapes.CLASS_NAMES)
    assert "red circle" in shapes.CLASS_NAMES
    labels = [shapes.generate_example(i, 0, 16)["label"] for i in range(480)]
    counts = collections.Counter(labels)
    assert len(counts) == len(shapes.CLASS_NAMES)
    assert max(counts.values()) <= 1.5 * min(counts.values())


def test_captions_mention_colour_and_shape():
    for i in range(300):
        x = shapes.generate_example(i, seed=11, image_size=16)
        color, shape = shapes.CLASS_NAMES[x["label"]].split()
        caption = x["caption"]
        assert color in captions.words(caption), caption
        assert any(re.search(rf"\b{w}\b", caption) for w in captions.SHAPE_WORDS[shape]), caption


def test_captions_are_varied():
    texts = {shapes.generate_example(i, seed=1, image_size=16)["caption"] for i in range(500)}
    assert len(texts) > 300
    with_size = sum(any(w in t for w in ("small", "little", "tiny", "medium", "mid", "large",
                                           "big", "moderately")) for t in texts)
    with_position = sum(any(w in t for w in ("top", "upper", "bottom", "lower", "left",
                                               "right", "center", "middle")) for t in texts)
    assert with_size > 0.6 * len(texts) and with_position > 0.6 * len(texts)


def test_vocab_is_complete():
    vocab = set(shapes.VOCAB)
    assert sorted(vocab) == shapes.VOCAB
    assert all(re.fullmatch(r"[a-z]+", w) for w in shapes.VOCAB)
    for i in range(3000):
        rng = np.random.default_rng((99, i))
        scene = render.sample_scene(rng, i % len(shapes.CLASS_NAMES))
        caption = captions.make_caption(scene, rng)
        assert set(captions.words(caption)) <= vocab, caption
        assert set(re.sub(r"[a-z ]", "", caption)) <= set(shapes.PUNCTUATION), caption
    for template in shapes.ZERO_SHOT_TEMPLATES:
        assert "{}" in template
        for name in shapes.CLASS_NAMES:
            assert set(captions.words(template.format(name))) <= vocab


def test_images_differ_and_show_a_shape():
    images = [shapes.generate_example(i, seed=5, image_size=32)["image"] for i in range(200)]
    assert len({im.tobytes() for im in images}) == len(images)
    for im in images[:24]:
        assert im.std() > 5  # not a blank background


@pytest.mark.parametrize("size", [32, 64])
def test_image_size_configs(size):
    config = shapes.shapes_config(size)
    assert config.name == f"{size}px" and config.image_size == size
    assert shapes.MmjaxShapes.builder_configs[config.name].image_size == size
    assert shapes.generate_example(0, 0, size)["image"].shape == (size, size, 3)


def test_default_sizes_and_name():
    assert shapes.MmjaxShapes.name == "mmjax_shapes"
    config = shapes.shapes_config()
    assert (config.num_train, config.num_test) == (20_000, 2_000)
    assert shapes.shapes_config(32, 10, 5).name == "32px_10_5"


def test_prepare_and_read_without_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from mmjax.data import shapes, sources\n"
        f"shapes.prepare({str(tmp_path)!r}, image_size=64, num_train=30, num_test=10)\n"
        f"src = sources.get_source({{'name': 'mmjax_shapes/64px', 'split': 'test', "
        f"'data_dir': {str(tmp_path)!r}, 'num_train': 30, 'num_test': 10}})\n"
        "x = src[0]\n"
        "assert x['image'].shape == (64, 64, 3) and isinstance(x['caption'], str), x\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('ok', len(src))\n"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=repo_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok 10" in result.stdout
