"""Multi-head attention: self / cross, causal and padding masks, grouped-query heads, rotary
positions, a key/value cache for decoding, and a backend switch.

Separate q/k/v kernels shaped (embed, heads, head_dim) keep conversion from fused PyTorch qkv
weights a one-time split.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import attention_core, cache, masks
from mmjax.layers.common import Dtype, constrain, dense_init
from mmjax.layers.rotary import RotaryConfig, apply_rotary

ATTENTION_IMPLS = ("xla", "cudnn")
_HEADS = ("act_batch", "act_len", "act_heads", "act_kv")


def attention_heads_leading(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
                            mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(d) + bias) v on (batch, len, heads, head_dim) arrays.

    Same math as `jax.nn.dot_product_attention`'s XLA path (float32 logits and softmax, masked
    logits at the float32 minimum), but the attention matmuls run with (batch, heads) as
    leading batch dimensions, which XLA:CPU runs much faster than the (batch, len, heads)
    layout (ViT-B/16 attention block, batch 8, 2 cores: 54 -> 39 ms), and the core has a
    flash-style backward (see `attention_core`).
    """
    if causal:
        keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))   # query i sees keys 0..i
        mask = keep if mask is None else jnp.logical_and(mask, keep)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))      # (B, H, L, D)
    return attention_core.attend(q, k, v, bias, mask).transpose(0, 2, 1, 3)


class HeadsDense(nn.Module):
    """x (..., embed) → (..., heads, head_dim), kernel shaped (embed, heads, head_dim)."""

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        kernel = self.param("kernel", dense_init(("embed", "heads", "kv"), init),
                            (x.shape[-1], self.num_heads, self.head_dim))
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", dense_init(("heads", "kv"), nn.initializers.zeros),
                              (self.num_heads, self.head_dim))
            y = y + bias.astype(self.dtype)
        return y


class MergeHeadsDense(nn.Module):
    """x (..., heads, head_dim) → (..., features), kernel shaped (heads, head_dim, features)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        kernel = self.param("kernel", dense_init(("heads", "kv", "embed"), init),
                            (*x.shape[-2:], self.features))
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", dense_init(("embed",), nn.initializers.zeros), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    """Multi-head attention over `inputs_q` (self) or `inputs_kv` (cross).

    `num_kv_heads` < `num_heads` is grouped-query attention (query head h reads key/value head
    h // (num_heads / num_kv_heads), as LLaMA). `q_bias` ... `out_bias` switch each projection's
    bias. `rotary` rotates queries and keys by their `positions`. `decode=True` keeps keys and
    values in the "cache" collection (see `mmjax.layers.cache`): self-attention appends the new
    tokens at the cache index; cross-attention (`cross=True`) stores the context's keys/values
    when `inputs_kv` is given and reuses them when it is None. `attention_impl`: "xla" (runs
    everywhere; see `attention_heads_leading`) or "cudnn" (`jax.nn.dot_product_attention`'s GPU
    kernel).
    """

    num_heads: int
    head_dim: int | None = None
    out_dim: int | None = None
    num_kv_heads: int | None = None
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    out_bias: bool = True
    rotary: RotaryConfig | None = None
    cross: bool = False
    decode: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    def _check(self, width: int) -> tuple[int, int]:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; known: {ATTENTION_IMPLS}")
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv_heads}")
        return self.head_dim or width // self.num_heads, kv_heads

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask: jax.Array | None = None, bias: jax.Array | None = None,
                 causal: bool = False, positions: jax.Array | None = None) -> jax.Array:
        """`mask` (True = may attend) and `bias` (added to the logits, e.g. a relative position
        bias) broadcast to (batch, heads, q_len, kv_len); kv_len is the cache length when
        decoding self-attention. `positions` (batch or 1, q_len) are the rotary positions;
        default: 0.. (plus the cache index when decoding)."""
        width = inputs_q.shape[-1]
        head_dim, kv_heads = self._check(width)
        q = HeadsDense(self.num_heads, head_dim, self.q_bias, self.dtype, name="query")(inputs_q)

        def keys_values(source: jax.Array) -> tuple[jax.Array, jax.Array]:
            k = HeadsDense(kv_heads, head_dim, self.k_bias, self.dtype, name="key")(source)
            v = HeadsDense(kv_heads, head_dim, self.v_bias, self.dtype, name="value")(source)
            return k, v

        if self.cross or inputs_kv is not None:      # keys and values from another sequence
            if self.decode and self.cross:
                k, v = cache.cross_keys_values(self, inputs_kv, keys_values)
            elif inputs_kv is None:
                raise ValueError("Cross-attention needs the keys/values' source (inputs_kv / context)")
            elif self.decode:
                raise ValueError("decode=True with inputs_kv needs cross=True (cached cross-attention)")
            else:
                k, v = keys_values(inputs_kv)
        else:
            k, v = keys_values(inputs_q)
            start = cache.index(self) if self.decode else 0
            if self.rotary is not None:
                if positions is None:
                    positions = (start + jnp.arange(q.shape[1]))[None]
                q, k = apply_rotary(q, positions, self.rotary), apply_rotary(k, positions, self.rotary)
            if self.decode:
                k, v, visible = cache.append_keys_values(self, k, v)
                if visible is not None:            # after init: the cached keys each query may see
                    mask, causal = masks.combine_masks(mask, visible), False
        q, k, v = (constrain(t, _HEADS) for t in (q, k, v))
        x = self._attend(q, k, v, mask=mask, bias=bias, causal=causal)
        out = MergeHeadsDense(self.out_dim or width, self.out_bias, self.dtype, name="out")(constrain(x, _HEADS))
        return constrain(out, ("act_batch", "act_len", "act_emb"))

    def _attend(self, q, k, v, *, mask, bias, causal):
        if self.attention_impl == "xla":
            groups = q.shape[2] // k.shape[2]
            if groups > 1:                        # grouped-query: each kv head serves `groups` queries
                k, v = (jnp.repeat(t, groups, axis=2) for t in (k, v))
            return attention_heads_leading(q, k, v, bias=bias, mask=mask, causal=causal)
        bias = None if bias is None else bias.astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                            implementation=self.attention_impl)
