"""Visual questions about the embedded shapes data: "what colour is the shape?", "where is it?".

Each shapes example carries its factors (colour, shape, size, grid position), so a question about
one of them has one right answer. A question type is drawn per example from the example's
generator (the pipeline's per-element rng: the same question for the same example and seed), then
one of several phrasings of it, so a model must read the question, not only the image.

Answers form one fixed vocabulary (`ANSWERS`, index = the VQA head's class): the colour, shape and
size names of `shapes_render` and the position names of `shapes.POSITION_NAMES`. Every question has
one ground-truth answer, so its VQA v2 soft-score target is 1.0 at `answer_id` and 0 elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.data import shapes_render as render

# Row-major over the 3x3 grid; equal to mmjax.data.shapes.POSITION_NAMES (a test checks), kept
# here so that building questions does not import the TFDS builder.
POSITION_NAMES: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                                   "bottom left", "bottom", "bottom right")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "size", "position")
# The example field each question type asks about, and the names of its values.
FACTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "color": ("color", render.COLORS),
    "shape": ("shape", render.SHAPES),
    "size": ("size", render.SIZES),
    "position": ("position", POSITION_NAMES),
}
PHRASINGS: dict[str, tuple[str, ...]] = {
    "color": ("what colour is the shape?", "what color is the object?", "which colour is it?",
              "what is the color of the shape?", "what colour does the object have?"),
    "shape": ("what shape is it?", "what kind of shape is it?", "which shape is the object?",
              "what is the shape?", "what shape does the object have?"),
    "size": ("how big is the shape?", "what size is the object?", "what is the size of the shape?",
             "how big is it?", "which size is the object?"),
    "position": ("where is it?", "where is the shape?", "where is the object located?",
                 "what is the position of the shape?", "where is the shape located?"),
}
ANSWERS: tuple[str, ...] = tuple(name for _, names in FACTORS.values() for name in names)
ANSWER_INDEX: dict[str, int] = {answer: i for i, answer in enumerate(ANSWERS)}
# Answers each question type can have: chance is 1 / len of these (colour 1/4 ... position 1/9).
TYPE_ANSWERS: dict[str, tuple[str, ...]] = {qtype: names for qtype, (_, names) in FACTORS.items()}


def vocabulary() -> list[str]:
    """Every word of the questions and answers, and "question" / "answer" (the prompt template's
    words), in a fixed order: what a word tokenizer over the captions lacks for prompted VQA."""
    texts = [q for phrasings in PHRASINGS.values() for q in phrasings] + list(ANSWERS) + ["question answer"]
    return list(dict.fromkeys(w for text in texts for w in re.findall(r"[^\W_]+", text.lower())))


def ask(example: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str, int]:
    """(question, answer, question type index) about a shapes example, drawn from `rng`."""
    qtype_index = int(rng.integers(len(QUESTION_TYPES)))
    qtype = QUESTION_TYPES[qtype_index]
    field, names = FACTORS[qtype]
    if field not in example:
        raise KeyError(f"shapes question about {qtype!r} needs the example field {field!r}; the example has "
                       f"{sorted(example)} (is it from the mmjax_shapes data set?)")
    value = int(np.asarray(example[field]))
    if not 0 <= value < len(names):
        raise ValueError(f"example field {field!r} = {value} is not one of the {len(names)} {qtype} values")
    phrasings = PHRASINGS[qtype]
    return phrasings[int(rng.integers(len(phrasings)))], names[value], qtype_index

