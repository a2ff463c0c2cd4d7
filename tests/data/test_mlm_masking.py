"""MLM masking (mmjax.data.mlm_masking and the `mlm_mask` pp op): statistics, invariants, determinism
and draw-for-draw parity with transformers' numpy DataCollatorForLanguageModeling."""

import numpy as np
import pytest
from references import require

from mmjax.data import shapes_captions, shapes_render
from mmjax.data.mlm_masking import IGNORE_ID, mask_tokens, word_ids
from mmjax.data.preprocess import KNOWN_OPS, Preprocess
from mmjax.data.tokenizers import WordPieceTokenizer, WordTokenizer, build_tokenizer
from mmjax.data.tokenizers.shapes_vocab import build_shapes_vocab

# Words that WordPiece splits into several pieces with the shapes vocabulary.
SPLIT_WORDS = ["circles", "reddish", "xyzzy", "colours", "squares", "42", "bluest"]


@pytest.fixture(scope="module")
def tok() -> WordPieceTokenizer:
    return build_tokenizer({"name": "shapes_wordpiece"})


def _captions(n: int, seed: int = 3, split_words: bool = False, spaced: bool = False) -> list[str]:
    out = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        words = shapes_captions.make_caption(shapes_render.sample_scene(rng, i % 24), rng).split()
        if split_words:   # one or two multi-piece words at random places
            for _ in range(int(rng.integers(1, 3))):
                words.insert(int(rng.integers(len(words) + 1)), SPLIT_WORDS[int(rng.integers(len(SPLIT_WORDS)))])
        text = " ".join(words)
        if spaced:   # punctuation as words of its own
            for mark in ",.:":
                text = text.replace(mark, f" {mark} ")
        out.append(" ".join(text.split()))
    return out


def _settings(tok, **kw):
    return dict(mask_token_id=tok.mask_token_id, vocab_size=tok.vocab_size, special_token_ids=tok.special_token_ids,
                is_continuation=tok.is_continuation, **kw)


def _within(share: float, expected: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(share - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("whole_word", [False, True])
def test_statistics(tok, whole_word):
    ids = tok(_captions(4000, split_words=True))
    inputs, labels = mask_tokens(ids, np.random.default_rng(0), whole_word=whole_word, **_settings(tok))
    assert inputs.dtype == labels.dtype == np.int32 and inputs.shape == labels.shape == ids.shape
    special = np.isin(ids, tok.special_token_ids)
    selected = labels != IGNORE_ID
    n = int((~special).sum())
    assert not (selected & special).any(), "special tokens and padding are never masked"
    np.testing.assert_array_equal(labels[selected], ids[selected])
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])
    share = selected.sum() / n
    if whole_word:
        words = word_ids(ids, ~special, tok.is_continuation)
        per_word = {}
        for row, word, sel in zip(*np.nonzero(words >= 0), selected[words >= 0]):
            per_word.setdefault((row, words[row, word]), set()).add(sel)
        assert all(len(flags) == 1 for flags in per_word.values()), "a word is masked whole or not at all"
        word_share = np.mean([flags.pop() for flags in per_word.values()])
        assert _within(word_share, 0.15, len(per_word)), word_share
        assert len(per_word) < n and abs(share - 0.15) < 0.01, share   # tokens cluster by word: looser bound
    else:
        assert _within(share, 0.15, n), share
    n_sel = int(selected.sum())
    to_mask = selected & (inputs == tok.mask_token_id)
    kept = selected & (inputs == ids)
    random = selected & ~to_mask & ~kept
    ordinary = tok.vocab_size - len(tok.special_token_ids)
    assert _within(to_mask.sum() / n_sel, 0.8, n_sel)
    assert _within(kept.sum() / n_sel, 0.1 + 0.1 / ordinary, n_sel)   # a random draw may give the same token
    assert _within(random.sum() / n_sel, 0.1 - 0.1 / ordinary, n_sel)
    assert not np.isin(inputs[random], tok.special_token_ids).any(), "random replacements are ordinary tokens"
    assert len(np.unique(inputs[random])) > ordinary // 2


def test_word_ids(tok):
    ids = tok(["circles, xyzzy", ""])
    words = word_ids(ids, ~np.isin(ids, tok.special_token_ids), tok.is_continuation)
    # [CLS] circle ##s , x ##y ##z ##z ##y [SEP] [PAD] ...
    assert words[0, :11].tolist() == [-1, 0, 0, 1, 2, 2, 2, 2, 2, -1, -1] and (words[1] == -1).all()


