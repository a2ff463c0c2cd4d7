"""Score processing before a token is chosen, as transformers' logits processors and warpers:
repetition penalty, minimum length, then (sampling only) temperature, top-k and top-p. Pure
functions on (rows, vocab) float32 scores; removed tokens get -inf."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.generate.config import Knobs, Static

NEG_INF = -jnp.inf


def seen_tokens(tokens: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """(rows, vocab) True where the token occurs at a valid position of `tokens` (rows, length)."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    ids = jnp.where(valid, jnp.clip(tokens, 0, vocab_size), vocab_size)   # invalid → a dropped column
    return jnp.zeros((tokens.shape[0], vocab_size + 1), bool).at[rows, ids].set(True)[:, :vocab_size]


def repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' positive scores divided, negative ones
    multiplied by `penalty`."""
    penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalized, scores)


def forbid_stop_before(scores: jax.Array, stop_ids: tuple[int, ...], length: jax.Array,
                       min_length: jax.Array) -> jax.Array:
    """No stop token while the sequence (`length` tokens so far) is shorter than `min_length`."""
    if not stop_ids:
        return scores
    is_stop = jnp.zeros(scores.shape[-1], bool).at[jnp.asarray(stop_ids)].set(True)
    return jnp.where(is_stop & (length < min_length), NEG_INF, scores)


def top_k_filter(scores: jax.Array, k: int) -> jax.Array:
    """Keeps the k best scores (and any tied with the k-th)."""
    k = min(k, scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, NEG_INF, scores)


def top_p_filter(scores: jax.Array, top_p: jax.Array, min_keep: int = 1) -> jax.Array:
    """Nucleus filtering (Holtzman et al. 2020): keeps the smallest set of best tokens whose
    probability reaches `top_p` (at least `min_keep`)."""
    order = jnp.argsort(scores, axis=-1)                       # ascending
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    mass_below = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = mass_below <= 1.0 - top_p
    remove = remove.at[..., -min_keep:].set(False)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, NEG_INF, scores)


def process(scores: jax.Array, tokens: jax.Array, valid: jax.Array, length: jax.Array, static: Static,
            knobs: Knobs, min_keep: int = 1) -> jax.Array:
    """All processing in transformers' order. `tokens` (rows, buffer) with `valid` marking the
    sequence's real tokens so far; `length`: tokens so far, prompt padding counted."""
    scores = scores.astype(jnp.float32)
    if static.repetition_penalty:
        scores = repetition_penalty(scores, seen_tokens(tokens, valid, scores.shape[-1]), knobs.repetition_penalty)
    scores = forbid_stop_before(scores, static.eos_token_id, length, knobs.min_length)
    if not static.do_sample:
        return scores
    scores = scores / knobs.temperature
    if static.top_k:
        scores = top_k_filter(scores, max(static.top_k, min_keep))
    if static.top_p:
        scores = top_p_filter(scores, knobs.top_p, min_keep)
    return scores
