"""LLM tokenizers (LLaMA / T5 SentencePiece, OPT's GPT-2 BPE) against transformers' tokenizers built
from the same files. The files are trained here, offline: a SentencePiece BPE with LLaMA's settings
(byte fallback, split digits, no normalization), a SentencePiece unigram with T5's (NFKC, pad 0,
eos 1, unk 2) and a byte-level BPE with OPT's special tokens first."""

import pickle
import random

import numpy as np
import pytest
from references import require

from mmjax.data.tokenizers import GPT2BPETokenizer, SentencePieceTokenizer, build_tokenizer

LENGTH = 24
TEXTS = [
    "a red circle at the top left of the image.",
    "",
    "Ünïcödé façade — naïve café 東京 😀 «quotes» ‘single’ x²",
    "punctuation!?;:()[]{} and $1,234.56 or 3.14159",
    "tabs\tand\nnewlines, double  spaces and a trailing space ",
    "literal specials: <s> </s> <pad> <unk> <extra_id_0>",
    "a long caption " + " ".join(f"word{i}" for i in range(60)),   # truncated at LENGTH
]
# transformers' LLaMA conversion (tokenizers' Metaspace) drops sentencepiece's dummy prefix when the
# text already starts with a space, so the two disagree there; the .model files are read by
# sentencepiece itself (the ids LLaMA was trained with) and compared on the other texts only.
LEADING_SPACE = ["  two leading spaces", " one leading space", "\tleading tab"]
# Special tokens written in a text are text for mmjax (and for sentencepiece); transformers' T5
# tokenizer turns "</s>", "<pad>", "<extra_id_0>" into their ids even with split_special_tokens.
T5_TEXTS = [t for t in TEXTS if "<s>" not in t] + LEADING_SPACE


def _corpus() -> list[str]:
    rng = random.Random(0)
    colours, shapes = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle", "star"]
    words = ["tiny", "large", "shiny", "striped", "rotated", "hollow", "filled", "bright", "pale", "the", "of"]
    lines = [f"a {rng.choice(colours)} {rng.choice(shapes)} at the {rng.choice(['top', 'bottom', 'left'])} "
             f"of the image, size {rng.randint(1, 99)}." for _ in range(300)]
    lines += [" ".join(rng.choice(words + colours + shapes) for _ in range(rng.randint(3, 12))).capitalize()
              + rng.choice(".!?;") for _ in range(300)]
    return lines + ["Ünïcödé façade — naïve café «quotes» (brackets) [and] {braces}: 1,234.56!"] * 5


@pytest.fixture(scope="module")
def files(module_tmp):
    """{"llama": dir with tokenizer.model, "t5": dir with spiece.model, "opt": dir with vocab.json + merges.txt}."""
    spm = require("sentencepiece")
    tokenizers = require("tokenizers")
    root, corpus = module_tmp("llm_tokenizers"), _corpus()
    out = {name: root / name for name in ("llama", "t5", "opt")}
    for d in out.values():
        d.mkdir()
    common = dict(character_coverage=0.995, minloglevel=2, num_threads=1)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(out["llama"] / "tokenizer"), model_type="bpe",
        vocab_size=400, normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, **common)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(out["t5"] / "spiece"), model_type="unigram",
        vocab_size=150, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, **common)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(out["opt"]))
    return out


@pytest.fixture(scope="module")
def hf(files, module_tmp):
    """transformers' tokenizers from those files (LLaMA, T5, OPT settings) and the tokenizer.json each saves."""
    transformers = require("transformers")
    refs = {
        "llama": transformers.LlamaTokenizer.from_pretrained(files["llama"], add_bos_token=True, pad_token="<unk>"),
        "llama_eos": transformers.LlamaTokenizer.from_pretrained(files["llama"], add_bos_token=True,
                                                                 add_eos_token=True, pad_token="<unk>"),
        "t5": transformers.T5Tokenizer.from_pretrained(files["t5"]),
        # OPT's tokenizer_config: </s> is BOS, EOS and UNK; <pad> pads; no prefix space.
        "opt": transformers.GPT2Tokenizer.from_pretrained(
            files["opt"], add_bos_token=True, bos_token="</s>", eos_token="</s>", unk_token="</s>",
            pad_token="<pad>", add_prefix_space=False),
    }
    saved = {}
    for name in ("llama", "t5", "opt"):
        saved[name] = module_tmp(f"{name}_json")
        refs[name].save_pretrained(saved[name])
        saved[name] = str(saved[name] / "tokenizer.json")
    return refs, saved


def _reference(tok, texts, length=LENGTH):
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, split_special_tokens=True)
    return np.array(enc["input_ids"]), np.array(enc["attention_mask"], dtype=bool)


def _assert_same(ours, ref, texts):
    ids, mask = ours.encode_padded(texts)
    ref_ids, ref_mask = _reference(ref, texts)
    assert ours.padding_side == ref.padding_side
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(ours(texts), ids)
    unpadded = ref(texts, split_special_tokens=True)["input_ids"]
    assert ours.encode_batch(texts) == unpadded
    return ids, mask


