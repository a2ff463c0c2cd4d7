"""The vqa evaluator with a stand-in task that answers from a table, on an in-memory split whose
10 annotator answers are built so that each question's VQA v2 score is known: a prediction that
m annotators gave scores 0, 0.3, 0.6, 0.9 and 1 for m = 0, 1, 2, 3, >= 4 (leave-one-out)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from mmjax import sharding
from mmjax.data import sources, tokenizers
from mmjax.evaluate import runner
from mmjax.evaluate.drivers import vqa

MATCHES = np.array([0, 1, 2, 3, 4, 10, 5, 1, 0, 3, 2, 10, 7])
SCORE = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}
TYPES = np.arange(len(MATCHES)) % 3
DATA = {"name": "vqa_table", "split": "val"}


def _examples():
    rng = np.random.default_rng(0)
    out = []
    for i, m in enumerate(MATCHES):
        answers = ["two"] * int(m) + [f"{3 + j % 2}" for j in range(10 - int(m))]
        out.append({"image": rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
                    "question": "how many shapes are there", "answers": answers, "answer": "yes" if i % 2 else "no",
                    "question_type": int(TYPES[i])})
    return out


_row = jax.jit(lambda keys, x: jnp.argmax((x.reshape(len(x), -1)[:, None] == keys[None]).all(-1), axis=1))


class AnswerTableTask:
    """answer() looks the image up and returns that example's entry of `params["answers"]`."""

    def __init__(self):
        self.tokenizer = tokenizers.build_tokenizer({"name": "shapes_wordpiece", "context_length": 16})
        self.config = ConfigDict({"task": "table"})
        self.token_shapes = []

    def answer(self, params, images, tokens):
        self.token_shapes.append(tokens.shape)
        return [params["answers"][i] for i in np.asarray(_row(params["image_keys"], images))]


@pytest.fixture
def table(monkeypatch):
    examples = _examples()
    real = sources.get_source
    monkeypatch.setattr(sources, "get_source", lambda cfg: examples if cfg["name"] == "vqa_table" else real(cfg))
    keys = jnp.asarray(np.stack([e["image"] for e in examples]).reshape(len(examples), -1).astype(np.int32))
    return keys


def _run(keys, predictions, **options):
    cfg = ConfigDict({**dict(data=DATA, pp="tokenize(key='question', out='text')|"
                             "keep('image', 'text', 'answers', 'answer', 'question_type')",
                             batch_size=8, answers_key="answers"), **options})
    task = AnswerTableTask()
    got = vqa.run(task, {"image_keys": keys, "answers": predictions}, sharding.make_mesh([("data", -1)]), cfg, "vqa")
    return got, task


def test_soft_accuracy_counts_the_annotators_who_agree(table):
    got, task = _run(table, ["two"] * len(MATCHES), question_types=["count", "color", "where"])
    per_question = np.array([SCORE.get(int(m), 1.0) for m in MATCHES])
    assert got["vqa/accuracy"] == pytest.approx(per_question.mean())
    for t, name in enumerate(["count", "color", "where"]):
        assert got[f"vqa/accuracy_{name}"] == pytest.approx(per_question[np.equal(TYPES, t)].mean())
    assert set(task.token_shapes) == {(8, 16)}
    # The official normalisation, applied only where annotators disagree: there "2" and "Two." are
    # "two"; where all 10 said "two" (vqaEval.py compares the raw strings) they score 0.
    raw_compared_zero = per_question * (MATCHES != 10)
    assert _run(table, ["2"] * len(MATCHES))[0]["vqa/accuracy"] == pytest.approx(raw_compared_zero.mean())
    assert _run(table, ["Two."] * len(MATCHES))[0]["vqa/accuracy"] == pytest.approx(raw_compared_zero.mean())
    assert _run(table, ["five"] * len(MATCHES))[0]["vqa/accuracy"] == 0.0


def test_a_single_answer_string_is_right_or_wrong(table):
    right = ["yes" if i % 2 else "no" for i in range(len(MATCHES))]
    assert _run(table, right, answers_key="answer")[0] == {"vqa/accuracy": 1.0}
    half_wrong = ["yes"] * len(MATCHES)
    assert _run(table, half_wrong, answers_key="answer")[0]["vqa/accuracy"] == pytest.approx(6 / 13)


def test_bad_configs_are_named(table):
    with pytest.raises(ValueError, match=r"evals\.vqa: the evaluation split has no examples"):
        _run(table, ["two"] * len(MATCHES), max_examples=0)
    with pytest.raises(ValueError, match=r"evals\.vqa: no 'answers' in the evaluation batch"):
        _run(table, ["two"] * len(MATCHES), pp="tokenize(key='question', out='text')|keep('image', 'text')")
    with pytest.raises(ValueError, match=r"evals\.vqa\.question_types names 2 types, but question_type holds"):
        _run(table, ["two"] * len(MATCHES), question_types=["a", "b"])
    with pytest.raises(ValueError, match=r"evals\.vqa \(kind 'vqa'\): unknown key\(s\) \['answer_key'\]"):
        runner.evaluators(ConfigDict({"vqa": dict(data=DATA, pp="keep('image')", answer_key="answers")}))
