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
* :class:`SentencePieceTokenizer`: LLaMA / Vicuna / T5 SentencePiece from a ``tokenizer.model``
  (``sentencepiece``) or ``tokenizer.json``; :class:`GPT2BPETokenizer`: GPT-2 / OPT byte-level BPE.
  Both pad on their family's side, return masks (``encode_padded``) and unpadded prompt ids
  (``encode_batch``), id-for-id as transformers' tokenizers built from the same files.
* :class:`WordPieceTokenizer`: BERT's WordPiece from a ``vocab.txt`` or
  ``tokenizer.json``, id-for-id as transformers' ``BertTokenizerFast``; a small
  vocabulary for the shapes data ships with the package.

Nothing here touches the network: vocabularies are read from local files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.data.tokenizers.base import Tokenizer
from mmjax.data.tokenizers.clip_bpe import ClipTokenizer, default_clip_vocab_path
from mmjax.data.tokenizers.gpt2_bpe import GPT2BPETokenizer
from mmjax.data.tokenizers.hf import HFTokenizer
from mmjax.data.tokenizers.shapes_vocab import default_shapes_vocab_path
from mmjax.data.tokenizers.spm import SentencePieceTokenizer
from mmjax.data.tokenizers.wordpiece import WordPieceTokenizer
from mmjax.data.tokenizers.words import WordTokenizer

__all__ = ["ClipTokenizer", "GPT2BPETokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer",
           "WordPieceTokenizer", "WordTokenizer", "build_tokenizer", "default_clip_vocab_path",
           "default_shapes_vocab_path"]


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

    words = list(shapes.VOCAB)
    if spec.get("questions", False):     # the VQA-on-shapes words after the caption words (same ids for those)
        from mmjax.data import shapes_vqa

        words += shapes_vqa.vocabulary()
    return WordTokenizer(words, context_length=spec.get("context_length", 16), add_bos=spec.get("add_bos", True))


_WORDPIECE_OPTIONS = {"lowercase", "strip_accents", "tokenize_chinese_chars", "split_special_tokens", "truncate"}


def _build_wordpiece(spec: Mapping[str, Any]) -> WordPieceTokenizer:
    if "path" not in spec:
        raise ValueError(f"tokenizer spec 'wordpiece' needs 'path' (a vocab.txt or tokenizer.json), got {dict(spec)}")
    options = {k: spec[k] for k in _WORDPIECE_OPTIONS if k in spec}
    return WordPieceTokenizer(spec["path"], spec.get("context_length", 512), **options)


def _build_shapes_wordpiece(spec: Mapping[str, Any]) -> WordPieceTokenizer:
    return WordPieceTokenizer(default_shapes_vocab_path(), spec.get("context_length", 32))


_LM_OPTIONS = {"style", "add_bos", "add_eos", "padding_side", "pad_token_id", "truncate"}


def _build_sentencepiece(spec: Mapping[str, Any]) -> SentencePieceTokenizer:
    if "path" not in spec:
        raise ValueError(f"tokenizer spec 'spm' needs 'path' (a tokenizer.model or tokenizer.json), "
                         f"got {dict(spec)}")
    options = {k: spec[k] for k in (*_LM_OPTIONS, "extra_ids") if k in spec}
    return SentencePieceTokenizer(spec["path"], spec.get("context_length", 512), **options)


def _build_gpt2_bpe(spec: Mapping[str, Any]) -> GPT2BPETokenizer:
    if "path" not in spec:
        raise ValueError(f"tokenizer spec 'gpt2_bpe' needs 'path' (a directory with vocab.json + merges.txt, a "
                         f"tokenizer.json or a vocab.json), got {dict(spec)}")
    options = {k: spec[k] for k in (*_LM_OPTIONS, "merges_path") if k in spec}
    return GPT2BPETokenizer(spec["path"], spec.get("context_length", 512), **options)


# name -> (builder, keys the spec may hold besides "name")
_BUILDERS = {
    "clip": (_build_clip, {"vocab_path", "context_length"}),
    "hf": (_build_hf, {"path", "context_length", "pad_token_id", "clean"}),
    "shapes": (_build_shapes, {"context_length", "questions", "add_bos"}),
    "wordpiece": (_build_wordpiece, {"path", "context_length", *_WORDPIECE_OPTIONS}),
    "shapes_wordpiece": (_build_shapes_wordpiece, {"context_length"}),
    "spm": (_build_sentencepiece, {"path", "context_length", "extra_ids", *_LM_OPTIONS}),
    "gpt2_bpe": (_build_gpt2_bpe, {"path", "context_length", "merges_path", *_LM_OPTIONS}),
}


def build_tokenizer(spec: Mapping[str, Any]) -> Tokenizer:
    """Builds a tokenizer from a config dict such as ``{"name": "clip", "context_length": 77}``.

    Names: "clip" (vocab_path defaults to open_clip's bundled file),
    "hf" (path, context_length, optional pad_token_id/clean), "shapes"
    (word tokenizer over ``mmjax.data.shapes.VOCAB``; ``questions=True`` adds the words of the
    shapes questions and "question" / "answer"; ``add_bos=False`` starts no text with <start>), "wordpiece" (path of a
    vocab.txt / tokenizer.json, context_length 512, the normalization options of
    :class:`WordPieceTokenizer`) and "shapes_wordpiece" (the shipped shapes
    vocabulary, context_length 32), "spm" (SentencePiece: path of a tokenizer.model / tokenizer.json,
    style "llama" or "t5", context_length 512) and "gpt2_bpe" (path of a directory / tokenizer.json /
    vocab.json, style "opt" or "gpt2", context_length 512); both take add_bos, add_eos,
    padding_side, pad_token_id and truncate overrides. Unknown keys are
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
