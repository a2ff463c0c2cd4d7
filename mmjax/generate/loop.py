"""What every search loop shares: the per-call constants (`Run`), one decoding step on the last
written tokens, and the sharding annotations of the loop's state."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.generate import cache_layout
from mmjax.generate.config import Knobs, Static
from mmjax.generate.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class Run:
    """One generate call's constants. `key_mask` (rows, buffer) marks real cache slots (prompt
    padding False, generated positions True); `inputs` have one entry per row."""
    decoder: Decoder
    params: Any
    key_mask: jax.Array
    inputs: dict
    static: Static
    knobs: Knobs
    prompt_length: int

    @property
    def buffer_length(self) -> int:
        return self.key_mask.shape[1]

    def written(self, length: jax.Array) -> jax.Array:
        """(rows, buffer) the real tokens among the first `length` positions."""
        return self.key_mask & (jnp.arange(self.buffer_length) < length)

    def step(self, cache: Any, sequences: jax.Array, length: jax.Array, positions: jax.Array
             ) -> tuple[jax.Array, Any]:
        """Runs the model on each row's last written token (at `length` - 1); returns the next
        token's logits (rows, vocab) and the updated cache."""
        tokens = jax.lax.dynamic_slice_in_dim(sequences, length - 1, 1, axis=1)
        logits, cache = self.decoder.step(self.params, cache, tokens, positions[:, None], self.key_mask,
                                          self.inputs)
        return logits[:, -1], self.constrain_cache(cache)

    def constrain_cache(self, cache: Any) -> Any:
        return cache_layout.constrain(cache, self.decoder.cache_layout)


def by_rows(x: jax.Array) -> jax.Array:
    """Shards an array whose leading axis is the batch like activations (no-op without rules)."""
    return nn.with_logical_constraint(x, ("act_batch",) + (None,) * (x.ndim - 1))


def is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    if not stop_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_ids))
