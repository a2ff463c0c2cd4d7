"""Linear probe: multinomial logistic regression on frozen features, scored by test top-1.

Features are standardised with the training split's statistics (the MAE paper puts a
non-affine BatchNorm before its probe for the same reason), then a linear classifier is fit
full-batch with Adam and a small L2 penalty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  num_classes: int, *, steps: int = 300, lr: float = 0.05, l2: float = 1e-4) -> float:
    """Trains on (train_x, train_y) and returns top-1 accuracy on (test_x, test_y)."""
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"linear probe needs (N, D) features with equal D, got {train_x.shape} and {test_x.shape}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("linear probe: features and labels differ in length")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    y = jnp.asarray(train_y, jnp.int32)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    tx = optax.adam(lr)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(p["w"] ** 2)

    def step(carry, _):
        p, state = carry
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    predicted = np.asarray(jnp.argmax(xt @ params["w"] + params["b"], axis=-1))
    return float((predicted == np.asarray(test_y)).mean())
