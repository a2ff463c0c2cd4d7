"""Which attribute values a caption names (the shapes data set's colour / shape / size / position
words), for evaluators that score captions by meaning rather than by string.

`entries` lists an attribute's values in the order of the examples' int field; each entry is one
phrase or a list of synonyms. A caption names entry r when it contains one of r's phrases and,
once those are removed, none of any other entry: "top left" does not name "left", and a caption
with two colours names neither.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from mmjax.evaluate import captioning_metrics

Entries = Sequence[str | Sequence[str]]


def _phrases(entry: str | Sequence[str]) -> list[str]:
    words = [entry] if isinstance(entry, str) else list(entry)
    return [captioning_metrics.tokenize_caption(w) for w in words]


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(phrase)}(?!\S)", text) is not None


def names_attribute(caption: str, right: int, entries: Sequence[str | Sequence[str]]) -> bool:
    """Whether `caption` names entry `right` of `entries` and no other entry (module docstring)."""
    text = captioning_metrics.tokenize_caption(caption)
    own = sorted(_phrases(entries[right]), key=len, reverse=True)   # "light gray" before "gray"
    if not any(_mentions(text, p) for p in own):
        return False
    for phrase in own:
        text = re.sub(rf"(?<!\S){re.escape(phrase)}(?!\S)", " ", text)
    return not any(_mentions(text, p) for i, e in enumerate(entries) if i != right for p in _phrases(e))


def named_value(caption: str, entries: Entries) -> int | None:
    """The one entry `caption` names, or None when it names none (or, ambiguously, several)."""
    named = [r for r in range(len(entries)) if names_attribute(caption, r, entries)]
    return named[0] if len(named) == 1 else None


def consistent_pairs(captions: Sequence[str], image_values: Mapping[str, np.ndarray],
                     attribute_words: Mapping[str, Entries]) -> np.ndarray:
    """(n_img, n_txt) bool: caption j is true of image i, i.e. every attribute j names equals i's.

    A caption that leaves an attribute out ("a red circle") is true of every image whatever
    that attribute is, so it can be the right answer for many images."""
    n_img = len(next(iter(image_values.values()))) if image_values else 0
    out = np.ones((n_img, len(captions)), bool)
    for field, entries in attribute_words.items():
        values = np.asarray(image_values[field]).astype(int)
        if values.min(initial=0) < 0 or values.max(initial=0) >= len(entries):
            raise ValueError(f"attribute_words.{field} has {len(entries)} entries, but the field {field!r} "
                             f"holds values in [{values.min()}, {values.max()}]")
        named = np.array([-1 if (v := named_value(c, entries)) is None else v for c in captions])
        out &= (named[None, :] < 0) | (named[None, :] == values[:, None])
    return out


def caption_columns(batch: Mapping[str, np.ndarray], attribute_words: Mapping[str, Entries], column) -> dict:
    """The raw captions and the images' attribute fields of one evaluation batch (`column` names
    the evaluator and its pp when a key is missing)."""
    return {key: np.asarray(column(batch, key)) for key in ("caption", *attribute_words)}


def consistent_recalls(parts: Sequence[Mapping[str, np.ndarray]], scores_i2t: np.ndarray, scores_t2i: np.ndarray,
                       attribute_words: Mapping[str, Entries], ks: Sequence[int]) -> dict[str, float]:
    """R@K where any caption true of the image counts (`consistent_pairs`), from `caption_columns`
    of every batch."""
    from mmjax.evaluate import retrieval

    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    captions = [c.decode() if isinstance(c, bytes) else str(c) for c in joined.pop("caption")]
    relevant = consistent_pairs(captions, joined, attribute_words)
    return retrieval.recall_with_relevance(scores_i2t, scores_t2i, relevant, ks)
