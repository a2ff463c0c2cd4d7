"""Shared helpers of the tests/layers tests."""

import flax.linen as nn
import jax
import numpy as np


def random_params(module, *args, seed: int, scale: float = 0.3, **kwargs):
    """Random normal params with the module's own tree (traced with eval_shape, never initialised),
    so zero-initialised biases cannot hide bugs."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), shapes["params"])


def as_float64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
