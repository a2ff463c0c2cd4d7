"""Caption generation, zero-shot prompts and the closed vocabulary of the shapes data set.

Captions come from many templates with synonyms so that a text encoder has to
learn that e.g. "big" and "large" or "upper" and "top" mean the same thing.
Every word that can be produced is listed in `VOCAB` (built from the very tables
used to generate captions), so a word tokenizer built from it is complete.
Captions are lower case; words are runs of letters a-z, and the only other
characters are spaces and the punctuation in `PUNCTUATION`.
"""

from __future__ import annotations

import re

import numpy as np

from mmjax.data import shapes_render as render
from mmjax.data.shapes_render import Scene

PUNCTUATION: list[str] = [".", ",", ":"]

_SIZE_WORDS = {
    "small": ["small", "small", "little", "tiny"],
    "medium": ["medium", "medium sized", "mid sized", "moderately sized"],
    "large": ["large", "large", "big", "big"],
}
SHAPE_WORDS: dict[str, list[str]] = {  # canonical shape -> words used for it in captions
    "circle": ["circle", "circle", "circle", "disk"],
    "square": ["square", "square", "square", "box"],
    "triangle": ["triangle"],
    "star": ["star", "star", "star", "five pointed star"],
    "cross": ["cross", "cross", "cross", "plus sign"],
    "diamond": ["diamond", "diamond", "diamond", "rhombus"],
}
_BACKGROUND_WORDS = {
    "dark": ["dark", "dark gray", "black"],
    "gray": ["gray", "grey"],
    "light": ["light", "light gray", "white"],
}
_VERTICAL = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}

# Position phrases: "{v}" / "{h}" are filled from _VERTICAL and the column name.
_CORNER = (["in the {v} {h} corner", "at the {v} {h}", "in the {v} {h}",
            "near the {v} {h} corner"], ["{v} {h}", "{v} {h} corner"])
_TOP_BOTTOM = (["at the {v}", "near the {v}", "at the {v} center", "along the {v} edge",
                "in the {v} middle"], ["{v}", "{v} center"])
_LEFT_RIGHT = (["on the {h}", "on the {h} side", "at the {h}", "near the {h} edge",
                "in the middle {h}"], ["{h}", "{h} side", "middle {h}"])
_CENTER = (["in the center", "in the middle", "at the center",
            "in the center of the image"], ["center", "middle"])

# {np}: "a small red circle"; {nps}: without article; {pos}: "in the top left corner";
# {bare}: "top left"; {bg}: "on a dark background".
_TEMPLATES = [
    "{np} {pos}", "{np} {pos}.", "there is {np} {pos}", "there is {np} {pos}.",
    "{bare}: {np}", "{bare}: {np}.", "{np}", "{np}.", "a picture of {np} {pos}",
    "an image of {np} {pos}", "an image showing {np} {pos}", "a photo of {np} {bg}",
    "{np} {pos} {bg}", "{np} {bg}, {pos}", "this is {np}", "you can see {np} {pos}",
    "the image shows {np} {pos}.", "{pos} there is {np}", "{pos}, {np}",
    "a drawing of {np} {pos}", "one {nps} {pos}", "a single {nps} {pos} {bg}",
    "the {shape} {pos} is {color}", "the {shape} is {color} and {size}",
    "a {color} {shape} that is {size}, {pos}", "{np} sits {pos}", "{np} is shown {pos}",
    "a {size} {shape} colored {color}, {bare}", "{color} {shape}, {size}, {bare}",
]
_BACKGROUND_PHRASES = ["on a {b} background", "against a {b} background"]

ZERO_SHOT_TEMPLATES: list[str] = [
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.",
    "a {} shape.", "a {}.", "there is a {}.", "this is a {}.", "a small {}.", "a big {}.",
    "an image showing a {}.", "a {} on a gray background.",
]

CLASS_NAMES: list[str] = [f"{c} {s}" for c in render.COLORS for s in render.SHAPES]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _position_phrases(row: str, column: str) -> tuple[list[str], list[str]]:
    if row == "middle" and column == "center":
        return _CENTER
    if row == "middle":
        return _LEFT_RIGHT
    if column == "center":
        return _TOP_BOTTOM
    return _CORNER


