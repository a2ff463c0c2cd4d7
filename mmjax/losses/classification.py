"""Classification losses on logits (float32) and labels: integer class ids, or soft targets
(float, one distribution per example, e.g. from mixup / CutMix)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def targets(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Float targets shaped like `logits`: one-hot of integer `labels` (shape logits.shape[:-1]),
    or float `labels` (shape logits.shape) as they are."""
    if logits.ndim < 2:
        raise ValueError(f"Expected logits shaped (..., classes), got {logits.shape}")
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"Integer labels must be shaped logits.shape[:-1] = {logits.shape[:-1]}; "
                             f"got labels {labels.shape} for logits {logits.shape}")
        return jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != logits.shape:
            raise ValueError(f"Soft (float) targets must be shaped like the logits {logits.shape}; "
                             f"got {labels.shape}")
        return labels.astype(jnp.float32)
    raise ValueError(f"Labels must be integer class ids or float soft targets, got dtype {labels.dtype}")


def softmax_xent(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy, with optional label smoothing (also of soft targets:
    (1 - s) · t + s / classes, which is what timm folds into mixed targets)."""
    y = targets(logits, labels)
    if label_smoothing:
        y = optax.smooth_labels(y, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), y).mean()


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-class binary cross-entropy summed over classes, mean over the batch (big_vision)."""
    y = targets(logits, labels)
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), y).sum(-1).mean()


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}
