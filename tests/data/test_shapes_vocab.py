"""The WordPiece vocabulary shipped for the shapes data: complete, in sync with its generator, installed."""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mmjax.data import shapes_captions, shapes_render
from mmjax.data.tokenizers import WordPieceTokenizer, build_tokenizer, default_shapes_vocab_path
from mmjax.data.tokenizers.shapes_vocab import QUESTION_WORDS, build_shapes_vocab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = ["what colour is the shape?", "what color is it?", "where is the shape?", "where is it?",
             "what shape is it?", "what size is the shape?", "which shape is the red one?"]


@pytest.fixture(scope="module")
def tok() -> WordPieceTokenizer:
    return build_tokenizer({"name": "shapes_wordpiece"})


def _captions(n: int = 400) -> list[str]:
    out = []
    for i in range(n):
        rng = np.random.default_rng((7, i))
        out.append(shapes_captions.make_caption(shapes_render.sample_scene(rng, i % 24), rng))
    return out


def test_shipped_file_equals_generator():
    with open(default_shapes_vocab_path(), encoding="utf-8") as f:
        shipped = f.read().split("\n")
    assert shipped[-1] == "" and shipped[:-1] == build_shapes_vocab(), (
        "shapes_vocab.txt is stale: run `python -m mmjax.data.tokenizers.shapes_vocab`")
    assert shipped[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_every_word_is_one_token(tok):
    for word in [*shapes_captions.VOCAB, *QUESTION_WORDS, *shapes_captions.PUNCTUATION, "?"]:
        assert len(tok.encode(word)) == 1, (word, tok.tokens(word))


def test_captions_tokenize_without_unk_and_round_trip(tok):
    captions = _captions()
    prompts = [t.format(c) for t in shapes_captions.ZERO_SHOT_TEMPLATES for c in shapes_captions.CLASS_NAMES]
    texts = captions + prompts + QUESTIONS
    ids = tok(texts)
    assert not (ids == tok.unk_token_id).any()
    lengths = tok.padding_mask(ids).sum(axis=1)
    assert lengths.max() < tok.context_length, "no caption should be truncated at the default length"
    assert (ids[np.arange(len(texts)), lengths - 1] == tok.sep_token_id).all()
    for text, row in zip(texts, ids):
        # Words and punctuation marks come back one token each, in order.
        expected = re.findall(r"[a-z]+|[^\sa-z]", text)
        assert [tok.decode([i]) for i in row[1:tok.padding_mask(row).sum() - 1]] == expected, text


def test_unknown_ascii_words_split_into_pieces(tok):
    assert tok.tokens("Colours purple") == ["colour", "##s", "p", "##u", "##r", "##p", "##l", "##e"]
    assert tok.unk_token_id not in tok("xyzzy 42 quartz-like!")[0]


def test_found_in_an_installed_package(tmp_path):
    """Build a wheel from a copy of the sources, install it elsewhere and load the vocabulary from it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "mmjax"), src / "mmjax", ignore=shutil.ignore_patterns("__pycache__"))
    run = lambda *args, **kw: subprocess.run(args, check=True, capture_output=True, text=True, **kw)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
        "-w", str(tmp_path / "wheel"), cwd=str(src))
    (wheel,) = (tmp_path / "wheel").iterdir()
    assert "mmjax/data/tokenizers/shapes_vocab.txt" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel))
    probe = ("import mmjax, mmjax.data.tokenizers as t; tok = t.build_tokenizer({'name': 'shapes_wordpiece'}); "
             "print(mmjax.__file__); print(tok('a red circle').tolist())")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = run(sys.executable, "-c", probe, cwd=str(tmp_path), env=env).stdout.split("\n")
    assert out[0].startswith(str(site)), out
    assert out[1] == str(build_tokenizer({"name": "shapes_wordpiece"})("a red circle").tolist())
