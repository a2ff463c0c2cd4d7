"""Classification losses on logits (float32) and integer labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _check(logits: jax.Array, labels: jax.Array) -> None:
    if logits.ndim < 2 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"Expected logits (..., classes) and integer labels of shape logits.shape[:-1]; "
                         f"got logits {logits.shape} and labels {labels.shape}")


def softmax_xent(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy, with optional label smoothing."""
    _check(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-class binary cross-entropy summed over classes, mean over the batch (big_vision)."""
    _check(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).sum(-1).mean()


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}
