"""Train state shared by the momentum tasks (ALBEF, BLIP, momentum CLIP): an EMA copy of the
parameters and ring-buffer queues of momentum embeddings.

ALBEF and BLIP keep m ← decay·m + (1 − decay)·θ for their momentum towers and, per modality, a
queue of the last Q momentum embeddings (MoCo's queue, filled with random unit vectors at the
start). Both live in the task's extra train state (mmjax.tasks.base), so they are sharded,
checkpointed and restored with the parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses import contrastive_queue


def check_queue_size(queue_size: Any, batch_size: int, key: str = "momentum.queue_size") -> int:
    """The queue length as an int; it must be a positive multiple of the global batch (one batch
    is enqueued per step, so the write pointer wraps exactly)."""
    size = int(queue_size or 0)
    if size <= 0 or size % batch_size:
        raise ValueError(f"{key}={queue_size} must be a positive multiple of the global batch size "
                         f"input.batch_size={batch_size} (one batch is enqueued per step)")
    return size


def check_decay(decay: float, key: str = "momentum.decay") -> float:
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"{key} must be in [0, 1), got {decay}")
    return decay


def ema_copy(params: Any) -> Any:
    """A copy of (boxed) parameters that shards like them: the momentum model at step 0."""
    return jax.tree.map(jnp.copy, params)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """decay·ema + (1 − decay)·params, with no gradient into params (ALBEF/BLIP's _momentum_update)."""
    return jax.tree.map(lambda m, p: decay * m + (1.0 - decay) * jax.lax.stop_gradient(p), ema, params)


def init_queues(rng: jax.Array, size: int, dim: int, names: tuple[str, ...] = ("image", "text")) -> dict:
    """{name: (size, dim) random unit vectors for each name, "pointer": 0}. Queues are replicated:
    every device scores its rows against the whole queue."""
    out: dict[str, Any] = {}
    for name, key in zip(names, jax.random.split(rng, len(names))):
        unit = jax.random.normal(key, (size, dim))
        unit = unit / jnp.sqrt(jnp.maximum(jnp.sum(unit * unit, axis=-1, keepdims=True), 1e-12))
        out[name] = nn.LogicallyPartitioned(unit, (None, None))
    out["pointer"] = jnp.zeros((), jnp.int32)
    return out


def enqueue_all(queues: dict, **features: jax.Array) -> dict:
    """The queues with each named (N, dim) batch of features written at the pointer, which then
    advances by N (mod the queue length); every queue named in `queues` must be given."""
    missing = sorted(set(queues) - {"pointer"} - set(features))
    if missing:
        raise ValueError(f"enqueue_all: no features given for queue(s) {missing}")
    new: dict[str, Any] = {}
    pointer = queues["pointer"]
    for name, feats in features.items():
        new[name], new_pointer = contrastive_queue.enqueue(queues[name], jax.lax.stop_gradient(feats), pointer)
    new["pointer"] = new_pointer
    return new
