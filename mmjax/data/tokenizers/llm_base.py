"""What the language-model tokenizers (SentencePiece, GPT-2 BPE) share: special tokens, padding, masks.

A subclass supplies only the raw text <-> id mapping (`_encode_text`, `_decode_ids`); this base adds
the begin/end-of-sequence tokens each model family expects, cuts rows to ``context_length`` keeping
those tokens (as transformers' truncation does), pads on the side the family pads on, and returns
the attention mask that says which positions are text. The mask matters here: LLaMA has no pad
token, so its rows are padded with an id (0, ``<unk>``) that can also occur in text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.data.tokenizers.base import as_text_list, check_context_length

PADDING_SIDES = ("left", "right")


class LLMTokenizer:
    """Base of the decoder-LM tokenizers; see the module docstring.

    Attributes a subclass sets before calling :meth:`_setup`: ``vocab_size`` and the ids
    ``bos_token_id`` / ``eos_token_id`` (None where the vocabulary has none).
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None

    def _setup(self, context_length: int, *, add_bos: bool, add_eos: bool, padding_side: str,
               pad_token_id: int, truncate: bool, extra_special_ids: Sequence[int] = ()) -> None:
        """Checks and stores the row options shared by every LM tokenizer."""
        self.context_length = check_context_length(context_length)
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if add_bos and self.bos_token_id is None:
            raise ValueError(f"{type(self).__name__}: add_bos=True but the vocabulary has no begin-of-sequence token")
        if add_eos and self.eos_token_id is None:
            raise ValueError(f"{type(self).__name__}: add_eos=True but the vocabulary has no end-of-sequence token")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) \
                or not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be an id in [0, {self.vocab_size}), got {pad_token_id!r}")
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.padding_side = padding_side
        self.pad_token_id = int(pad_token_id)
        self.truncate = bool(truncate)
        self.eot_token_id = self.eos_token_id
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id, *extra_special_ids}
        self.special_token_ids: tuple[int, ...] = tuple(sorted(i for i in specials if i is not None))

    # -- subclass hooks -------------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- variable-length ids ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of one text, not padded nor truncated; with ``add_special_tokens`` the family's BOS/EOS.

        Special tokens written in the text (``"<s>"``, ``"</s>"``) are never turned into their
        ids: text is text; only this method's flags add them.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        if add_special_tokens:
            ids = self._with_specials(ids)
        return ids

    def encode_batch(self, texts: str | Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Variable-length id lists (generation prompts), BOS/EOS as configured, no padding/truncation."""
        return [self.encode(t, add_special_tokens) for t in as_text_list(texts)]

    def _with_specials(self, ids: list[int]) -> list[int]:
        return [self.bos_token_id] * self.add_bos + ids + [self.eos_token_id] * self.add_eos

    # -- fixed-length rows ------------------------------------------------------------------------

    def encode_padded(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both (N, context_length): int32 ids padded on ``padding_side``, bool mask of text.

        A text too long keeps its first tokens and its BOS/EOS (or is refused with ``truncate=False``).
        """
        texts = as_text_list(texts)
        length = self.context_length
        room = length - self.add_bos - self.add_eos
        ids = np.full((len(texts), length), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(texts), length), dtype=bool)
        for i, text in enumerate(texts):
            body = self._encode_text(text)
            if len(body) > room:
                if not self.truncate:
                    raise ValueError(f"text {i} has {len(body) + length - room} tokens with its special tokens, more "
                                     f"than context_length {length} (truncate=False): {text[:80]!r}")
                body = body[:max(room, 0)]
            row = self._with_specials(body)[:length]
            where = slice(0, len(row)) if self.padding_side == "right" else slice(length - len(row), length)
            ids[i, where] = row
            mask[i, where] = True
        return ids, mask

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenizes texts into an int32 array of shape (N, context_length); see :meth:`encode_padded`."""
        return self.encode_padded(texts)[0]

    # -- ids back to text -------------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True,
               mask: np.ndarray | None = None) -> str | list[str]:
        """Text of one id row (a 2-D array gives a list of texts).

        ``mask`` (as from :meth:`encode_padded`) drops padding exactly; without it
        ``skip_special_tokens`` drops BOS, EOS and pad ids wherever they are.
        """
        arr = np.asarray(ids)
        if arr.ndim == 2:
            masks = [None] * len(arr) if mask is None else np.asarray(mask)
            return [self.decode(row, skip_special_tokens, m) for row, m in zip(arr, masks, strict=True)]
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D or 2-D id array, got shape {arr.shape}")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != arr.shape:
                raise ValueError(f"mask shape {mask.shape} does not match ids shape {arr.shape}")
            arr = arr[mask]
        bad = [int(i) for i in arr if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range for a vocabulary of {self.vocab_size}: {bad[:5]}")
        row = [int(i) for i in arr]
        if skip_special_tokens:
            row = [i for i in row if i not in self.special_token_ids]
        return self._decode_ids(row, skip_special_tokens)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({getattr(self, 'path', '')!r}, context_length={self.context_length}, "
                f"add_bos={self.add_bos}, add_eos={self.add_eos}, padding_side={self.padding_side!r})")
