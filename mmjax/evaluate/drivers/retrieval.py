"""Image↔text retrieval recall@K over the paired images and captions of a split."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.evaluate import retrieval, split
from mmjax.evaluate.drivers import SPLIT_OPTIONS

NEEDS = ("embed_images", "embed_texts")
OPTIONS = SPLIT_OPTIONS + ("ks",)
REQUIRED = ("data", "pp")


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    def embed(batch):
        return task.embed_images(params, batch["image"]), task.embed_texts(params, batch["text"])

    images, texts = [], []
    for _, (i, t) in split.run_over_split(cfg, mesh, embed, tokenizer=task.tokenizer, name=f"evals.{name}"):
        images.append(i)
        texts.append(t)
    recalls = retrieval.recall_at_k(np.concatenate(images), np.concatenate(texts), cfg.get("ks", (1, 5, 10)))
    return {f"{name}/{k}": v for k, v in recalls.items()}
