"""The "cache" collection of attention for decoding one step at a time (flax's `decode=True`
convention, as flax's examples and MaxText): fixed shapes, so each step reuses one compilation.

Self-attention: `cached_key` / `cached_value` (batch, max_len, kv_heads, head_dim) and
`cache_index` (the number of tokens written). Initialising the model with decode=True and a
full-length input sizes the cache (and runs an ordinary forward); each later call with
mutable=["cache"] writes its tokens at the index and lets every query see the cached keys up to
its own position. Cross-attention: `cross_key` / `cross_value`, written by the call that passes
the context and reused by calls that pass none.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

COLLECTION = "cache"


def index(module: nn.Module) -> jax.Array:
    """How many tokens the module's self-attention cache holds (0 before the first write)."""
    if not module.has_variable(COLLECTION, "cache_index"):
        return jnp.zeros((), jnp.int32)
    return module.get_variable(COLLECTION, "cache_index")


def append_keys_values(module: nn.Module, k: jax.Array, v: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Writes this call's keys/values at the cache index and returns (all cached keys, values,
    the (1, 1, q_len, max_len) mask of the keys each query may see). While initialising (no
    cache yet) the cache is created at this input's size and the call's own k, v are returned
    with no mask, so init is an ordinary causal forward."""
    initialized = module.has_variable(COLLECTION, "cached_key")
    cached_k = module.variable(COLLECTION, "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = module.variable(COLLECTION, "cached_value", jnp.zeros, v.shape, v.dtype)
    position = module.variable(COLLECTION, "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
        return k, v, None
    length, max_len = k.shape[1], cached_k.value.shape[1]
    if length > max_len:
        raise ValueError(f"{length} new tokens do not fit a key/value cache of {max_len}")
    start = position.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, start, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, start, 0, 0))
    position.value = start + length
    query_positions = start + jnp.arange(length)
    visible = jnp.arange(max_len)[None, :] <= query_positions[:, None]
    return cached_k.value, cached_v.value, visible[None, None]


def cross_keys_values(module: nn.Module, context: jax.Array | None,
                      project: Callable[[jax.Array], tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys/values: projected from `context` and stored when it is given, read
    back from the cache when it is None (the context is projected once per sequence)."""
    if context is not None:
        k, v = project(context)
        module.variable(COLLECTION, "cross_key", jnp.zeros, k.shape, k.dtype).value = k
        module.variable(COLLECTION, "cross_value", jnp.zeros, v.shape, v.dtype).value = v
        return k, v
    if not module.has_variable(COLLECTION, "cross_key"):
        raise ValueError("Cross-attention without a context needs its keys/values in the cache: "
                         "pass the context on the first decoding call")
    return module.get_variable(COLLECTION, "cross_key"), module.get_variable(COLLECTION, "cross_value")


class SlotCounter(nn.Module):
    """The number of tokens earlier decoding calls wrote into the cache (a model's own position
    counter, for positions computed outside attention): returns it and adds this call's `length`.
    Stays 0 while initialising, as the attention cache."""

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        initialized = self.has_variable(COLLECTION, "position")
        written = self.variable(COLLECTION, "position", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return jnp.zeros((), jnp.int32)
        start = written.value
        written.value = start + length
        return start
