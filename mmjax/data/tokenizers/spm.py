"""SentencePiece tokenizers of LLaMA / Vicuna and T5 / Flan-T5, from a ``tokenizer.model`` or a ``tokenizer.json``.

A ``.model`` file is run by the ``sentencepiece`` package itself (the format's own implementation,
so ids are the ones the original models were trained with); a ``tokenizer.json`` (Hugging Face's
conversion of such a model) is run by ``tokenizers``. Two presets say how rows are built:

* ``"llama"``: ``<s>`` prepended, no ``</s>`` (``add_eos=True`` for training targets), left padding
  as transformers' ``LlamaTokenizer``; LLaMA has no pad token, so rows are padded with id 0
  (``<unk>``, the ``pad_token_id`` of LLaMA's HF configs) and :meth:`encode_padded`'s mask tells.
* ``"t5"``: no BOS, ``</s>`` appended, right padding with ``<pad>`` (id 0); the 100 sentinel ids
  ``<extra_id_99> .. <extra_id_0>`` follow the SentencePiece vocabulary, as transformers adds them.
"""

from __future__ import annotations

import os
from typing import Any

from mmjax.data.tokenizers.llm_base import LLMTokenizer

# preset -> (add_bos, add_eos, padding_side, extra_ids for a .model file)
STYLES: dict[str, tuple[bool, bool, str, int]] = {
    "llama": (True, False, "left", 0),
    "t5": (False, True, "right", 100),
}


def _import_sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError("a SentencePiece tokenizer.model needs the 'sentencepiece' package (pip install "
                          "sentencepiece); a tokenizer.json needs only 'tokenizers'") from e
    return sentencepiece


class _ModelFile:
    """A ``tokenizer.model`` through ``sentencepiece``, with T5's sentinel ids after its vocabulary."""

    def __init__(self, path: str, extra_ids: int):
        spm = _import_sentencepiece()
        with open(path, "rb") as f:
            self._proto = f.read()
        self._sp = self._load(spm, path)
        self.base_size = self._sp.get_piece_size()
        self.extra_ids = extra_ids
        self.vocab_size = self.base_size + extra_ids

        def known(i: int) -> int | None:
            return None if i < 0 else i
        self.bos, self.eos = known(self._sp.bos_id()), known(self._sp.eos_id())
        self.pad, self.unk = known(self._sp.pad_id()), known(self._sp.unk_id())

    def _load(self, spm: Any, path: str) -> Any:
        try:
            return spm.SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, TypeError, OSError) as e:
            raise ValueError(f"{path!r} is not a SentencePiece model: {e}") from e

    def __getstate__(self) -> dict:
        # grain workers pickle the tokenizer: ship the model bytes, rebuild the processor there.
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sp = _import_sentencepiece().SentencePieceProcessor(model_proto=self._proto)

    def sentinel_ids(self) -> list[int]:
        return list(range(self.base_size, self.vocab_size))

    def sentinel_id(self, index: int) -> int | None:
        return self.vocab_size - 1 - index if 0 <= index < self.extra_ids else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """sentencepiece decodes runs of its own ids; sentinels (ids past it) are written by name."""
        parts, run = [], []
        for i in [*ids, None]:
            if i is not None and i < self.base_size:
                run.append(i)
                continue
            text = self._sp.decode(run)
            # sentencepiece drops the word-start "▁" of a text's first piece; only the first run is a text's start.
            if parts and run and self._sp.id_to_piece(run[0]).startswith("\u2581"):
                text = " " + text
            parts.append(text)
            run = []
            if i is not None and not skip_special_tokens:
                parts.append(f"<extra_id_{self.vocab_size - 1 - i}>")
        return "".join(parts)


class _JsonFile:
    """A ``tokenizer.json`` through ``tokenizers``; its own post-processing, truncation and padding off."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"could not load tokenizer.json {path!r}: {e}") from e
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = True   # "<s>" in the text is text, as sentencepiece reads it
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos, self.eos = self._tok.token_to_id("<s>"), self._tok.token_to_id("</s>")
        self.pad, self.unk = self._tok.token_to_id("<pad>"), self._tok.token_to_id("<unk>")

    def __setstate__(self, state: dict) -> None:
        # The library's pickle (its JSON) drops encode_special_tokens.
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    def sentinel_ids(self) -> list[int]:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return sorted(i for t, i in vocab.items() if t.startswith("<extra_id_") and t.endswith(">"))

    def sentinel_id(self, index: int) -> int | None:
        return self._tok.token_to_id(f"<extra_id_{index}>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(LLMTokenizer):
    """LLaMA / Vicuna / T5 SentencePiece tokenizer; see the module docstring for the presets.

    ``path``: a ``tokenizer.model`` / ``spiece.model`` or a ``tokenizer.json``. ``add_bos``,
    ``add_eos``, ``padding_side``, ``pad_token_id`` and (``.model`` only) ``extra_ids`` override the
    preset; ``truncate=False`` refuses texts longer than ``context_length`` instead of cutting them.
    """

    def __init__(self, path: str, context_length: int = 512, *, style: str = "llama", add_bos: bool | None = None,
                 add_eos: bool | None = None, padding_side: str | None = None, pad_token_id: int | None = None,
                 extra_ids: int | None = None, truncate: bool = True):
        if style not in STYLES:
            raise ValueError(f"unknown SentencePiece style {style!r}; known styles: {sorted(STYLES)}")
        preset_bos, preset_eos, preset_side, preset_extra = STYLES[style]
        self.path, self.style = str(path), style
        if not os.path.isfile(self.path):
            kind = "a directory" if os.path.isdir(self.path) else "missing"
            raise FileNotFoundError(f"SentencePiece file {self.path!r} is {kind}: pass a tokenizer.model or "
                                    "tokenizer.json")
        if self.path.endswith(".json"):
            if extra_ids is not None:
                raise ValueError(f"extra_ids applies to a .model file; tokenizer.json {self.path!r} lists its own "
                                 "sentinel tokens")
            self._file: _ModelFile | _JsonFile = _JsonFile(self.path)
        else:
            extra = preset_extra if extra_ids is None else extra_ids
            if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
                raise ValueError(f"extra_ids must be an int >= 0, got {extra!r}")
            self._file = _ModelFile(self.path, extra)
        f = self._file
        self.vocab_size = f.vocab_size
        self.bos_token_id, self.eos_token_id, self.unk_token_id = f.bos, f.eos, f.unk
        if pad_token_id is None:   # the file's pad token, else LLaMA's convention (0, <unk>)
            pad_token_id = f.pad if f.pad is not None else 0
        self._setup(context_length, add_bos=preset_bos if add_bos is None else add_bos,
                    add_eos=preset_eos if add_eos is None else add_eos,
                    padding_side=preset_side if padding_side is None else padding_side,
                    pad_token_id=pad_token_id, truncate=truncate,
                    extra_special_ids=[i for i in (f.unk,) if i is not None] + f.sentinel_ids())

    def sentinel_token_id(self, index: int) -> int:
        """Id of T5's ``<extra_id_{index}>`` (span-corruption sentinels count down from the vocabulary's end)."""
        found = self._file.sentinel_id(index)
        if found is None:
            raise ValueError(f"no <extra_id_{index}>: this vocabulary has {len(self._file.sentinel_ids())} "
                             "sentinel tokens")
        return found

    def _encode_text(self, text: str) -> list[int]:
        return self._file.encode(text)

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._file.decode(ids, skip_special_tokens)
