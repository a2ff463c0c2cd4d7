"""WordPieceTokenizer: same ids as transformers' BertTokenizerFast on awkward text, and clear errors.

The vocabularies are trained here, offline, with the `tokenizers` library on generated text.
"""

import json
import pickle

import numpy as np
import pytest
from references import require

from mmjax.data.tokenizers import Tokenizer, WordPieceTokenizer, build_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CORPUS_WORDS = ("the a of and to in is it that photo picture image red green blue yellow circle square triangle star "
          "cross diamond small large big tiny top bottom left right center corner middle hello world dog cat "
          "running jumped quickly unbelievable tokenization international don't it's we've 1999 3.14 42nd "
          "café naïve résumé Ångström façade straße İstanbul Øresund Ελληνικά русский 日本語 中文 한국어")

AWKWARD = [
    "a photo of a cat",
    "A Photo Of A DOG.",
    "Hello, world!!! ... ?!?! --- ((nested)) [brackets] {braces} $5.00 & 100% #tag @user",
    "it's a dog's life; they're here, we've won, don't",
    "it’s curly ‘quoted’ “text” — dashes – and … ellipsis",
    "café naïve résumé Ångström façade Øresund CAFÉ",
    "İstanbul ǅemal ß straße ΣΊΣΥΦΟΣ Ελληνικά русский",
    "zero\u200bwidth and combining e\u0301 accents, ﬁ ligature, ｆｕｌｌ ｗｉｄｔｈ",
    "日本語のテキスト 中文文本 한국어 mixed中文English",
    "emoji 😀🐱👍🏽 family 👨‍👩‍👧 flags 🇫🇷 ♥ ✓",
    "ไทย العربية עברית हिन्दी",
    "control\x00chars\x07 and \ufffd replacement",
    "tabs\tand\nnewlines\r\n  and   many    spaces \u00a0nbsp\u2003em ",
    "literal specials [CLS] [SEP] [PAD] [MASK] [UNK] [mask] and ##s",
    "unbelievabletokenizationinternationalization " + "x" * 150,
    "1234567890 3.14159 1,000,000 2nd 42nd ²³ ½",
    "under_score snake_case and CamelCaseWords and hyphen-ated",
    "a very long caption " + " ".join(f"word{i} with some filler, punctuation!" for i in range(80)),
    "",
    "   ",
    "\n\t",
]


def _corpus(seed: int = 0, n: int = 3000) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_CORPUS_WORDS.split(), size=int(rng.integers(3, 12)))) for _ in range(n)]


def _train_vocab(directory, lowercase: bool) -> str:
    tokenizers = require("tokenizers")
    trainer = tokenizers.BertWordPieceTokenizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    trainer.train_from_iterator(_corpus(), vocab_size=400, min_frequency=1, special_tokens=SPECIALS,
                                show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(directory))
    return str(directory / "vocab.txt")


@pytest.fixture(scope="module")
def vocab_dirs(module_tmp):
    root = module_tmp("wordpiece")
    return {cased: _train_vocab(root / ("cased" if cased else "uncased"), lowercase=not cased)
            for cased in (False, True)}


def _reference(vocab_path: str, **kwargs):
    transformers = require("transformers")
    directory = vocab_path.rsplit("/", 1)[0]
    return transformers.BertTokenizerFast.from_pretrained(directory, **kwargs)


def _reference_ids(ref, texts, length):
    enc = ref(texts, padding="max_length", truncation=True, max_length=length)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


# (ours, reference) options: bert-base-uncased, cased, uncased keeping accents, no CJK splitting
OPTIONS = [
    (False, {}, {}),
    (True, {"lowercase": False}, {"do_lower_case": False}),
    (False, {"strip_accents": False}, {"strip_accents": False}),
    (False, {"tokenize_chinese_chars": False}, {"tokenize_chinese_chars": False}),
]


