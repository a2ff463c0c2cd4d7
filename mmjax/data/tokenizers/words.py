"""A closed-vocabulary word tokenizer for the embedded synthetic captions."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mmjax.data.tokenizers.base import as_text_list, check_context_length, pack

_WORD_RE = re.compile(r"[^\W_]+")


class WordTokenizer:
    """Closed-vocabulary word tokenizer for small synthetic captions.

    Lower-cases and splits on anything that is not a letter or digit. Ids:
    0 pad, 1 unk, 2 start, then the vocabulary words in the given order
    (duplicates dropped), and end-of-text gets the largest id so that
    argmax-over-ids pooling (as in CLIP) lands on the end token.
    """

    PAD, UNK, SOT = "<pad>", "<unk>", "<start_of_text>"
    EOT = "<end_of_text>"

    def __init__(self, vocab: Sequence[str], context_length: int = 16, add_bos: bool = True):
        if isinstance(vocab, str):
            raise TypeError("vocab must be a sequence of words, not a single str")
        self.context_length = check_context_length(context_length)
        self.add_bos = bool(add_bos)        # False: texts that follow a prompt (MiniGPT-4's) start with no <start>
        words: list[str] = []
        for word in vocab:
            if not isinstance(word, str) or _WORD_RE.fullmatch(word) is None or word != word.lower():
                raise ValueError(f"vocab entries must be single lower-case alphanumeric words, got {word!r}")
            if word not in words:
                words.append(word)
        self.words = tuple(words)
        tokens = [self.PAD, self.UNK, self.SOT, *self.words, self.EOT]
        self._encoder = {w: i for i, w in enumerate(tokens)}
        self._decoder = tokens
        self.vocab_size = len(tokens)
        self.pad_token_id, self.unk_token_id, self.sot_token_id = 0, 1, 2
        self.eot_token_id = self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        """Word ids of one text, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [self._encoder.get(w, self.unk_token_id) for w in _WORD_RE.findall(text.lower())]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenizes texts into an int32 array of shape (N, context_length)."""
        start = [self.sot_token_id] if self.add_bos else []
        rows = [[*start, *self.encode(t), self.eot_token_id] for t in as_text_list(texts)]
        return pack(rows, self.context_length, self.eot_token_id)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str | list[str]:
        """Space-joined words of one id row (a list of them for a (N, L) array, as the captioning
        evaluator decodes a batch); each row stops at its first end-of-text id."""
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in ids]
        words = []
        for i in ids.ravel():
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the word tokenizer's {self.vocab_size} ids")
            if i == self.eot_token_id:
                if not skip_special_tokens:
                    words.append(self.EOT)
                break
            if skip_special_tokens and i in (self.pad_token_id, self.sot_token_id):
                continue
            words.append(self._decoder[i])
        return " ".join(words)
