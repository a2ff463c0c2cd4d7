"""mmjax.evaluate.attributes (which colour / shape / size / position a caption names, and which
captions are true of which image) and the recall that counts every true caption."""

import numpy as np
import pytest

from mmjax.data import shapes, shapes_captions
from mmjax.evaluate import attributes, retrieval

POSITIONS = ["top left", "top", "left"]


@pytest.mark.parametrize("caption, entries, right, ok", [
    ("a red circle", ["red", "blue"], 0, True), ("a red and blue circle", ["red", "blue"], 0, False),
    ("a blue circle", ["red", "blue"], 0, False), ("A star, top left.", POSITIONS, 0, True),
    ("a star at the left", POSITIONS, 2, True), ("a star at the top left", POSITIONS, 2, False),
    ("a five pointed star", [["star", "five pointed star"], "circle"], 0, True),
    ("a tiny box", [["square", "box"], "circle"], 0, True), ("a boxer", [["square", "box"]], 0, False),
])
def test_an_attribute_counts_when_named_alone(caption, entries, right, ok):
    assert attributes.names_attribute(caption, right, entries) is ok


def test_generated_captions_name_their_own_scene():
    """Every attribute a generated caption names is its scene's; colour and shape are always named."""
    words = shapes_captions.attribute_words()
    named = dict.fromkeys(words, 0)
    for index in range(300):
        example = shapes.generate_example(index, seed=7, image_size=16)
        for field, entries in words.items():
            value = attributes.named_value(example["caption"], entries)
            assert value in (None, int(example[field])), (example["caption"], field, value)
            named[field] += value is not None
    assert named["color"] == named["shape"] == 300
    assert 150 < named["size"] < 300 and 150 < named["position"] < 300   # captions leave some out


def test_a_caption_is_true_of_every_image_it_does_not_contradict():
    words = {"color": [["red"], ["blue"]], "shape": [["circle", "disk"], ["square"]]}
    captions = ["a red circle", "a blue disk", "a circle", "a red and blue square"]
    images = {"color": np.array([0, 1, 0]), "shape": np.array([0, 0, 1])}
    got = attributes.consistent_pairs(captions, images, words)
    want = np.array([[1, 0, 1, 0],      # red circle
                     [0, 1, 1, 0],      # blue circle
                     [0, 0, 0, 1]],     # red square: "red and blue" names no colour, so only the shape counts
                    bool)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"attribute_words\.color has 2 entries.*\[0, 2\]"):
        attributes.consistent_pairs(captions, {"color": np.array([0, 2]), "shape": np.array([0, 0])}, words)


def test_recall_with_relevance():
    scores = np.random.default_rng(0).normal(size=(6, 6))
    eye = retrieval.recall_with_relevance(scores, scores.T, np.eye(6, dtype=bool), (1, 3))
    assert eye == retrieval.recall_from_scores(scores, scores.T, (1, 3))
    # Image 0 ranks caption 2 first: a hit once caption 2 is also true of image 0.
    scores = 0.5 * np.eye(3)
    scores[0, 2] = 0.9
    relevant = np.eye(3, dtype=bool)
    assert retrieval.recall_with_relevance(scores, scores.T, relevant, (1,))["i2t_r1"] == pytest.approx(2 / 3)
    relevant[0, 2] = True
    assert retrieval.recall_with_relevance(scores, scores.T, relevant, (1,))["i2t_r1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="relevant must be"):
        retrieval.recall_with_relevance(scores, scores.T, relevant[:2], (1,))
