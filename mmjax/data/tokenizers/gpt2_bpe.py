"""GPT-2's byte-level BPE as OPT uses it (BLIP-2's OPT-2.7B / 6.7B), from vocab.json + merges.txt or tokenizer.json.

Runs on ``tokenizers``. Two presets say how rows are built:

* ``"opt"``: OPT prepends ``</s>`` (id 2) as its begin-of-sequence token, appends nothing, pads on
  the right with ``<pad>`` (id 1), as transformers' ``GPT2Tokenizer`` with OPT's tokenizer_config.
* ``"gpt2"``: ``<|endoftext|>`` is BOS, EOS and pad; nothing is added unless asked.
"""

from __future__ import annotations

import json
import os

from mmjax.data.tokenizers.llm_base import LLMTokenizer

# preset -> (bos token, eos token, pad token, add_bos, add_eos, padding_side)
STYLES: dict[str, tuple[str, str, str, bool, bool, str]] = {
    "opt": ("</s>", "</s>", "<pad>", True, False, "right"),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", False, False, "right"),
}


def _read_json(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read JSON file {path!r}: {e}") from e


def _resolve_files(path: str, merges_path: str | None) -> tuple[str, str | None]:
    """(vocab.json, merges.txt) or (tokenizer.json, None) for a directory or a file path."""
    if os.path.isdir(path):
        vocab, merges, full = (os.path.join(path, n) for n in ("vocab.json", "merges.txt", "tokenizer.json"))
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return vocab, merges
        if os.path.isfile(full):
            return full, None
        raise FileNotFoundError(f"directory {path!r} has neither vocab.json + merges.txt nor tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GPT-2 BPE file {path!r} is missing: pass a directory, a tokenizer.json or a "
                                "vocab.json (with merges.txt beside it or merges_path)")
    if merges_path is None:
        data = _read_json(path)
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            return path, None   # a tokenizer.json
    merges = merges_path or os.path.join(os.path.dirname(path), "merges.txt")
    if not os.path.isfile(merges):
        raise FileNotFoundError(f"vocab file {path!r} needs its merges file, {merges!r} is missing")
    return path, merges


def _load(files: tuple[str, str | None]):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    path, merges = files
    if merges is None:
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"could not load tokenizer.json {path!r}: {e}") from e
        if not isinstance(tok.model, BPE):
            raise ValueError(f"tokenizer.json {path!r} holds a {type(tok.model).__name__} model, not BPE")
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True
        return tok
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"vocab file {path!r} must map tokens to integer ids")
    try:
        tok = Tokenizer(BPE.from_file(path, merges))
    except Exception as e:
        raise ValueError(f"could not build a BPE model from {path!r} and {merges!r}: {e}") from e
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class GPT2BPETokenizer(LLMTokenizer):
    """GPT-2 / OPT byte-level BPE; see the module docstring for the presets.

    ``path``: a directory (vocab.json + merges.txt, else tokenizer.json), a tokenizer.json, or a
    vocab.json (merges.txt beside it, or ``merges_path``). ``add_bos``, ``add_eos``,
    ``padding_side`` and ``pad_token_id`` override the preset; ``truncate=False`` refuses texts
    longer than ``context_length``.
    """

    def __init__(self, path: str, context_length: int = 512, *, style: str = "opt", merges_path: str | None = None,
                 add_bos: bool | None = None, add_eos: bool | None = None, padding_side: str | None = None,
                 pad_token_id: int | None = None, truncate: bool = True):
        if style not in STYLES:
            raise ValueError(f"unknown GPT-2 BPE style {style!r}; known styles: {sorted(STYLES)}")
        bos, eos, pad, preset_bos, preset_eos, preset_side = STYLES[style]
        self.path, self.style = str(path), style
        self._files = _resolve_files(self.path, merges_path)
        self._tok = _load(self._files)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.eos_token_id = self._tok.token_to_id(bos), self._tok.token_to_id(eos)
        if pad_token_id is None:
            pad_token_id = self._tok.token_to_id(pad)
            if pad_token_id is None:
                raise ValueError(f"style {style!r} pads with {pad!r}, which {self.path!r} lacks: pass pad_token_id")
        self._setup(context_length, add_bos=preset_bos if add_bos is None else add_bos,
                    add_eos=preset_eos if add_eos is None else add_eos,
                    padding_side=preset_side if padding_side is None else padding_side,
                    pad_token_id=pad_token_id, truncate=truncate)

    def __setstate__(self, state: dict) -> None:
        # The library's pickle (its JSON) drops encode_special_tokens.
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
