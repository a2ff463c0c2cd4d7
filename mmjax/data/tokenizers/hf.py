"""Any Hugging Face ``tokenizer.json``, through the ``tokenizers`` library."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mmjax.data.tokenizers.base import (
    as_text_list,
    check_context_length,
    clean_text,
    import_ftfy_fix_text,
)


class HFTokenizer:
    """Wraps a Hugging Face ``tokenizer.json`` (``tokenizers`` library), padded and truncated.

    Truncation and padding are done by the library (so post-processor special
    tokens such as [CLS]/[SEP] are kept within ``context_length``). With
    ``clean=True`` text gets open_clip's HF cleaning (ftfy, html unescape,
    whitespace collapse; no lower-casing).
    """

    _PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")
    _EOT_CANDIDATES = ("</s>", "[SEP]", "<|endoftext|>", "<eos>", "<end_of_text>")

    def __init__(self, tokenizer_json_path: str, context_length: int,
                 pad_token_id: int | None = None, *, clean: bool = False):
        from tokenizers import Tokenizer as _HFTokenizer

        self.context_length = check_context_length(context_length)
        self.path = str(tokenizer_json_path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer.json not found: {self.path!r}")
        try:
            self._tok = _HFTokenizer.from_file(self.path)
        except Exception as e:
            raise ValueError(f"could not load Hugging Face tokenizer from {self.path!r}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_token_id = self._resolve_pad_id(pad_token_id)
        self.eot_token_id = self._find_token(self._EOT_CANDIDATES)
        self._fix_text = import_ftfy_fix_text() if clean else None

        pad_token = self._tok.id_to_token(self.pad_token_id) or "[PAD]"
        self._tok.enable_truncation(max_length=self.context_length)
        self._tok.enable_padding(pad_id=self.pad_token_id, pad_token=pad_token, length=self.context_length)

    def _find_token(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def _resolve_pad_id(self, pad_token_id: int | None) -> int:
        """Explicit id, else the file's padding config, else a known pad token, else 0."""
        if pad_token_id is not None:
            if not 0 <= pad_token_id < self.vocab_size:
                raise ValueError(f"pad_token_id {pad_token_id} outside vocabulary of {self.vocab_size}")
            return int(pad_token_id)
        if self._tok.padding is not None:
            return int(self._tok.padding["pad_id"])
        found = self._find_token(self._PAD_CANDIDATES)
        return 0 if found is None else found

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenizes texts into an int32 array of shape (N, context_length)."""
        texts = as_text_list(texts)
        if self._fix_text is not None:
            texts = [clean_text(t, self._fix_text) for t in texts]
        out = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int32)
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            out[i, : len(enc.ids)] = enc.ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of one id row, via the library's decoder."""
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=skip_special_tokens)