def position_name(scene: Scene) -> str:
    """Canonical name of the grid cell, e.g. "top left", "center", "bottom"."""
    row, column = render.ROWS[scene.row], render.COLUMNS[scene.column]
    if row == "middle":
        return column
    return row if column == "center" else f"{row} {column}"


def position_phrases() -> list[list[str]]:
    """Every phrase a caption may use for each grid cell (row-major, as the examples' "position"):
    the attribute words by which a generated caption names the right position (the captioning
    evaluator's `attribute_words`)."""
    out = []
    for row in render.ROWS:
        for column in render.COLUMNS:
            phrases = [p for group in _position_phrases(row, column) for p in group]
            verticals = _VERTICAL.get(row, [""])
            out.append(sorted({p.format(v=v, h=column) for p in phrases for v in verticals}))
    return out


def attribute_words() -> dict[str, list[list[str]]]:
    """{example field: the phrases that name each of its values}, for evaluators that read which
    colour, shape, size and position a caption names (mmjax.evaluate.attributes)."""
    return {"color": [[c] for c in render.COLORS],
            "shape": [sorted(set(SHAPE_WORDS[s])) for s in render.SHAPES],
            "size": [sorted(set(_SIZE_WORDS[s])) for s in render.SIZES],
            "position": position_phrases()}


def recaption(color: int, shape: int, size: int, position: int, rng: np.random.Generator) -> str:
    """Another caption of a scene known by its factors (an example's fields; the background, which
    the examples do not record, drawn anew): a paraphrase of the example's own caption."""
    scene = render.Scene(color=int(color), shape=int(shape), size=int(size), row=int(position) // 3,
                         column=int(position) % 3, background=int(rng.integers(len(render.BACKGROUNDS))),
                         center=(0.5, 0.5), radius=0.0, angle=0.0, rgb=(0, 0, 0), background_rgb=(0, 0, 0),
                         noise_std=0.0, noise_seed=0)
    return make_caption(scene, rng)


def make_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Returns a random English caption describing `scene`."""
    row, column = render.ROWS[scene.row], render.COLUMNS[scene.column]
    prepositional, bare = _position_phrases(row, column)
    vertical = _pick(rng, _VERTICAL[row]) if row in _VERTICAL else ""
    fill = {"v": vertical, "h": column}
    color = render.COLORS[scene.color]
    shape = _pick(rng, SHAPE_WORDS[render.SHAPES[scene.shape]])
    size = _pick(rng, _SIZE_WORDS[render.SIZES[scene.size]])
    nps = f"{color} {shape}" if rng.random() < 0.15 else f"{size} {color} {shape}"
    background = _pick(rng, _BACKGROUND_WORDS[render.BACKGROUNDS[scene.background]])
    return _pick(rng, _TEMPLATES).format(
        np=f"a {nps}",
        nps=nps,
        pos=_pick(rng, prepositional).format(**fill),
        bare=_pick(rng, bare).format(**fill),
        bg=_pick(rng, _BACKGROUND_PHRASES).format(b=background),
        color=color,
        shape=shape,
        size=size,
    )


def words(text: str) -> list[str]:
    """Splits text into the lower-case words that `VOCAB` lists."""
    return re.findall(r"[a-z]+", text.lower())


def _all_vocab_text() -> list[str]:
    texts = _TEMPLATES + _BACKGROUND_PHRASES + ZERO_SHOT_TEMPLATES + CLASS_NAMES
    for table in (_SIZE_WORDS, SHAPE_WORDS, _BACKGROUND_WORDS, _VERTICAL):
        texts += [w for options in table.values() for w in options]
    for phrases in (_CORNER, _TOP_BOTTOM, _LEFT_RIGHT, _CENTER):
        texts += phrases[0] + phrases[1]
    texts += list(render.COLUMNS) + list(render.COLORS)
    # Template placeholders such as "{np}" are not words of the language.
    return [re.sub(r"\{[a-z]*\}", " ", t) for t in texts]


VOCAB: list[str] = sorted({w for t in _all_vocab_text() for w in words(t)})