def test_llama_model_file_matches_transformers(files, hf):
    refs, _ = hf
    ours = SentencePieceTokenizer(str(files["llama"] / "tokenizer.model"), LENGTH, style="llama")
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (len(refs["llama"]), 1, 2, 0)
    ids, mask = _assert_same(ours, refs["llama"], TEXTS)
    assert ids[0, -1] != 0 and ids[1, -1] == 1 and not mask[1, :-1].any()   # left padded, BOS kept
    assert ours.decode(ids, mask=mask) == refs["llama"].batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[0], mask=mask[0]) == TEXTS[0]   # byte fallback: lossless

    with_eos = SentencePieceTokenizer(str(files["llama"] / "tokenizer.model"), LENGTH, add_eos=True)
    ids, _ = _assert_same(with_eos, refs["llama_eos"], TEXTS)
    assert ids[-1, 0] == 1 and ids[-1, -1] == 2   # the long text is cut keeping BOS and EOS


def test_t5_model_file_matches_transformers(files, hf):
    refs, _ = hf
    ref = refs["t5"]
    ours = SentencePieceTokenizer(str(files["t5"] / "spiece.model"), LENGTH, style="t5")
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (len(ref), None, 1, 0)
    for index in (0, 1, 99):
        assert ours.sentinel_token_id(index) == ref.convert_tokens_to_ids(f"<extra_id_{index}>")
    ids, mask = _assert_same(ours, ref, T5_TEXTS)
    assert ours.decode(ids, mask=mask) == ref.batch_decode(ids, skip_special_tokens=True)
    sentinel_row = [*ids[0, :3], ours.sentinel_token_id(0), *ids[0, 3:5]]
    assert ours.decode(sentinel_row, skip_special_tokens=False) == ref.decode(sentinel_row)


def test_tokenizer_json_files_match_transformers(hf):
    """tokenizer.json (as transformers saves it) through `tokenizers`: same ids, leading spaces included."""
    refs, saved = hf
    for name, ours in [("llama", SentencePieceTokenizer(saved["llama"], LENGTH, style="llama")),
                       ("t5", SentencePieceTokenizer(saved["t5"], LENGTH, style="t5")),
                       ("opt", GPT2BPETokenizer(saved["opt"], LENGTH, style="opt"))]:
        assert ours.vocab_size == len(refs[name]), name
        ids, mask = _assert_same(ours, refs[name], T5_TEXTS if name == "t5" else TEXTS + LEADING_SPACE)
        assert ours.decode(ids, mask=mask) == refs[name].batch_decode(ids, skip_special_tokens=True), name
    t5 = SentencePieceTokenizer(saved["t5"], LENGTH, style="t5")
    assert t5.sentinel_token_id(5) == refs["t5"].convert_tokens_to_ids("<extra_id_5>")


def test_opt_bpe_matches_transformers(files, hf):
    refs, _ = hf
    ref = refs["opt"]
    vocab, merges = str(files["opt"] / "vocab.json"), str(files["opt"] / "merges.txt")
    for ours in (GPT2BPETokenizer(str(files["opt"]), LENGTH), GPT2BPETokenizer(vocab, LENGTH, merges_path=merges)):
        assert (ours.vocab_size, ours.bos_token_id, ours.pad_token_id) == (len(ref), 2, 1)
        ids, mask = _assert_same(ours, ref, TEXTS + LEADING_SPACE)
        assert (ids[:, 0] == 2).all() and ids[1, 1] == 1   # OPT's </s> as BOS, right padding
        assert ours.decode(ids, mask=mask) == ref.batch_decode(ids, skip_special_tokens=True)
        assert ours.decode(ours.encode_batch(TEXTS[2])[0]) == TEXTS[2]   # byte-level: lossless


def test_specs_errors_and_pickling(files, tmp_path):
    model = str(files["llama"] / "tokenizer.model")
    tok = build_tokenizer({"name": "spm", "path": model, "context_length": 8, "padding_side": "right"})
    assert isinstance(tok, SentencePieceTokenizer) and tok(["a red circle"])[0, 0] == 1 and tok(["a"])[0, -1] == 0
    opt = build_tokenizer({"name": "gpt2_bpe", "path": str(files["opt"]), "context_length": 8, "add_eos": True})
    assert isinstance(opt, GPT2BPETokenizer) and opt.encode_batch("a")[0][-1] == 2

    t5 = SentencePieceTokenizer(str(files["t5"] / "spiece.model"), 8, style="t5")
    for original in (tok, opt, t5):   # grain workers pickle tokenizers
        copy = pickle.loads(pickle.dumps(original))
        np.testing.assert_array_equal(copy(TEXTS), original(TEXTS))

    with pytest.raises(ValueError, match="unknown keys.*'add_boss'"):
        build_tokenizer({"name": "spm", "path": model, "add_boss": True})
    with pytest.raises(ValueError, match="needs 'path'"):
        build_tokenizer({"name": "gpt2_bpe"})
    with pytest.raises(ValueError, match="unknown SentencePiece style 'gpt'"):
        SentencePieceTokenizer(model, style="gpt")
    with pytest.raises(FileNotFoundError, match="missing"):
        SentencePieceTokenizer(str(tmp_path / "tokenizer.model"))
    with pytest.raises(FileNotFoundError, match="neither vocab.json"):
        GPT2BPETokenizer(str(tmp_path))
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        GPT2BPETokenizer(str(tmp_path / "vocab.json"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(str(tmp_path / "bad.model"))
    with pytest.raises(ValueError, match="no begin-of-sequence"):
        SentencePieceTokenizer(str(files["t5"] / "spiece.model"), style="t5", add_bos=True)
    with pytest.raises(ValueError, match="padding_side"):
        SentencePieceTokenizer(model, padding_side="center")
    with pytest.raises(ValueError, match="truncate=False"):
        SentencePieceTokenizer(model, 8, truncate=False)(TEXTS[-1])