def test_determinism_and_edge_probabilities(tok):
    ids = tok(_captions(64, split_words=True))
    before = ids.copy()
    for whole_word in (False, True):
        def run(seed, whole_word=whole_word, **kw):
            return mask_tokens(ids, np.random.default_rng(seed), whole_word=whole_word, **_settings(tok, **kw))

        a, b, c = run(1), run(1), run(2)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[1], c[1])
        none = run(1, prob=0.0)
        np.testing.assert_array_equal(none[0], ids)
        assert (none[1] == IGNORE_ID).all()
        every = run(1, prob=1.0, mask_replace_prob=1.0, random_replace_prob=0.0)
        maskable = ~np.isin(ids, tok.special_token_ids)
        np.testing.assert_array_equal(every[1] != IGNORE_ID, maskable)
        np.testing.assert_array_equal(every[0], np.where(maskable, tok.mask_token_id, ids))
    np.testing.assert_array_equal(ids, before)   # the input is not modified
    stacked = ids[:6].reshape(2, 3, -1)
    out = mask_tokens(stacked, np.random.default_rng(5), **_settings(tok))
    flat = mask_tokens(ids[:6], np.random.default_rng(5), **_settings(tok))
    np.testing.assert_array_equal(out[1].reshape(6, -1), flat[1])


@pytest.mark.parametrize("kw, match", [
    ({"prob": 1.5}, r"prob must lie in \[0, 1\]"),
    ({"mask_replace_prob": 0.8, "random_replace_prob": 0.3}, "must be <= 1"),
    ({"mask_token_id": 10_000}, "mask_token_id 10000 outside"),
    ({"whole_word": True, "is_continuation": None}, "whole_word masking needs is_continuation"),
])
def test_bad_settings(tok, kw, match):
    settings = {**_settings(tok), **kw}
    with pytest.raises(ValueError, match=match):
        mask_tokens(tok(["a red circle"]), np.random.default_rng(0), **settings)


def test_bad_ids(tok):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 198\)"):
        mask_tokens(np.array([[2, 500, 3]]), np.random.default_rng(0), **_settings(tok))
    with pytest.raises(ValueError, match="integer token ids"):
        mask_tokens(np.array([[2.0, 5.0]]), np.random.default_rng(0), **_settings(tok))


# ---------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def bert_sized(module_tmp):
    """The shapes vocabulary padded with filler tokens to BERT-base's 30,522 ids: ours and transformers'."""
    directory = module_tmp("bert_sized")
    vocab = build_shapes_vocab()
    vocab += [f"filler{i}" for i in range(30_522 - len(vocab))]
    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    ref = require("transformers").BertTokenizerFast.from_pretrained(str(directory))
    return WordPieceTokenizer(str(directory / "vocab.txt"), 40), ref


def _collate(ref, texts, seed, **kw):
    collator = require("transformers").DataCollatorForLanguageModeling(
        ref, return_tensors="np", seed=seed, **kw)
    enc = ref(texts, padding="max_length", truncation=True, max_length=40, return_special_tokens_mask=True,
              return_offsets_mapping=True)
    examples = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    return collator, examples, np.asarray(enc["input_ids"])


def test_token_masking_matches_transformers_draw_for_draw(bert_sized):
    tok, ref = bert_sized
    texts = _captions(1024, seed=11)
    collator, examples, ids = _collate(ref, texts, seed=42, mask_replace_prob=0.8, random_replace_prob=0.0)
    np.testing.assert_array_equal(tok(texts), ids)
    rng = np.random.default_rng(42)
    for _ in range(3):   # consecutive batches from one generator stay in step
        theirs = collator(examples)
        ours = mask_tokens(ids, rng, **_settings(tok, random_replace_prob=0.0))
        np.testing.assert_array_equal(ours[1], theirs["labels"])
        np.testing.assert_array_equal(ours[0], theirs["input_ids"])
    # BERT's 80/10/10: the same positions; random tokens differ in value (ours never draw a special token).
    collator, examples, _ = _collate(ref, texts, seed=7)
    theirs = collator(examples)
    inputs, labels = mask_tokens(ids, np.random.default_rng(7), **_settings(tok))
    np.testing.assert_array_equal(labels, theirs["labels"])
    selected = labels != IGNORE_ID
    np.testing.assert_array_equal(inputs == tok.mask_token_id, theirs["input_ids"] == tok.mask_token_id)
    ours_random, their_random = selected & (inputs != ids), selected & (theirs["input_ids"] != ids)
    ours_random &= inputs != tok.mask_token_id
    their_random &= theirs["input_ids"] != tok.mask_token_id
    assert ours_random.sum() > 100   # enough random replacements for the comparison to mean something
    np.testing.assert_array_equal(ours_random, their_random)


