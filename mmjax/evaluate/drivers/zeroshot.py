"""Zero-shot classification: class prompts through the text tower, images through the image
tower, each image assigned to its nearest class (CLIP's ImageNet protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.evaluate import split, zeroshot
from mmjax.evaluate.drivers import SPLIT_OPTIONS, column

NEEDS = ("embed_images", "embed_texts")
OPTIONS = SPLIT_OPTIONS + ("templates", "class_names")
REQUIRED = ("data", "pp", "templates")
TEXT_BATCH = 256


def embed_strings(task: Any, params: Any, texts: Sequence[str], mesh: Mesh | None = None,
                  batch_size: int = TEXT_BATCH) -> np.ndarray:
    """Embeds strings with the task's tokenizer and `embed_texts`, in fixed-size chunks (one
    compiled shape). With a `mesh` the tokens are replicated over it, as params that span
    processes require."""
    if task.tokenizer is None:
        raise ValueError(f"{type(task).__name__} has no text tokenizer to embed strings with")
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        tokens = task.tokenizer(chunk + [""] * (batch_size - len(chunk)))
        tokens = jnp.asarray(tokens) if mesh is None else split.put_replicated(tokens, mesh)
        out.append(np.asarray(split.fetch(task.embed_texts(params, tokens)))[:len(chunk)])
    return np.concatenate(out)


def class_names(cfg: ml_collections.ConfigDict, name: str) -> list[str]:
    """evals.NAME.class_names, else the data set's own (folder names, class_names_file, TFDS)."""
    from mmjax.data import sources  # the data stack is only needed once evaluation runs

    own = sources.class_names(cfg.data)
    names = list(cfg.get("class_names") or own or [])
    if not names:
        raise ValueError(f"Zero-shot eval on {cfg.data.name} needs class names: the data set has "
                         f"no 'label' ClassLabel feature or class folders; set evals.{name}.class_names "
                         f"or evals.{name}.data.class_names_file")
    if own and len(own) != len(names):
        raise ValueError(f"evals.{name}.class_names has {len(names)} names, but the data set has "
                         f"{len(own)} classes")
    return names


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    names = class_names(cfg, name)
    class_embs = zeroshot.class_embeddings(lambda texts: embed_strings(task, params, texts, mesh),
                                           names, list(cfg.templates))
    embs, labels = [], []
    for batch, emb in split.run_over_split(cfg, mesh, lambda b: task.embed_images(params, b["image"]),
                                           name=f"evals.{name}"):
        embs.append(emb)
        labels.append(column(batch, "label", name))
    top1 = zeroshot.zeroshot_top1(np.concatenate(embs), np.concatenate(labels), class_embs)
    return {f"{name}/top1": top1, f"{name}/num_classes": len(names)}
