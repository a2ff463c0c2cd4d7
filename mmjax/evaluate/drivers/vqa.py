"""Visual question answering: the task answers each tokenized question ("text") about its image,
scored with VQA v2's soft accuracy (mmjax.evaluate.vqa_score) against the human answers.

`answers_key` holds one string per example (10 identical annotators: right or wrong) or an array
of up to 10 (VQA v2's annotators; "" entries are padding: lists of unequal length must be padded
to one length, since the pipeline stacks them). With an int `question_type` field and
the option `question_types` (its names), accuracy is also reported per type.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.evaluate import split, vqa_score
from mmjax.evaluate.drivers import SPLIT_OPTIONS, column

NEEDS = ("answer",)
OPTIONS = SPLIT_OPTIONS + ("answers_key", "question_types")
REQUIRED = ("data", "pp")
ANNOTATORS = 10


def human_answers(value: Any, index: int, name: str, key: str) -> list[str]:
    """One example's human answers: a string counts as 10 identical annotators."""
    if np.ndim(value) == 0:
        answers = [str(value)] * ANNOTATORS
    else:
        answers = [str(a) for a in np.asarray(value).ravel() if str(a).strip()]
    if not answers or not answers[0].strip():
        raise ValueError(f"evals.{name}: example {index} has no answer in {key!r}")
    return answers


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    key = cfg.get("answers_key", "answer")
    type_names = list(cfg.get("question_types") or [])

    def answer(batch):
        answers = [str(a) for a in task.answer(params, batch["image"], column(batch, "text", name))]
        if len(answers) != batch["image"].shape[0]:
            raise ValueError(f"evals.{name}: {type(task).__name__}.answer returned {len(answers)} answers for "
                             f"{batch['image'].shape[0]} questions")
        return np.asarray(answers, dtype=str)

    scores, types = [], []
    for batch, predicted in split.run_over_split(cfg, mesh, answer, tokenizer=task.tokenizer, name=f"evals.{name}"):
        for p, a in zip(predicted, column(batch, key, name)):
            scores.append(vqa_score.vqa_accuracy(str(p), human_answers(a, len(scores), name, key)))
        if type_names:
            types.append(np.asarray(column(batch, "question_type", name)).astype(int))
    scores = np.asarray(scores, np.float64)
    out = {f"{name}/accuracy": float(scores.mean())}
    if type_names:
        types = np.concatenate(types)
        if types.min() < 0 or types.max() >= len(type_names):
            raise ValueError(f"evals.{name}.question_types names {len(type_names)} types, but question_type "
                             f"holds values in [{types.min()}, {types.max()}]")
        for i, type_name in enumerate(type_names):
            if (types == i).any():
                out[f"{name}/accuracy_{type_name}"] = float(scores[types == i].mean())
    return out
