"""Image–text contrastive loss against momentum features and feature queues (ALBEF's ITC).

MoCo (He et al. 2020) and ALBEF (Li et al. 2021, Sec. 3.2) score each online embedding against
the *momentum* encoder's embeddings of the batch plus a queue of momentum embeddings from past
batches: the negatives outnumber the batch without a larger batch, and they drift slowly because
the momentum encoder does. Row i's positive is the momentum embedding of its own pair (column i).

With `distill` = α > 0 the one-hot targets are softened towards the momentum model's own
similarity distribution (ALBEF's momentum distillation: α·softmax(s_m) + (1 - α)·onehot).

Pure functions on global arrays: under `jax.jit` with the batch sharded over the data axes XLA
inserts the gathers, so the loss over a sharded batch equals the loss on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(online: jax.Array, momentum: jax.Array, queue: jax.Array, what: str) -> None:
    if online.ndim != 2 or online.shape != momentum.shape:
        raise ValueError(f"{what}: online and momentum embeddings must both be (N, D); got "
                         f"{online.shape} and {momentum.shape}")
    if queue.ndim != 2 or queue.shape[1] != online.shape[1]:
        raise ValueError(f"{what}: the queue must be (Q, D={online.shape[1]}); got {queue.shape}")


def _one_direction(online: jax.Array, momentum_all: jax.Array, momentum: jax.Array, scale: jax.Array,
                   distill: float) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of `online` (N, D) against the N + Q keys `momentum_all`; (loss, top-1)."""
    n, total = online.shape[0], momentum_all.shape[0]
    logits = scale * jnp.einsum("nd,kd->nk", online.astype(jnp.float32), momentum_all.astype(jnp.float32))
    targets = jax.nn.one_hot(jnp.arange(n), total, dtype=jnp.float32)
    if distill:
        teacher = scale * jnp.einsum("nd,kd->nk", momentum.astype(jnp.float32), momentum_all.astype(jnp.float32))
        targets = distill * jax.nn.softmax(jax.lax.stop_gradient(teacher), axis=-1) + (1.0 - distill) * targets
    loss = -jnp.sum(jax.nn.log_softmax(logits, axis=-1) * targets, axis=-1).mean()
    top1 = (jnp.argmax(logits, axis=-1) == jnp.arange(n)).mean()
    return loss, top1


def itc_queue_loss(zimg: jax.Array, ztxt: jax.Array, zimg_m: jax.Array, ztxt_m: jax.Array,
                   image_queue: jax.Array, text_queue: jax.Array, scale: jax.Array,
                   distill: float = 0.0) -> tuple[jax.Array, dict]:
    """Symmetric ITC: images against [momentum texts of the batch; text queue] and vice versa.

    zimg, ztxt: online L2-normalised embeddings (N, D); zimg_m, ztxt_m: the momentum encoder's
    (N, D), treated as constants; image_queue, text_queue: (Q, D) past momentum embeddings;
    scale: the inverse temperature. Returns (mean of both directions, metrics).
    """
    _check(zimg, zimg_m, image_queue, "images")
    _check(ztxt, ztxt_m, text_queue, "texts")
    zimg_m, ztxt_m = jax.lax.stop_gradient(zimg_m), jax.lax.stop_gradient(ztxt_m)
    texts_all = jnp.concatenate([ztxt_m, jax.lax.stop_gradient(text_queue).astype(ztxt_m.dtype)])
    images_all = jnp.concatenate([zimg_m, jax.lax.stop_gradient(image_queue).astype(zimg_m.dtype)])
    i2t, i2t_top1 = _one_direction(zimg, texts_all, zimg_m, scale, distill)
    t2i, _ = _one_direction(ztxt, images_all, ztxt_m, scale, distill)
    return (i2t + t2i) / 2, {"i2t_loss": i2t, "t2i_loss": t2i, "batch_i2t_top1": i2t_top1}


def enqueue(queue: jax.Array, features: jax.Array, pointer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes `features` (N, D) over the oldest N rows of `queue` (Q, D) at `pointer`; returns
    (queue, next pointer). Q must be a multiple of N, so a batch never wraps around the end."""
    size, n = queue.shape[0], features.shape[0]
    if size % n:
        raise ValueError(f"The queue holds {size} rows, not a multiple of the batch of {n}: set the "
                         "queue size to a multiple of the global batch size")
    queue = jax.lax.dynamic_update_slice(queue, features.astype(queue.dtype), (pointer, jnp.zeros_like(pointer)))
    return queue, (pointer + n) % size
