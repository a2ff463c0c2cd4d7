"""Tests for mmjax.data.tokenizers: CLIP parity with open_clip, HF wrapper, word tokenizer."""

import os
import random

import numpy as np
import pytest
from references import INSTALL, require

from mmjax.data.tokenizers import (
    ClipTokenizer,
    HFTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    default_clip_vocab_path,
)

CLIP_TEXTS = [
    "a photo of a cat",
    "A Photo Of A DOG.",
    "Hello, world!!! ... ?!?! --- ((nested)) [brackets] {braces}",
    "it's a dog's life; they're here, we've won, I'm sure, you'll see, he'd go, don't",
    "IT'S LOUD AND DON'T",
    "it’s curly ‘quoted’ “text”",
    "it'ſ a long s",
    "1234567890 3.14159 1,000,000 2nd 42nd ²³ ½",
    "café naïve résumé Ångström façade Øresund",
    "İstanbul ǅemal ß straße",
    "日本語のテキスト 中文文本 한국어",
    "emoji 😀🐱👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "fish &amp; chips &lt;b&gt; &amp;amp; &quot;q&quot; &#39;s &eacute;",
    "tabs\tand\nnewlines\r\n  and   many    spaces \u00a0nbsp\u2003em ",
    "",
    "   ",
    "<start_of_text> literal special <end_of_text> tokens <START_OF_TEXT>",
    "mojibake: Ã©tÃ© and â€œquotesâ€\x9d",
    "under_score snake_case and CamelCaseWords and hyphen-ated",
    "zero\u200bwidth and combining e\u0301 accents",
    "a very long caption " + " ".join(f"word{i} with some filler, punctuation!" for i in range(60)),
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
]


@pytest.fixture(scope="module")
def open_clip_tokenize():
    """open_clip's reference tokenize (module scope: importing torch is slow)."""
    return require("open_clip").tokenize


@pytest.fixture(scope="module")
def clip_vocab_path() -> str:
    try:   # the vocab file that open_clip ships; found without importing it (and torch)
        path = default_clip_vocab_path()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. open_clip_torch is in the test extra: run `{INSTALL}`") from e
    assert os.path.isfile(path), f"open_clip's BPE vocab is missing at {path}: run `{INSTALL}`"
    return path


@pytest.fixture(scope="module")
def clip_tok(clip_vocab_path) -> ClipTokenizer:
    return ClipTokenizer(clip_vocab_path)


# ---------------------------------------------------------------- ClipTokenizer


def test_clip_matches_open_clip_batch(clip_tok, open_clip_tokenize):
    ours = clip_tok(CLIP_TEXTS)
    ref = open_clip_tokenize(CLIP_TEXTS).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(CLIP_TEXTS), 77)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("text", CLIP_TEXTS, ids=range(len(CLIP_TEXTS)))
def test_clip_matches_open_clip_per_text(clip_tok, open_clip_tokenize, text):
    np.testing.assert_array_equal(clip_tok(text), open_clip_tokenize([text]).numpy())


@pytest.mark.parametrize("context_length", [2, 5, 16, 77, 128])
def test_clip_context_lengths_match(clip_vocab_path, open_clip_tokenize, context_length):
    tok = ClipTokenizer(clip_vocab_path, context_length=context_length)
    np.testing.assert_array_equal(tok(CLIP_TEXTS), open_clip_tokenize(CLIP_TEXTS, context_length).numpy())


def test_clip_matches_open_clip_random_unicode(clip_tok, open_clip_tokenize):
    """Seeded fuzz over ASCII, Latin, combining marks, kana, CJK, emoji and odd spaces."""
    rng = random.Random(0)
    pools = [range(32, 127), range(0xA0, 0x250), range(0x300, 0x370), range(0x3040, 0x30FF),
             range(0x4E00, 0x4E80), range(0x1F300, 0x1F650), [9, 10, 13, 0x200B, 0x200D, 0x2019]]
    texts = ["".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 60)))
             for _ in range(300)]
    np.testing.assert_array_equal(clip_tok(texts), open_clip_tokenize(texts).numpy())


def test_clip_truncation_keeps_prefix_and_forces_eot(clip_tok):
    long_text = CLIP_TEXTS[-2]
    full = clip_tok.encode(long_text)
    assert len(full) > 77
    row = clip_tok(long_text)[0]
    assert row[0] == clip_tok.sot_token_id
    np.testing.assert_array_equal(row[1:76], full[:75])
    assert row[76] == clip_tok.eot_token_id


