"""mmjax.evaluate.zeroshot: template averaging and top-1 on constructed embeddings."""

import numpy as np
import pytest

from mmjax.evaluate.zeroshot import class_embeddings, normalize, read_class_names, zeroshot_top1

TEMPLATES = ["a photo of a {}.", "a drawing of the {}"]
PROMPT_VECTORS = {
    "a photo of a cat.": [3.0, 0.0, 0.0, 4.0],     # norm 5 -> (.6, 0, 0, .8)
    "a drawing of the cat": [0.0, 2.0, 0.0, 0.0],  # -> (0, 1, 0, 0)
    "a photo of a dog.": [0.0, 0.0, 10.0, 0.0],    # -> (0, 0, 1, 0)
    "a drawing of the dog": [0.0, 0.0, 0.5, 0.0],  # -> (0, 0, 1, 0)
}


class FakeEncoder:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return np.array([PROMPT_VECTORS[p] for p in prompts])


def test_class_embeddings_average_normalised_prompts():
    encoder = FakeEncoder()
    got = class_embeddings(encoder, ["cat", "dog"], TEMPLATES)
    # Class-major prompt order, one call.
    assert encoder.calls == [["a photo of a cat.", "a drawing of the cat",
                              "a photo of a dog.", "a drawing of the dog"]]
    # cat: mean((.6, 0, 0, .8), (0, 1, 0, 0)) = (.3, .5, 0, .4), norm sqrt(.5).
    cat = np.array([0.3, 0.5, 0.0, 0.4]) / np.sqrt(0.5)
    dog = np.array([0.0, 0.0, 1.0, 0.0])   # the prompt norms (10 vs .5) do not weight the mean
    np.testing.assert_allclose(got, np.stack([cat, dog]), atol=1e-6)
    assert got.shape == (2, 4) and got.dtype == np.float32


def test_single_template_is_just_normalised():
    got = class_embeddings(FakeEncoder(), ["dog", "cat"], ["a photo of a {}."])
    np.testing.assert_allclose(got, [[0, 0, 1, 0], [0.6, 0, 0, 0.8]], atol=1e-6)


def test_zeroshot_top1_on_constructed_embeddings():
    class_embs = np.eye(4)[:3]                                 # 3 classes in 4-D
    images = np.array([[5.0, 0, 0, 0],                         # -> 0
                       [0.1, 1.0, 0, 3.0],                     # -> 1 (dim 3 is no class)
                       [0, 0, 0.2, 0],                         # -> 2 (scale does not matter)
                       [1.0, 0, 0.9, 0]])                      # -> 0
    labels = np.array([0, 1, 2, 2])
    assert zeroshot_top1(images, labels, class_embs) == pytest.approx(0.75)
    assert zeroshot_top1(images, np.array([0, 1, 2, 0]), class_embs) == 1.0
    # With the class embeddings from the fake encoder: images along each class direction.
    embs = class_embeddings(FakeEncoder(), ["cat", "dog"], TEMPLATES)
    images = np.array([[0.3, 0.5, 0.0, 0.4], [0.0, 0.0, 2.0, 0.1], [0.6, 0, 0, 0.8]])
    assert zeroshot_top1(images, np.array([0, 1, 0]), embs) == 1.0
    assert zeroshot_top1(images, np.array([1, 1, 1]), embs) == pytest.approx(1 / 3)


def test_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize(x), [[0.6, 0.8], [0.0, 0.0]])


@pytest.mark.parametrize("names,templates,match", [
    (["cat"], ["a photo of a cat"], "placeholder"),
    (["cat"], ["a photo of a {}", "no placeholder"], "placeholder"),
    ([], TEMPLATES, "at least one"),
    (["cat"], [], "at least one"),
])
def test_bad_templates_raise(names, templates, match):
    encoder = FakeEncoder()
    with pytest.raises(ValueError, match=match):
        class_embeddings(encoder, names, templates)
    assert encoder.calls == []


def test_read_class_names_skips_blank_lines_and_refuses_an_empty_file(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("tench\n\n  great white shark \ncafé\n", encoding="utf-8")
    assert read_class_names(str(names)) == ["tench", "great white shark", "café"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no names"):
        read_class_names(str(empty))
