"""Text tokenizers that turn captions into fixed-length int32 id arrays.

Every tokenizer here shares one interface (see :class:`Tokenizer`): calling it
on a string or a list of strings returns a numpy ``int32`` array of shape
``(N, context_length)``, and it exposes ``vocab_size``, ``context_length`` and
``eot_token_id``. Models pool text features at the end-of-text token, so each
tokenizer says which id that is.

* :class:`ClipTokenizer`: OpenAI CLIP's byte-level BPE, id-for-id identical to
  ``open_clip.tokenize`` (needs ``ftfy`` and ``regex``).
* :class:`HFTokenizer`: any Hugging Face ``tokenizer.json`` via ``tokenizers``.
* :class:`WordTokenizer`: a tiny closed-vocabulary word tokenizer for the
  embedded synthetic data set.

Nothing here touches the network: vocabularies are read from local files.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

# CLIP's vocabulary: 256 byte symbols, the same 256 with the end-of-word
# marker, 48894 merges and two special tokens = 49408 ids.
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_SOT = "<start_of_text>"
_CLIP_EOT = "<end_of_text>"
_END_OF_WORD = "</w>"


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer in this module provides."""

    vocab_size: int
    context_length: int
    eot_token_id: int | None

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray: ...


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
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


def _check_context_length(context_length: int) -> int:
    """Needs room for at least a start and an end token."""
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    return int(context_length)


def _pack(rows: list[list[int]], context_length: int, eot_token_id: int) -> np.ndarray:
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


def _clean_text(text: str, fix_text: Any) -> str:
    """open_clip's 'basic' + whitespace cleaning: ftfy, double html unescape, collapse spaces."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split())


def _import_ftfy_fix_text() -> Any:
    """ftfy.fix_text, imported lazily so the word tokenizer works without ftfy."""
    try:
        import ftfy
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError("text cleaning needs the 'ftfy' package (pip install ftfy)") from e
    return ftfy.fix_text


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
        self._fix_text = _import_ftfy_fix_text()
        self.context_length = _check_context_length(context_length)
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
        text = _clean_text(text, self._fix_text).lower()
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
        rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in _as_text_list(texts)]
        return _pack(rows, self.context_length, self.eot_token_id)

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

        self.context_length = _check_context_length(context_length)
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
        self._fix_text = _import_ftfy_fix_text() if clean else None

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
        texts = _as_text_list(texts)
        if self._fix_text is not None:
            texts = [_clean_text(t, self._fix_text) for t in texts]
        out = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int32)
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            out[i, : len(enc.ids)] = enc.ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of one id row, via the library's decoder."""
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=skip_special_tokens)


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

    def __init__(self, vocab: Sequence[str], context_length: int = 16):
        if isinstance(vocab, str):
            raise TypeError("vocab must be a sequence of words, not a single str")
        self.context_length = _check_context_length(context_length)
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
        rows = [[self.sot_token_id, *self.encode(t), self.eot_token_id] for t in _as_text_list(texts)]
        return _pack(rows, self.context_length, self.eot_token_id)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Space-joined words of one id row; stops at the first end-of-text id."""
        words = []
        for i in np.asarray(ids).ravel():
            i = int(i)
            if i == self.eot_token_id:
                if not skip_special_tokens:
                    words.append(self.EOT)
                break
            if skip_special_tokens and i in (self.pad_token_id, self.sot_token_id):
                continue
            words.append(self._decoder[i])
        return " ".join(words)


def _build_clip(spec: Mapping[str, Any]) -> ClipTokenizer:
    path = spec.get("vocab_path") or default_clip_vocab_path()
    return ClipTokenizer(path, context_length=spec.get("context_length", 77))


def _build_hf(spec: Mapping[str, Any]) -> HFTokenizer:
    for key in ("path", "context_length"):
        if key not in spec:
            raise ValueError(f"tokenizer spec 'hf' needs {key!r}, got {dict(spec)}")
    return HFTokenizer(spec["path"], spec["context_length"], spec.get("pad_token_id"),
                       clean=spec.get("clean", False))


def _build_shapes(spec: Mapping[str, Any]) -> WordTokenizer:
    from mmjax.data import shapes  # lazy: only this tokenizer needs the data set

    return WordTokenizer(shapes.VOCAB, context_length=spec.get("context_length", 16))


# name -> (builder, keys the spec may hold besides "name")
_BUILDERS = {
    "clip": (_build_clip, {"vocab_path", "context_length"}),
    "hf": (_build_hf, {"path", "context_length", "pad_token_id", "clean"}),
    "shapes": (_build_shapes, {"context_length"}),
}


def build_tokenizer(spec: Mapping[str, Any]) -> Tokenizer:
    """Builds a tokenizer from a config dict such as ``{"name": "clip", "context_length": 77}``.

    Names: "clip" (vocab_path defaults to open_clip's bundled file),
    "hf" (path, context_length, optional pad_token_id/clean) and "shapes"
    (word tokenizer over ``mmjax.data.shapes.VOCAB``). Unknown keys are
    rejected so that typos in configs fail loudly.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"tokenizer spec must be a mapping, got {type(spec).__name__}")
    name = spec.get("name")
    if name not in _BUILDERS:
        raise ValueError(f"unknown tokenizer name {name!r}; known names: {sorted(_BUILDERS)}")
    builder, allowed = _BUILDERS[name]
    extra = set(spec) - allowed - {"name"}
    if extra:
        raise ValueError(f"tokenizer spec {name!r} got unknown keys {sorted(extra)}; allowed: {sorted(allowed)}")
    return builder(spec)