def test_clip_special_ids_and_padding(clip_tok):
    assert clip_tok.vocab_size == 49408
    assert (clip_tok.sot_token_id, clip_tok.eot_token_id, clip_tok.pad_token_id) == (49406, 49407, 0)
    row = clip_tok("a cat")[0]
    assert row[0] == clip_tok.sot_token_id
    end = int(np.argmax(row))  # CLIP pools at argmax id, which must be eot
    assert row[end] == clip_tok.eot_token_id
    assert not row[end + 1:].any()
    assert isinstance(clip_tok, Tokenizer)


def test_clip_empty_inputs(clip_tok):
    assert clip_tok([]).shape == (0, 77)
    np.testing.assert_array_equal(clip_tok("")[0, :3], [clip_tok.sot_token_id, clip_tok.eot_token_id, 0])


@pytest.mark.parametrize("text", ["a photo of a cat", "two dogs, playing fetch!", "it's 3 o'clock"])
def test_clip_decode_round_trip(clip_tok, text):
    assert clip_tok.decode(clip_tok(text)[0]) == clip_tok.decode(clip_tok.encode(text))
    assert clip_tok.decode(clip_tok(text)[0]).replace(" ", "") == text.replace(" ", "")


def test_clip_decode_simple_exact(clip_tok):
    assert clip_tok.decode(clip_tok("A photo of a cat")[0]) == "a photo of a cat"
    assert clip_tok.decode(clip_tok(["a red circle", "blue"])) == ["a red circle", "blue"]
    with_special = clip_tok.decode(clip_tok("a cat")[0], skip_special_tokens=False)
    assert with_special == "<start_of_text>a cat <end_of_text>"


def test_clip_missing_vocab_file(tmp_path):
    missing = tmp_path / "nope" / "bpe.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope"):
        ClipTokenizer(str(missing))


def test_clip_invalid_vocab_files(tmp_path):
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="plain.txt.gz"):
        ClipTokenizer(str(not_gzip))

    import gzip

    bad_line = tmp_path / "bad.txt.gz"
    with gzip.open(bad_line, "wt") as f:
        f.write("#version: 0.2\ni n\nthree parts here\n")
    with pytest.raises(ValueError, match="bad.txt.gz"):
        ClipTokenizer(str(bad_line))

    empty = tmp_path / "empty.txt.gz"
    with gzip.open(empty, "wt") as f:
        f.write("#version: 0.2\n")
    with pytest.raises(ValueError, match="no merges"):
        ClipTokenizer(str(empty))


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", 5], [b"x"], {"a": 1}])
def test_clip_rejects_non_strings(clip_tok, bad):
    with pytest.raises(TypeError):
        clip_tok(bad)


def test_clip_bad_context_length(clip_vocab_path):
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(clip_vocab_path, context_length=1)
    with pytest.raises(TypeError, match="context_length"):
        ClipTokenizer(clip_vocab_path, context_length=7.0)


# ---------------------------------------------------------------- HFTokenizer

HF_CORPUS = [
    "a red circle on a blue background",
    "two green squares and a yellow triangle",
    "the quick brown fox jumps over the lazy dog",
    "a photo of a small cat sitting on a mat",
]


def _save_bpe_tokenizer(path, with_post_processor: bool) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(HF_CORPUS, trainer=trainer)
    if with_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return str(path)


