"""Boolean attention masks (True = the query may attend to the key), broadcastable to
(batch, heads, q_len, k_len), and how they combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(length: int) -> jax.Array:
    """(1, 1, L, L) boolean mask: True where a query may attend to a key."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def padding_mask(valid: jax.Array) -> jax.Array:
    """Key-padding mask (B, 1, 1, K) from a (B, K) boolean array of valid keys."""
    return valid.astype(bool)[:, None, None, :]


def as_attention_mask(mask: jax.Array | None) -> jax.Array | None:
    """A (B, K) array of valid keys becomes a key-padding mask; a 4-D mask is kept as it is."""
    if mask is None:
        return None
    if mask.ndim == 2:
        return padding_mask(mask)
    if mask.ndim != 4:
        raise ValueError(f"An attention mask is (batch, keys) valid keys or broadcastable to "
                         f"(batch, heads, queries, keys); got shape {mask.shape}")
    return mask.astype(bool)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (None if all are)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out
