"""What every mmjax tokenizer shares: the interface and the text/row helpers."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    """What every mmjax tokenizer provides."""

    vocab_size: int
    context_length: int
    eot_token_id: int | None

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray: ...


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """Normalises a str or sequence of str to a list, rejecting other types."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (Sequence, np.ndarray)):
        raise TypeError(f"expected a str or a sequence of str, got {type(texts).__name__}")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        out.append(text)
    return out


def check_context_length(context_length: int) -> int:
    """Needs room for at least a start and an end token."""
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    return int(context_length)


def pack(rows: list[list[int]], context_length: int, eot_token_id: int) -> np.ndarray:
    """Zero-pads rows of ids into (N, L) int32, CLIP style.

    A row longer than L keeps its first L ids and has the last one replaced by
    the end-of-text id, so argmax/eot pooling always finds an end token.
    """
    out = np.zeros((len(rows), context_length), dtype=np.int32)
    for i, ids in enumerate(rows):
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot_token_id
        out[i, : len(ids)] = ids
    return out


def clean_text(text: str, fix_text: Any) -> str:
    """open_clip's 'basic' + whitespace cleaning: ftfy, double html unescape, collapse spaces."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split())


def import_ftfy_fix_text() -> Any:
    """ftfy.fix_text, imported lazily so the word tokenizer works without ftfy."""
    try:
        import ftfy
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError("text cleaning needs the 'ftfy' package (pip install ftfy)") from e
    return ftfy.fix_text
