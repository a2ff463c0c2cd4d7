"""softmax(q k^T / sqrt(d) + bias) v with a hand-written backward, for attention_impl="xla".

Why not plain autodiff: it keeps the (batch, heads, q, k) probabilities alive from forward to
backward and normalises them element by element. Here the forward divides the (q, d) output by
the row sums instead ("late normalisation", one pass fewer over the (q, k) logits) and saves
only the output and two numbers per row (max and 1/sum); the backward recomputes the
probabilities from those, as flash attention does. On XLA:CPU this runs the ViT-B/16 attention
core (batch 8) in 6.6 instead of 10.8 ms forward; the saved residuals shrink from O(q*k) to
O(q*d) per head.

Arrays are heads-leading: q (batch, heads, q_len, head_dim), k/v (batch, heads, k_len, head_dim).
Logits, softmax statistics and accumulation are float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min     # masked logits, as jax.nn.dot_product_attention's XLA path


def _logits(q, k, bias, mask):
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG)
    return logits


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reverse of broadcasting `shape` to x.shape: the gradient of a broadcast bias."""
    x = x.sum(tuple(range(x.ndim - len(shape))))
    keep = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape)) if n == 1 and m != 1)
    return x.sum(keep, keepdims=True)


@jax.custom_vjp
def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
           mask: jax.Array | None) -> jax.Array:
    """Attention output (batch, heads, q_len, head_dim) in v's dtype. `bias` is added to the
    logits and `mask` (True = may attend) is applied after it; both broadcast to
    (batch, heads, q_len, k_len) and may be None. A row with no allowed key attends uniformly,
    as in jax.nn.dot_product_attention."""
    return _forward(q, k, v, bias, mask)[0]


def _forward(q, k, v, bias, mask):
    logits = _logits(q, k, bias, mask)
    row_max = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    weights = jnp.exp(logits - row_max)
    row_sum = weights.sum(-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (out / row_sum).astype(v.dtype)
    # row max and 1/row sum rather than their log-sum-exp: at the float32 minimum (a row with
    # every key masked) max + log(sum) rounds back to the max and the probabilities come out wrong.
    return out, (q, k, v, bias, mask, out, row_max, 1.0 / row_sum)


def _backward(residuals, d_out):
    q, k, v, bias, mask, out, row_max, inv_row_sum = residuals
    probs = jnp.exp(_logits(q, k, bias, mask) - row_max) * inv_row_sum
    d_v = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_logits = probs * (d_probs - row_dot)
    if mask is not None:                        # masked logits are constants: no gradient flows
        d_logits = jnp.where(mask, d_logits, 0.0)
    scale = q.shape[-1] ** -0.5
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k, preferred_element_type=jnp.float32) * scale
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q, preferred_element_type=jnp.float32) * scale
    d_bias = None if bias is None else _sum_to_shape(d_logits, bias.shape).astype(bias.dtype)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias, None


attend.defvjp(_forward, _backward)
