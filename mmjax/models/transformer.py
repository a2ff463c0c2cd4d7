"""The one pre-LN transformer block and the block stack (optionally scanned and rematerialised)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

# Names accepted by `remat_policy`; values are jax.checkpoint policies (None = save nothing).
REMAT_POLICIES = {
    "none": "none",
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class EncoderBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); optional layer scale (CaiT / BEiT).

    `rel_pos_window=(h, w)` gives the block its own BEiT relative position bias for a
    [CLS] + h×w patch sequence; a `bias` passed in (e.g. a shared one) is added to it.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    layer_scale: float | None = None
    causal: bool = False
    qkv_bias: bool = True
    key_bias: bool = True
    rel_pos_window: tuple[int, int] | None = None
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    deterministic: bool = True
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, bias: jax.Array | None = None):
        def scale(name: str, y: jax.Array) -> jax.Array:
            if self.layer_scale is None:
                return y
            init = nn.initializers.constant(self.layer_scale)
            gamma = self.param(name, nn.with_logical_partitioning(init, ("embed",)), (y.shape[-1],))
            return y * gamma.astype(y.dtype)

        if self.rel_pos_window is not None:
            own = layers.RelativePositionBias(self.num_heads, tuple(self.rel_pos_window), name="rel_pos_bias")()
            bias = own if bias is None else bias + own
        y = layers.LayerNorm(self.ln_eps, name="ln1")(x)
        y = layers.Attention(self.num_heads, use_bias=self.qkv_bias, key_bias=self.key_bias, dtype=self.dtype,
                             attention_impl=self.attention_impl, name="attn")(
                                 y.astype(self.dtype), mask=mask, bias=bias, causal=self.causal)
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        x = x + scale("ls1", y).astype(x.dtype)
        y = layers.LayerNorm(self.ln_eps, name="ln2")(x)
        y = layers.Mlp(self.mlp_dim, act=self.act, dropout=self.dropout, dtype=self.dtype,
                       name="mlp")(y.astype(self.dtype), deterministic=self.deterministic)
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        x = x + scale("ls2", y).astype(x.dtype)
        x = layers.constrain(x, ("act_batch", "act_len", "act_emb"))
        return (x, None) if self.scanned else x


class Encoder(nn.Module):
    """A stack of `depth` EncoderBlocks.

    `scan=True` compiles one block and loops over stacked parameters (leading `layers` axis,
    param name `layers`), which keeps compile time flat in depth; `remat_policy` trades
    recomputation for activation memory. Unscanned layers are named `layer_0` ... and sow
    their outputs as `encoded_0` ... into the `intermediates` collection.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    layer_scale: float | None = None
    causal: bool = False
    qkv_bias: bool = True
    key_bias: bool = True
    rel_pos_window: tuple[int, int] | None = None   # per-layer BEiT relative position bias
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, bias: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """`mask` and `bias` (additive attention bias, e.g. a shared relative position bias)
        reach every layer."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
        block = EncoderBlock
        if self.remat_policy != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                      act=self.act, ln_eps=self.ln_eps, layer_scale=self.layer_scale,
                      causal=self.causal, qkv_bias=self.qkv_bias, key_bias=self.key_bias,
                      rel_pos_window=self.rel_pos_window, dtype=self.dtype,
                      attention_impl=self.attention_impl, deterministic=deterministic)
        if self.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=nn.broadcast, length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(name="layers", scanned=True, **kwargs)(x, mask, bias)
            return x
        for i in range(self.depth):
            x = block(name=f"layer_{i}", **kwargs)(x, mask, bias)
            self.sow("intermediates", f"encoded_{i}", x)
        return x
