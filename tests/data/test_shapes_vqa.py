"""Generated questions about the shapes data (mmjax/data/shapes_vqa.py) and the pp op
`shapes_question`: right answers, every type and phrasing used, deterministic per example rng,
tokenized without [UNK], and clear errors."""

import numpy as np
import pytest

from mmjax.data import shapes, shapes_render, shapes_vqa, tokenizers
from mmjax.data.preprocess import Preprocess

PP = "shapes_question(out='question')|tokenize(key='question',out='text')"


def _examples(n=200):
    return [shapes.generate_example(i, seed=0, image_size=32) for i in range(n)]


def test_answer_vocabulary_is_the_factor_names():
    assert tuple(shapes.POSITION_NAMES) == shapes_vqa.POSITION_NAMES
    want = [*shapes_render.COLORS, *shapes_render.SHAPES, *shapes_render.SIZES, *shapes.POSITION_NAMES]
    assert list(shapes_vqa.ANSWERS) == want and len(set(want)) == len(want) == 22
    assert all(shapes_vqa.ANSWERS[i] == a for a, i in shapes_vqa.ANSWER_INDEX.items())


def test_questions_have_the_examples_answers_and_cover_every_type_and_phrasing():
    rng = np.random.default_rng(0)
    seen_types, seen_phrasings = set(), set()
    for example in _examples():
        question, answer, qtype = shapes_vqa.ask(example, rng)
        name = shapes_vqa.QUESTION_TYPES[qtype]
        field, names = shapes_vqa.FACTORS[name]
        assert answer == names[int(example[field])] and question in shapes_vqa.PHRASINGS[name]
        seen_types.add(name)
        seen_phrasings.add(question)
    assert seen_types == set(shapes_vqa.QUESTION_TYPES)
    assert seen_phrasings == {p for ps in shapes_vqa.PHRASINGS.values() for p in ps}


def test_pp_op_outputs_tokens_answer_id_and_is_deterministic_per_rng():
    tokenizer = tokenizers.build_tokenizer({"name": "shapes_wordpiece", "context_length": 16})
    pp = Preprocess(PP, tokenizer)
    example = _examples(1)[0]
    out = pp(example, np.random.default_rng(7))
    assert out["answer"] == shapes_vqa.ANSWERS[out["answer_id"]] and out["answer_id"].dtype == np.int32
    assert tokenizer.decode(out["text"]) == out["question"] and out["text"].shape == (16,)
    again = pp(example, np.random.default_rng(7))
    assert again["question"] == out["question"] and again["question_type"] == out["question_type"]
    for phrasings in shapes_vqa.PHRASINGS.values():        # the vocabulary has every question word
        ids = tokenizer(list(phrasings))
        assert not np.any(ids == tokenizer.unk_token_id)


def test_question_types_are_balanced_over_examples():
    pp = Preprocess("shapes_question", None)
    counts = np.bincount([pp(e, np.random.default_rng(i))["question_type"] for i, e in enumerate(_examples(400))],
                         minlength=4)
    assert counts.min() > 60, counts


def test_errors_name_the_problem():
    with pytest.raises(KeyError, match="needs the example field"):
        shapes_vqa.ask({"image": np.zeros((4, 4, 3))}, np.random.default_rng(0))
    bad = {"color": 9, "shape": 9, "size": 9, "position": 99}
    with pytest.raises(ValueError, match="is not one of"):
        shapes_vqa.ask(bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="bad arguments"):
        Preprocess("shapes_question(colour='x')")
