"""The small WordPiece vocabulary shipped for the embedded shapes data (``shapes_vocab.txt``).

Demos and smoke runs of BERT-style models tokenize shapes captions without a download. Every
caption, zero-shot template and class word is a whole token, plus the words of the VQA-on-shapes
questions; single letters, digits and their "##" pieces make any other lower-case ASCII word
tokenize without [UNK] (as pieces). Deterministic; a test checks the shipped file equals
``build_shapes_vocab()``. Regenerate after changing the captions with:

    python -m mmjax.data.tokenizers.shapes_vocab
"""

from __future__ import annotations

import os
import string

from mmjax.data.tokenizers.wordpiece import SPECIAL_TOKENS

# Words of the generated questions ("what colour is the shape?", "where is it?") and answers.
QUESTION_WORDS: tuple[str, ...] = (
    "what", "colour", "color", "shape", "where", "is", "the", "size", "which", "it", "of", "how", "big",
    "kind", "position", "located", "object", "does", "have", "yes", "no",
)


def default_shapes_vocab_path() -> str:
    """Path of the shipped ``shapes_vocab.txt`` (package data, next to this module)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_vocab.txt")


def build_shapes_vocab() -> list[str]:
    """The vocabulary in id order: specials, punctuation, digits, letters, words, "##" pieces."""
    from mmjax.data import shapes_captions, shapes_render

    words = set(shapes_captions.VOCAB) | set(QUESTION_WORDS)
    for table in (shapes_render.SHAPES, shapes_render.COLORS, shapes_render.SIZES, shapes_render.ROWS,
                  shapes_render.COLUMNS, shapes_render.BACKGROUNDS):
        words |= {w for name in table for w in name.split()}
    characters = [*string.punctuation, *string.digits, *string.ascii_lowercase]
    words -= set(characters)
    pieces = [f"##{c}" for c in string.digits + string.ascii_lowercase]
    return [*SPECIAL_TOKENS, *characters, *sorted(words), *pieces]


def write_shapes_vocab(path: str | None = None) -> str:
    """Writes the vocabulary (one token a line) to `path`, by default the shipped file."""
    path = path or default_shapes_vocab_path()
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(f"{token}\n" for token in build_shapes_vocab()))
    return path


if __name__ == "__main__":
    print(f"wrote {write_shapes_vocab()}")