@pytest.mark.parametrize("cased, ours_kw, ref_kw", OPTIONS, ids=["uncased", "cased", "keep_accents", "no_cjk"])
@pytest.mark.parametrize("length", [16, 64, 512])
def test_matches_bert_tokenizer_fast(vocab_dirs, cased, ours_kw, ref_kw, length):
    path = vocab_dirs[cased]
    ref_ids, ref_mask = _reference_ids(_reference(path, split_special_tokens=True, **ref_kw), AWKWARD, length)
    tok = WordPieceTokenizer(path, length, **ours_kw)
    ours = tok(AWKWARD)
    assert ours.dtype == np.int32 and ours.shape == (len(AWKWARD), length)
    np.testing.assert_array_equal(ours, ref_ids)
    np.testing.assert_array_equal(tok.padding_mask(ours), ref_mask.astype(bool))
    # Transformers' default matches literal special tokens in the text; so does split_special_tokens=False.
    default_ids, _ = _reference_ids(_reference(path, **ref_kw), AWKWARD, length)
    np.testing.assert_array_equal(WordPieceTokenizer(path, length, split_special_tokens=False, **ours_kw)(AWKWARD),
                                  default_ids)
    assert not np.array_equal(ours, default_ids)   # the literal "[MASK]" text differs between the two


def test_text_by_text_equals_batch_and_has_awkward_cases(vocab_dirs):
    tok = WordPieceTokenizer(vocab_dirs[False], 32)
    batch = tok(AWKWARD)
    for i, text in enumerate(AWKWARD):
        np.testing.assert_array_equal(tok(text)[0], batch[i])
    assert (batch == tok.unk_token_id).any(axis=1).sum() >= 3, "the awkward texts should produce some [UNK]"
    assert (batch == tok.pad_token_id).all(axis=1).sum() == 0
    empty = tok("")[0]
    assert empty[:2].tolist() == [tok.cls_token_id, tok.sep_token_id] and (empty[2:] == tok.pad_token_id).all()
    np.testing.assert_array_equal(tok("   ")[0], empty)


def test_truncation_keeps_sep_and_strict_mode_refuses(vocab_dirs):
    tok = WordPieceTokenizer(vocab_dirs[False], 16)
    ids = tok(AWKWARD)
    for row in ids:
        real = row[tok.padding_mask(row)]
        assert real[0] == tok.cls_token_id and real[-1] == tok.sep_token_id
        assert (real == tok.sep_token_id).sum() == 1 and (real == tok.cls_token_id).sum() == 1
    long = AWKWARD[-4]
    assert ids[-4, -1] == tok.sep_token_id and tok.padding_mask(ids[-4]).all()
    assert len(tok.encode(long)) > 14
    strict = WordPieceTokenizer(vocab_dirs[False], 16, truncate=False)
    np.testing.assert_array_equal(strict(AWKWARD[:2]), ids[:2])
    with pytest.raises(ValueError, match=r"text 1 has \d+ tokens .* more than context_length 16"):
        strict(["short", long])
    assert WordPieceTokenizer(vocab_dirs[False], 2)("anything").tolist() == [[tok.cls_token_id, tok.sep_token_id]]


def test_attributes_decode_and_pickle(vocab_dirs):
    path = vocab_dirs[False]
    tok = WordPieceTokenizer(path, 64)
    ref = _reference(path)
    vocab = ref.get_vocab()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(ref) == len(vocab)
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        ref.pad_token_id, ref.unk_token_id, ref.cls_token_id, ref.sep_token_id, ref.mask_token_id)
    assert tok.eot_token_id == tok.sep_token_id and tok.sot_token_id == tok.cls_token_id
    assert set(tok.special_token_ids) == set(ref.all_special_ids)
    continuation = {i for t, i in vocab.items() if t.startswith("##")}
    assert set(np.flatnonzero(tok.is_continuation)) == continuation and continuation
    ids = tok(AWKWARD)
    assert tok.decode(ids) == [ref.decode(row, skip_special_tokens=True) for row in ids]
    assert tok.decode(ids[0], skip_special_tokens=False) == ref.decode(ids[0], skip_special_tokens=False)
    assert tok.decode(tok("A Photo of a DOG.")[0]) == "a photo of a dog."
    assert tok.tokens("unbelievable") == ref.tokenize("unbelievable")
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(AWKWARD), ids)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, tok.vocab_size])


