"""Top-1 accuracy of a classifier over a labelled split (the ViT / BEiT fine-tuning metric)."""

from __future__ import annotations

from typing import Any

import ml_collections
from jax.sharding import Mesh

from mmjax.evaluate import classification, split
from mmjax.evaluate.drivers import SPLIT_OPTIONS, column

NEEDS = ("classify",)
OPTIONS = SPLIT_OPTIONS
REQUIRED = ("data", "pp")


def metric_name(name: str) -> str:
    """"top1" for the evaluator named top1 (metrics.jsonl's name since the start), else NAME/top1."""
    return "top1" if name == "top1" else f"{name}/top1"


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    from mmjax.data import sources  # the data stack is only needed once evaluation runs

    names = sources.class_names(cfg.data)   # folder names, class_names_file or TFDS's
    correct = counted = 0
    for batch, logits in split.run_over_split(cfg, mesh, lambda b: task.classify(params, b["image"]),
                                              name=f"evals.{name}"):
        if names and len(names) > logits.shape[-1]:
            raise ValueError(f"evals.{name} data has {len(names)} classes but the model has "
                             f"model.num_classes={logits.shape[-1]}")
        c, n = classification.top1(logits, column(batch, "label", name))
        correct, counted = correct + c, counted + n
    return {metric_name(name): correct / max(counted, 1)}