def _save_wordlevel_tokenizer(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(HF_CORPUS, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"]))
    tok.save(str(path))
    return str(path)


HF_TEXTS = HF_CORPUS + ["", "an unseen zebra!", " ".join(HF_CORPUS * 3)]


def _reference(path: str, texts: list[str], context_length: int, pad_id: int) -> np.ndarray:
    """Plain tokenizers encode, truncated and padded by hand."""
    from tokenizers import Tokenizer

    ref_tok = Tokenizer.from_file(path)
    out = np.full((len(texts), context_length), pad_id, dtype=np.int32)
    for i, text in enumerate(texts):
        ref_tok.no_truncation()
        ids = ref_tok.encode(text).ids
        if len(ids) > context_length:  # library truncation keeps post-processor tokens
            ref_tok.enable_truncation(max_length=context_length)
            ids = ref_tok.encode(text).ids
        out[i, : len(ids)] = ids
    return out


def test_hf_bpe_matches_library(tmp_path):
    path = _save_bpe_tokenizer(tmp_path / "tokenizer.json", with_post_processor=False)
    tok = HFTokenizer(path, context_length=12)
    out = tok(HF_TEXTS)
    assert out.dtype == np.int32 and out.shape == (len(HF_TEXTS), 12)
    assert tok.pad_token_id == 0  # found "[PAD]"
    np.testing.assert_array_equal(out, _reference(path, HF_TEXTS, 12, 0))
    assert tok.eot_token_id == 3  # "[SEP]"
    assert tok.vocab_size <= 120
    assert tok.decode(out[0]) == HF_CORPUS[0]


def test_hf_post_processor_tokens_survive_truncation(tmp_path):
    path = _save_bpe_tokenizer(tmp_path / "tokenizer.json", with_post_processor=True)
    tok = HFTokenizer(path, context_length=8, pad_token_id=0)
    out = tok(HF_TEXTS)
    np.testing.assert_array_equal(out, _reference(path, HF_TEXTS, 8, 0))
    long_row = out[-1]
    assert long_row[0] == 2 and long_row[-1] == 3  # [CLS] ... [SEP] within the 8 slots


def test_hf_wordlevel_and_explicit_pad(tmp_path):
    path = _save_wordlevel_tokenizer(tmp_path / "tokenizer.json")
    auto = HFTokenizer(path, context_length=10)
    assert auto.pad_token_id == 1  # "<pad>"
    np.testing.assert_array_equal(auto(HF_TEXTS), _reference(path, HF_TEXTS, 10, 1))
    explicit = HFTokenizer(path, context_length=10, pad_token_id=2)
    np.testing.assert_array_equal(explicit(HF_TEXTS), _reference(path, HF_TEXTS, 10, 2))
    assert explicit("an unseen zebra")[0, 2] == 0  # unknown word -> <unk>
    with pytest.raises(ValueError, match="pad_token_id"):
        HFTokenizer(path, context_length=10, pad_token_id=10_000)


def test_hf_clean_option(tmp_path):
    path = _save_wordlevel_tokenizer(tmp_path / "tokenizer.json")
    tok = HFTokenizer(path, context_length=10, clean=True)
    np.testing.assert_array_equal(tok("  a\tred &amp;  circle\n"), tok("a red & circle"))


def test_hf_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        HFTokenizer(str(tmp_path / "missing.json"), context_length=8)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        HFTokenizer(str(garbage), context_length=8)
    tok = HFTokenizer(_save_wordlevel_tokenizer(tmp_path / "tokenizer.json"), context_length=8)
    with pytest.raises(TypeError):
        tok([("a", "pair")])


# ---------------------------------------------------------------- WordTokenizer

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "2"]


def test_word_ids_layout():
    tok = WordTokenizer(WORDS, context_length=8)
    assert tok.vocab_size == 3 + len(WORDS) + 1
    assert (tok.pad_token_id, tok.unk_token_id, tok.sot_token_id) == (0, 1, 2)
    assert tok.eot_token_id == tok.vocab_size - 1
    out = tok(["A Red circle, on the LEFT!", "red-square"])
    assert out.dtype == np.int32 and out.shape == (2, 8)
    np.testing.assert_array_equal(out[0], [2, 3, 4, 6, 8, 9, 10, tok.eot_token_id])
    np.testing.assert_array_equal(out[1], [2, 4, 7, tok.eot_token_id, 0, 0, 0, 0])
    assert (out.argmax(axis=1) == [7, 3]).all()  # argmax pooling finds eot
    assert out.max() == tok.eot_token_id
    assert isinstance(tok, Tokenizer)


def test_word_unknown_and_decode():
    tok = WordTokenizer(WORDS, context_length=8)
    row = tok("a green circle")[0]
    np.testing.assert_array_equal(row[:5], [2, 3, 1, 6, tok.eot_token_id])
    assert tok.decode(row) == "a <unk> circle"
    assert tok.decode(row, skip_special_tokens=False) == "<start_of_text> a <unk> circle <end_of_text>"


def test_word_truncation():
    tok = WordTokenizer(WORDS, context_length=4)
    row = tok("a red blue circle square")[0]
    np.testing.assert_array_equal(row, [2, 3, 4, tok.eot_token_id])
    np.testing.assert_array_equal(tok("")[0], [2, tok.eot_token_id, 0, 0])


def test_word_vocab_validation():
    assert WordTokenizer(["a", "b", "a"]).vocab_size == 3 + 2 + 1  # duplicates dropped
    for bad in (["Red"], ["two words"], ["x-y"], [""], [3]):
        with pytest.raises(ValueError):
            WordTokenizer(bad)
    with pytest.raises(TypeError):
        WordTokenizer("abc")
    with pytest.raises(TypeError):
        WordTokenizer(WORDS)([None])


# ---------------------------------------------------------------- build_tokenizer


def test_build_clip(clip_vocab_path, open_clip_tokenize):
    tok = build_tokenizer({"name": "clip", "vocab_path": clip_vocab_path, "context_length": 32})
    assert isinstance(tok, ClipTokenizer) and tok.context_length == 32
    np.testing.assert_array_equal(tok(CLIP_TEXTS[:3]), open_clip_tokenize(CLIP_TEXTS[:3], 32).numpy())
    assert build_tokenizer({"name": "clip"}).context_length == 77  # bundled vocab by default


def test_build_hf(tmp_path):
    path = _save_wordlevel_tokenizer(tmp_path / "tokenizer.json")
    tok = build_tokenizer({"name": "hf", "path": path, "context_length": 6})
    assert isinstance(tok, HFTokenizer) and tok(["a red circle"]).shape == (1, 6)
    with pytest.raises(ValueError, match="context_length"):
        build_tokenizer({"name": "hf", "path": path})


def test_build_errors():
    with pytest.raises(ValueError, match="clip.*hf.*shapes"):
        build_tokenizer({"name": "sentencepiece"})
    with pytest.raises(ValueError, match="known names"):
        build_tokenizer({"context_length": 16})
    with pytest.raises(ValueError, match="context_len"):
        build_tokenizer({"name": "shapes", "context_len": 16})
    with pytest.raises(TypeError):
        build_tokenizer("clip")


def test_build_shapes():
    from mmjax.data import shapes

    tok = build_tokenizer({"name": "shapes", "context_length": 16})
    assert isinstance(tok, WordTokenizer) and tok.context_length == 16
    assert tok.vocab_size == len(set(shapes.VOCAB)) + 4
    words = list(shapes.VOCAB[:5])
    row = tok(" ".join(words))[0]
    assert tok.unk_token_id not in row
    assert row.argmax() == len(words) + 1 and row.max() == tok.eot_token_id


def test_clip_tokenizer_pickles_for_data_workers():
    """grain worker processes receive the tokenizer by pickling; the copy must agree."""
    import pickle

    from mmjax.data.tokenizers import ClipTokenizer, default_clip_vocab_path

    tok = ClipTokenizer(default_clip_vocab_path())
    copy = pickle.loads(pickle.dumps(tok))
    texts = ["a photo of a cat.", "Ünïcödé & punctuation!!"]
    np.testing.assert_array_equal(copy(texts), tok(texts))


def test_shapes_word_tokenizer_with_question_words_batched_decode_and_no_bos():
    from mmjax.data import shapes_vqa

    plain = build_tokenizer({"name": "shapes"})
    qa = build_tokenizer({"name": "shapes", "questions": True, "context_length": 32})
    text = "a red circle question: what colour is the shape? answer: red"
    ids = qa(text)[0]
    assert qa.unk_token_id not in ids and plain.unk_token_id in plain(text)     # "question", "what" are new words
    assert qa.vocab_size == plain.vocab_size + len(set(shapes_vqa.vocabulary()) - set(plain.words))
    assert plain.encode("a red circle") == qa.encode("a red circle")       # the caption words keep their ids
    assert qa.decode(ids[None].repeat(2, 0)) == [qa.decode(ids)] * 2 == [text.replace("?", "").replace(":", "")] * 2
    no_bos = build_tokenizer({"name": "shapes", "add_bos": False})
    assert list(no_bos("a red circle")[0, :4]) == [*plain.encode("a red circle"), plain.eot_token_id]
    with pytest.raises(ValueError, match="outside the word tokenizer"):
        plain.decode([plain.vocab_size])