def test_tokenizer_json_gives_the_same_ids(vocab_dirs, tmp_path):
    path = vocab_dirs[False]
    json_path = str(tmp_path / "tokenizer.json")
    _reference(path).backend_tokenizer.save(json_path)
    np.testing.assert_array_equal(WordPieceTokenizer(json_path, 64)(AWKWARD), WordPieceTokenizer(path, 64)(AWKWARD))
    with pytest.raises(ValueError, match="defines its own normalization"):
        WordPieceTokenizer(json_path, 64, lowercase=False)


def test_build_tokenizer(vocab_dirs):
    path = vocab_dirs[True]
    tok = build_tokenizer({"name": "wordpiece", "path": path, "context_length": 24, "lowercase": False})
    assert isinstance(tok, WordPieceTokenizer) and tok.context_length == 24
    np.testing.assert_array_equal(tok(AWKWARD), WordPieceTokenizer(path, 24, lowercase=False)(AWKWARD))
    assert build_tokenizer({"name": "wordpiece", "path": path}).context_length == 512
    shapes = build_tokenizer({"name": "shapes_wordpiece"})
    assert shapes.context_length == 32 and shapes.vocab_size < 300
    with pytest.raises(ValueError, match=r"unknown keys \['lower_case'\]"):
        build_tokenizer({"name": "wordpiece", "path": path, "lower_case": False})
    with pytest.raises(ValueError, match="needs 'path'"):
        build_tokenizer({"name": "wordpiece", "context_length": 8})
    with pytest.raises(ValueError, match=r"unknown keys \['path'\]"):
        build_tokenizer({"name": "shapes_wordpiece", "path": path})


def _write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize("content, error, match", [
    ("", ValueError, "is empty"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", ValueError, r"lacks the special tokens \['\[MASK\]'\]"),
    ("hello\nworld\n", ValueError, r"lacks the special tokens \['\[PAD\]', '\[UNK\]', '\[CLS\]', '\[SEP\]', "
                                   r"'\[MASK\]'\]"),
    ("[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n[MASK]\n", ValueError, "line 3: expected one token"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello world\n", ValueError, "line 6: expected one token"),
    ("[PAD]\r\n[UNK]\r\n[CLS]\r\n[SEP]\r\n[MASK]\r\n", ValueError, "line 1: expected one token"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nhello\n", ValueError, "line 7: token 'hello' already on line 6"),
    (b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n\xff\xfe\n", ValueError, "not UTF-8"),
    ('{"model": {"type": "nonsense"}}', ValueError, "could not load tokenizer.json"),
])
def test_bad_vocab_files(tmp_path, content, error, match):
    name = "tokenizer.json" if match.startswith("could not") else "vocab.txt"
    with pytest.raises(error, match=match):
        WordPieceTokenizer(_write(tmp_path, name, content), 16)


def test_missing_and_wrong_kind_of_files(tmp_path, vocab_dirs):
    with pytest.raises(FileNotFoundError, match="is missing"):
        WordPieceTokenizer(str(tmp_path / "nope.txt"), 16)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        WordPieceTokenizer(str(tmp_path), 16)
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        WordPieceTokenizer(str(tmp_path / "tokenizer.json"), 16)
    tokenizers = require("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"[UNK]": 0, "a": 1}, merges=[], unk_token="[UNK]"))
    bpe.save(str(tmp_path / "bpe.json"))
    with pytest.raises(ValueError, match="holds a BPE model, not WordPiece"):
        WordPieceTokenizer(str(tmp_path / "bpe.json"), 16)
    no_mask = json.loads(_reference(vocab_dirs[False]).backend_tokenizer.to_str())
    del no_mask["model"]["vocab"]["[MASK]"]
    no_mask["added_tokens"] = [t for t in no_mask["added_tokens"] if t["content"] != "[MASK]"]
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[MASK\]'\]"):
        WordPieceTokenizer(_write(tmp_path, "no_mask.json", json.dumps(no_mask)), 16)
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        WordPieceTokenizer(vocab_dirs[False], 1)
    with pytest.raises(TypeError, match="texts\\[1\\] must be a str"):
        WordPieceTokenizer(vocab_dirs[False], 8)(["ok", 3])
