"""OpenAI CLIP's byte-level BPE tokenizer, id-for-id identical to ``open_clip.tokenize``."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from collections.abc import Sequence

import numpy as np

from mmjax.data.tokenizers.base import (
    as_text_list,
    check_context_length,
    clean_text,
    import_ftfy_fix_text,
    pack,
)

# CLIP's vocabulary: 256 byte symbols, the same 256 with the end-of-word
# marker, 48894 merges and two special tokens = 49408 ids.
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_SOT = "<start_of_text>"
_CLIP_EOT = "<end_of_text>"
_END_OF_WORD = "</w>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...)
    are shifted to code points from 256 upward, so BPE never sees whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def default_clip_vocab_path() -> str:
    """Path of the BPE vocabulary bundled with an installed open_clip (imports nothing)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no CLIP vocab_path given and open_clip is not installed; pass the path of "
            "bpe_simple_vocab_16e6.txt.gz explicitly")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def _read_clip_merges(vocab_path: str) -> list[tuple[str, str]]:
    """Reads the BPE merge list (the first 48894 after the header) from a .txt.gz file."""
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"CLIP BPE vocab file not found: {vocab_path!r}")
    try:
        with gzip.open(vocab_path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"CLIP BPE vocab file {vocab_path!r} is not gzipped UTF-8 text: {e}") from e
    body = lines[1:_CLIP_NUM_MERGES + 1]
    while body and not body[-1].strip():
        body.pop()
    merges = []
    for lineno, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"CLIP BPE vocab file {vocab_path!r}, line {lineno}: expected a merge "
                f"'<left> <right>', got {line!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"CLIP BPE vocab file {vocab_path!r} contains no merges")
    return merges


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer, matching ``open_clip.tokenize`` exactly.

    Text is cleaned (ftfy, html unescape, whitespace collapse, lower-case),
    split with CLIP's regex, byte-encoded and BPE-merged. Rows are
    ``<start_of_text> ... <end_of_text>`` zero-padded to ``context_length``.
    Note that the pad id 0 is also the id of "!"; padding is what follows eot.
    """

    def __init__(self, vocab_path: str, context_length: int = 77, bpe_cache_size: int = 2**16):
        try:
            import regex
        except ImportError as e:  # pragma: no cover - depends on environment
            raise ImportError("ClipTokenizer needs the 'regex' package (pip install regex)") from e
        self._fix_text = import_ftfy_fix_text()
        self.context_length = check_context_length(context_length)
        self.vocab_path = str(vocab_path)

        merges = _read_clip_merges(self.vocab_path)
        self._byte_encoder = _bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        vocab = symbols + [s + _END_OF_WORD for s in symbols]
        vocab += ["".join(m) for m in merges] + [_CLIP_SOT, _CLIP_EOT]
        self._encoder = {tok: i for i, tok in enumerate(vocab)}
        self._decoder = {i: tok for tok, i in self._encoder.items()}
        self._merge_ranks = {m: i for i, m in enumerate(merges)}

        self.vocab_size = len(vocab)
        self.sot_token_id = self._encoder[_CLIP_SOT]
        self.eot_token_id = self._encoder[_CLIP_EOT]
        self.pad_token_id = 0
        self._special = {_CLIP_SOT: self.sot_token_id, _CLIP_EOT: self.eot_token_id}
        # Special tokens written literally in the text become the special ids;
        # then contractions, letter runs, single digits, other-symbol runs.
        self._pattern = regex.compile(
            rf"{_CLIP_SOT}|{_CLIP_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._bpe_cache_size = bpe_cache_size
        self._bpe = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe_uncached)

    def __getstate__(self) -> dict:
        # The per-instance cache is not picklable; grain workers get a fresh one.
        state = dict(self.__dict__)
        del state["_bpe"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe = functools.lru_cache(maxsize=self._bpe_cache_size)(self._bpe_uncached)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        """Applies merges to one byte-encoded word, lowest-ranked pair first."""
        word = (*token[:-1], token[-1] + _END_OF_WORD)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda p: self._merge_ranks.get(p, float("inf")))
            if best not in self._merge_ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = clean_text(text, self._fix_text).lower()
        ids = []
        for piece in self._pattern.findall(text):
            if piece in self._special:
                ids.append(self._special[piece])
                continue
            encoded = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[sub] for sub in self._bpe(encoded))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenizes texts into an int32 array of shape (N, context_length)."""
        rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in as_text_list(texts)]
        return pack(rows, self.context_length, self.eot_token_id)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str | list[str]:
        """Text of one id row (a 2-D array gives a list of texts).

        Everything after the first end-of-text id is treated as padding.
        Decoding is lossy: cleaning and lower-casing are not undone.
        """
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in arr]
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D or 2-D id array, got shape {arr.shape}")
        row = [int(i) for i in arr]
        if self.eot_token_id in row:
            row = row[: row.index(self.eot_token_id) + 1]
        if skip_special_tokens:
            row = [i for i in row if i not in (self.sot_token_id, self.eot_token_id)]
        unknown = [i for i in row if i not in self._decoder]
        if unknown:
            raise ValueError(f"ids out of range for a vocabulary of {self.vocab_size}: {unknown[:5]}")
        chars = "".join(self._decoder[i] for i in row)
        text = bytes(self._byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace(_END_OF_WORD, " ").strip()