def test_whole_word_masking_matches_transformers(bert_sized):
    """transformers 5 groups characters without a gap into words; with punctuation spaced out those are
    exactly the WordPiece words, and with mask_replace_prob=1 (which it forces) both agree draw for draw."""
    tok, ref = bert_sized
    texts = _captions(256, seed=5, split_words=True, spaced=True)
    collator, examples, ids = _collate(ref, texts, seed=3, whole_word_mask=True, mask_replace_prob=1.0,
                                       random_replace_prob=0.0)
    np.testing.assert_array_equal(tok(texts), ids)
    assert tok.is_continuation[ids].sum() > 200
    rng = np.random.default_rng(3)
    for _ in range(3):
        theirs = collator(examples)
        ours = mask_tokens(ids, rng, whole_word=True, **_settings(tok, mask_replace_prob=1.0,
                                                                  random_replace_prob=0.0))
        np.testing.assert_array_equal(ours[1], theirs["labels"])
        np.testing.assert_array_equal(ours[0], theirs["input_ids"])


# ---------------------------------------------------------------- the pp op


def test_pp_op(tok):
    example = {"caption": "a reddish circles sits at the top left corner.", "image": np.zeros((2, 2, 3))}
    pp = "tokenize(key='caption', out='text')|mlm_mask(prob=0.5)"
    out = Preprocess(pp, tok)(example, np.random.default_rng(9))
    assert out["mlm_input"].shape == out["mlm_labels"].shape == out["text"].shape == (32,)
    assert out["mlm_input"].dtype == out["mlm_labels"].dtype == np.int32
    np.testing.assert_array_equal(out["text"], tok(example["caption"])[0])
    expected = mask_tokens(out["text"], np.random.default_rng(9), **_settings(tok, prob=0.5))
    np.testing.assert_array_equal(out["mlm_input"], expected[0])
    np.testing.assert_array_equal(out["mlm_labels"], expected[1])
    again = Preprocess(pp, tok)(example, np.random.default_rng(9))
    np.testing.assert_array_equal(again["mlm_labels"], out["mlm_labels"])

    whole = Preprocess("tokenize(key='caption', out='t')|mlm_mask(prob=1.0, whole_word=True, key='t', "
                       "inputs='x', labels='y', mask_replace_prob=1.0, random_replace_prob=0.0, ignore_id=-1)", tok)
    out = whole({"caption": ["circles", "a red box"]}, np.random.default_rng(0))
    maskable = ~np.isin(out["t"], tok.special_token_ids)
    assert out["x"].shape == (2, 32)
    np.testing.assert_array_equal(out["y"], np.where(maskable, out["t"], -1))
    assert "mlm_mask" in KNOWN_OPS


def test_pp_op_errors(tok):
    with pytest.raises(ValueError, match="needs the pipeline's WordPiece tokenizer"):
        Preprocess("mlm_mask")
    with pytest.raises(ValueError, match=r"lacking \['mask_token_id', 'special_token_ids'\]"):
        Preprocess("mlm_mask", WordTokenizer(["red"]))
    with pytest.raises(ValueError, match=r"prob must lie in \[0, 1\]"):
        Preprocess("mlm_mask(prob=1.5)", tok)
    with pytest.raises(ValueError, match="bad arguments"):
        Preprocess("mlm_mask(probability=0.2)", tok)
    with pytest.raises(KeyError, match="no key 'text'"):
        Preprocess("mlm_mask", tok)({"caption": "x"}, np.random.default_rng(0))


def test_through_the_train_loader(tok, small_shapes):
    """The op in a real grain pipeline: batched, reproducible from the seed, picklable for workers."""
    from mmjax.data import pipeline

    pp = "tokenize(key='caption', out='text')|mlm_mask(whole_word=True)|keep('text', 'mlm_input', 'mlm_labels')"
    batches = []
    for _ in range(2):
        loader = pipeline.make_train_loader(small_shapes, pp, 16, seed=4, tokenizer=tok, process_index=0,
                                            process_count=1, prefetch=0)
        batches.append(next(iter(loader)))
    first, second = batches
    assert first["mlm_input"].shape == first["mlm_labels"].shape == (16, 32)
    assert first["mlm_labels"].dtype == np.int32 and (first["mlm_labels"] == IGNORE_ID).any()
    selected = first["mlm_labels"] != IGNORE_ID
    assert selected.any() and (first["mlm_labels"][selected] == first["text"][selected]).all()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    cloudpickle = require("cloudpickle")
    op = Preprocess(pp, tok)
    example = {"caption": "a red circles at the top [MASK]"}
    restored = cloudpickle.loads(cloudpickle.dumps(op))
    for key in ("text", "mlm_input", "mlm_labels"):
        np.testing.assert_array_equal(restored(example, np.random.default_rng(1))[key],
                                      op(example, np.random.default_rng(1))[key])
