"""Image↔text retrieval recall@K over the paired images and captions of a split.

With `attribute_words` (as the captioning evaluator's) it also reports NAME/consistent_*: recall
where any caption true of the image counts, not only its own (mmjax.evaluate.attributes); the pp
must keep the raw `caption` and the attribute fields."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.evaluate import attributes, retrieval, split
from mmjax.evaluate.drivers import SPLIT_OPTIONS, column

NEEDS = ("embed_images", "embed_texts")
OPTIONS = SPLIT_OPTIONS + ("ks", "attribute_words")
REQUIRED = ("data", "pp")


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    def embed(batch):
        return task.embed_images(params, batch["image"]), task.embed_texts(params, batch["text"])

    words = dict(cfg.get("attribute_words") or {})
    images, texts, columns = [], [], []
    for batch, (i, t) in split.run_over_split(cfg, mesh, embed, tokenizer=task.tokenizer, name=f"evals.{name}"):
        images.append(i)
        texts.append(t)
        if words:
            columns.append(attributes.caption_columns(batch, words, lambda b, k: column(b, k, name)))
    ks = cfg.get("ks", (1, 5, 10))
    sims = retrieval.similarities(np.concatenate(images), np.concatenate(texts))
    out = {f"{name}/{k}": v for k, v in retrieval.recall_from_scores(sims, sims.T, ks).items()}
    if words:
        consistent = attributes.consistent_recalls(columns, sims, sims.T, words, ks)
        out.update({f"{name}/consistent_{k}": v for k, v in consistent.items()})
    return out
