"""The one interface between a model and the generation loop.

A `Decoder` runs the model on new tokens against a cache of fixed size:

    init_cache(params, batch, length, inputs) -> cache       an empty cache for `length` tokens
    prefill(params, cache, tokens, positions, key_mask, inputs) -> (logits, cache)
    step(params, cache, tokens, positions, key_mask, inputs) -> (logits, cache)
    cache_layout(path, leaf) -> LeafLayout                    where each cache leaf keeps its batch

`tokens` / `positions` are (batch, new tokens) — the whole (left-aligned) prompt for `prefill`,
one token for `step`; the new tokens are written at the cache's own index. `key_mask` (batch,
length) marks the cache slots that hold real tokens (prompt padding is False). `inputs` is a dict
of per-example arrays (leading batch axis) the model conditions on, e.g. the encoder states a
cross-attending decoder reads (`context`, `context_mask`). logits are (batch, new tokens, vocab).
Decoder-only, encoder–decoder and cross-attending decoders (BLIP) fit this one shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.generate.cache_layout import LeafLayout, layers_cache_layout


class Decoder(Protocol):
    def init_cache(self, params: Any, batch_size: int, length: int, inputs: Mapping[str, jax.Array]) -> Any: ...

    def prefill(self, params: Any, cache: Any, tokens: jax.Array, positions: jax.Array, key_mask: jax.Array,
                inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]: ...

    def step(self, params: Any, cache: Any, tokens: jax.Array, positions: jax.Array, key_mask: jax.Array,
             inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]: ...

    def cache_layout(self, path: tuple, leaf: Any) -> LeafLayout: ...


@dataclasses.dataclass(frozen=True)
class FlaxDecoder:
    """A flax module that follows the `decode=True` convention of `mmjax.layers` as a Decoder.

    The module's `method` (default `__call__`) is called as
    `method(tokens, positions=..., mask=key_mask, decode=True, **inputs)` and returns logits
    (batch, tokens, vocab), or a tuple / dict whose first element / "logits" entry they are.
    Inputs named in `prefill_only` (cross-attention's `context`, projected once into the cache)
    reach the prefill call only.
    """

    module: nn.Module
    method: str | None = None
    prefill_only: tuple[str, ...] = ("context",)

    def _apply(self, params, cache, tokens, positions, key_mask, inputs):
        variables = {"params": params} if cache is None else {"params": params, "cache": cache}
        out, state = self.module.apply(variables, tokens, positions=positions, mask=key_mask, decode=True,
                                       mutable=["cache"], method=self.method, **inputs)
        if isinstance(out, Mapping):
            out = out["logits"]
        elif isinstance(out, tuple):
            out = out[0]
        return out, state["cache"]

    def init_cache(self, params: Any, batch_size: int, length: int, inputs: Mapping[str, jax.Array]) -> Any:
        """Zeros shaped as the cache a full-length decode-mode call creates (traced, never run)."""
        tokens = jnp.zeros((batch_size, length), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
        key_mask = jnp.ones((batch_size, length), bool)
        shapes = jax.eval_shape(lambda p, i: self._apply(p, None, tokens, positions, key_mask, i)[1],
                                params, dict(inputs))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def prefill(self, params, cache, tokens, positions, key_mask, inputs):
        return self._apply(params, cache, tokens, positions, key_mask, dict(inputs))

    def step(self, params, cache, tokens, positions, key_mask, inputs):
        kept = {k: v for k, v in inputs.items() if k not in self.prefill_only}
        return self._apply(params, cache, tokens, positions, key_mask, kept)

    def cache_layout(self, path: tuple, leaf: Any) -> LeafLayout:
        return layers_cache_layout(path, leaf)
