"""BERT's WordPiece tokenizer through the ``tokenizers`` library, id-for-id as transformers'
``BertTokenizerFast`` built from the same file.

Rows are ``[CLS] text [SEP]`` padded with [PAD] to ``context_length``; a text that does not
fit is cut so that [SEP] stays the last token (or refused with ``truncate=False``). BERT-style
models pool at [CLS] (position 0, the text tower's ``pool="first"``) and attend where
``padding_mask(ids)`` is true, i.e. ``ids != pad_token_id``: by default special tokens written
literally in the text ("[PAD]", "[MASK]") are split like any other text, so [PAD] only ever
marks padding and [MASK] only ever comes from MLM masking.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mmjax.data.tokenizers.base import as_text_list, check_context_length

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab_file(path: str) -> dict[str, int]:
    """A BERT ``vocab.txt`` (one token a line, the id is the line number) as token -> id.

    Stricter than BERT's own reader, which silently keeps the last of duplicate lines and
    makes "\\r" part of tokens: blank lines, whitespace inside a token and duplicates are errors.
    """
    if not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "missing"
        raise FileNotFoundError(f"WordPiece vocabulary file {path!r} is {kind}: pass a vocab.txt or tokenizer.json")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"WordPiece vocab file {path!r} is not UTF-8 text: {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()   # the file's final newline
    if not lines:
        raise ValueError(f"WordPiece vocab file {path!r} is empty")
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        if not token or token != "".join(token.split()):
            raise ValueError(f"WordPiece vocab file {path!r}, line {index + 1}: expected one token without "
                             f"whitespace, got {token!r}")
        if token in vocab:
            raise ValueError(f"WordPiece vocab file {path!r}, line {index + 1}: token {token!r} already on "
                             f"line {vocab[token] + 1}")
        vocab[token] = index
    return vocab


def _check_specials(path: str, vocab: dict[str, int]) -> None:
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"WordPiece vocabulary {path!r} lacks the special tokens {missing}; BERT-style "
                         f"models need all of {list(SPECIAL_TOKENS)}")


def _build_from_vocab(vocab: dict[str, int], lowercase: bool, strip_accents: bool | None,
                      tokenize_chinese_chars: bool):
    """BertTokenizerFast's pipeline: BERT normalizer, BERT pre-tokenizer, WordPiece, ## decoder."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents,
        lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _load_tokenizer_json(path: str):
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"could not load tokenizer.json {path!r}: {e}") from e
    if not isinstance(tok.model, WordPiece):
        raise ValueError(f"tokenizer.json {path!r} holds a {type(tok.model).__name__} model, not WordPiece")
    tok.no_truncation()
    tok.no_padding()
    return tok


class WordPieceTokenizer:
    """BERT WordPiece tokenizer from a ``vocab.txt`` or a WordPiece ``tokenizer.json``.

    For a vocab.txt, ``lowercase`` (default True), ``strip_accents`` (default: as lowercase)
    and ``tokenize_chinese_chars`` (default True) configure normalization as bert-base-uncased
    does; pass ``lowercase=False`` for cased vocabularies. A tokenizer.json carries its own
    normalization, so these must be left at None for it.
    """

    def __init__(self, path: str, context_length: int = 512, *, lowercase: bool | None = None,
                 strip_accents: bool | None = None, tokenize_chinese_chars: bool | None = None,
                 split_special_tokens: bool = True, truncate: bool = True):
        from tokenizers import AddedToken, processors

        self.path = str(path)
        self.context_length = check_context_length(context_length)
        self.truncate = bool(truncate)
        if self.path.endswith(".json"):
            given = {k: v for k, v in [("lowercase", lowercase), ("strip_accents", strip_accents),
                                       ("tokenize_chinese_chars", tokenize_chinese_chars)] if v is not None}
            if given:
                raise ValueError(f"tokenizer.json {self.path!r} defines its own normalization; options {given} "
                                 "apply to a vocab.txt only")
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"tokenizer.json not found: {self.path!r}")
            self._tok = _load_tokenizer_json(self.path)
            vocab = self._tok.get_vocab(with_added_tokens=True)
        else:
            vocab = read_vocab_file(self.path)
            self._tok = _build_from_vocab(vocab, True if lowercase is None else lowercase, strip_accents,
                                          True if tokenize_chinese_chars is None else tokenize_chinese_chars)
        _check_specials(self.path, vocab)
        # Registered as special so that decode(skip_special_tokens) drops them; matched in the
        # raw text (not after lower-casing) exactly as transformers registers them.
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        self.split_special_tokens = bool(split_special_tokens)
        self._tok.encode_special_tokens = self.split_special_tokens

        ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.pad_token_id, self.unk_token_id = ids["[PAD]"], ids["[UNK]"]
        self.cls_token_id, self.sep_token_id, self.mask_token_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]
        self.sot_token_id = self.cls_token_id
        self.eot_token_id = self.sep_token_id   # where the text ends; BERT pools at [CLS] (position 0)
        self.special_token_ids: tuple[int, ...] = tuple(sorted(ids.values()))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if sorted(vocab.values()) != list(range(self.vocab_size)):
            raise ValueError(f"WordPiece vocabulary {self.path!r} does not number its tokens 0..{self.vocab_size - 1}")

        self._tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_token_id), ("[SEP]", self.sep_token_id)])
        if self.truncate:
            self._tok.enable_truncation(max_length=self.context_length)   # counts [CLS]/[SEP]: keeps [SEP]

        # (vocab_size,) bool: which ids are "##" word-continuation pieces (for whole-word masking).
        prefix = self._tok.model.continuing_subword_prefix
        tokens = sorted(vocab, key=vocab.get)
        self.is_continuation = np.array([t.startswith(prefix) for t in tokens], dtype=bool)

    def __setstate__(self, state: dict) -> None:
        # The library's pickle (its JSON) drops encode_special_tokens; grain workers need it back.
        self.__dict__.update(state)
        self._tok.encode_special_tokens = self.split_special_tokens

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenizes texts into an int32 array of shape (N, context_length)."""
        texts = as_text_list(texts)
        out = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int32)
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            if len(enc.ids) > self.context_length:
                raise ValueError(
                    f"text {i} has {len(enc.ids)} tokens with [CLS]/[SEP], more than context_length "
                    f"{self.context_length} (truncate=False): {texts[i][:80]!r}")
            out[i, : len(enc.ids)] = enc.ids
        return out

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS]/[SEP] and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokens(self, text: str) -> list[str]:
        """WordPiece strings of one text (without [CLS]/[SEP]), e.g. ["circle", "##s"]."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).tokens

    def padding_mask(self, ids: np.ndarray) -> np.ndarray:
        """True where a BERT-style model attends (every token that is not [PAD])."""
        return np.asarray(ids) != self.pad_token_id

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str | list[str]:
        """Text of one id row (a 2-D array gives a list); lossy: lower-casing is not undone."""
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in arr]
        if arr.ndim != 1:
            raise ValueError(f"decode expects a 1-D or 2-D id array, got shape {arr.shape}")
        bad = [int(i) for i in arr if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range for a vocabulary of {self.vocab_size}: {bad[:5]}")
        return self._tok.decode([int(i) for i in arr], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer({self.path!r}, context_length={self.context_length})"
