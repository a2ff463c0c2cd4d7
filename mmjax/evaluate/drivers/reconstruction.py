"""Masked-modeling losses on a split with fixed masks (MAE's pixel loss, BEiT's token loss and
accuracy): the one reconstruction loop for every family that can `reconstruct`."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.evaluate import split
from mmjax.evaluate.drivers import SPLIT_OPTIONS

NEEDS = ("reconstruct",)
OPTIONS = SPLIT_OPTIONS + ("seed",)
REQUIRED = ("data", "pp")


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    """NAME/METRIC = sum over the split of the task's per-example METRIC / sum of its "count".

    Batch i masks with fold_in(key(seed), i), so evaluations of different steps see the same masks.
    """
    key = jax.random.key(int(cfg.get("seed", 0)))
    batches = itertools.count()

    def predict(batch):
        return task.reconstruct(params, batch["image"], jax.random.fold_in(key, next(batches)))

    totals: dict[str, float] = {}
    for _, stats in split.run_over_split(cfg, mesh, predict, name=f"evals.{name}"):
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + float(np.sum(v, dtype=np.float64))
    count = max(totals.pop("count"), 1.0)
    return {f"{name}/{k}": v / count for k, v in totals.items()}
