"""Linear probes on frozen image features: fit on a `train` split, top-1 on a `test` split, one
probe per integer label column (MAE's `probe/label_top1`, `probe/position_top1`)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.evaluate import linear_probe, split
from mmjax.evaluate.drivers import column

NEEDS = ("image_features",)
OPTIONS = ("train", "test", "labels", "feature", "steps", "lr")
REQUIRED = ("train", "test")


def _features(task, params, mesh, cfg, feature: str, labels: tuple[str, ...], name: str):
    xs, ys = [], {k: [] for k in labels}
    for batch, x in split.run_over_split(cfg, mesh, lambda b: task.image_features(params, b["image"], feature),
                                         name=f"evals.{name}"):
        xs.append(x)
        for k in labels:
            ys[k].append(column(batch, k, name))
    return np.concatenate(xs), {k: np.concatenate(v) for k, v in ys.items()}


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    feature = cfg.get("feature", "gap")
    labels = tuple(cfg.get("labels", ("label",)))
    x, y = _features(task, params, mesh, cfg.train, feature, labels, f"{name}.train")
    xt, yt = _features(task, params, mesh, cfg.test, feature, labels, f"{name}.test")
    steps, lr = int(cfg.get("steps", 300)), float(cfg.get("lr", 0.05))
    return {f"{name}/{k}_top1": linear_probe.fit_and_score(x, y[k], xt, yt[k], int(max(y[k].max(), yt[k].max())) + 1,
                                                          steps=steps, lr=lr) for k in labels}
