"""The one pre-LN transformer block and the block stack (optionally scanned and rematerialised),
with stochastic depth and BEiT's depth-rescaled init as options of the stack."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers

# Names accepted by `remat_policy`; values are jax.checkpoint policies (None = save nothing).
REMAT_POLICIES = {
    "none": "none",
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The kernels that write into the residual stream, which BEiT's init rescales per layer.
RESIDUAL_OUT_KERNELS = (("attn", "out", "kernel"), ("mlp", "fc2", "kernel"))


def drop_path_rates(drop_path: float, depth: int) -> np.ndarray:
    """Per-layer stochastic-depth rates, rising linearly from 0 to `drop_path` (timm / BEiT / MAE)."""
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    return np.linspace(0.0, drop_path, depth, dtype=np.float32)


def drop_branch(rng: jax.Array, y: jax.Array, rate: jax.Array) -> jax.Array:
    """Zeroes a residual branch for a random `rate` share of the examples, scales the rest by
    1 / (1 - rate) so the expectation is unchanged. `rate` may be traced (a scanned layer's)."""
    keep = 1.0 - rate
    kept = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return y * jnp.where(kept, 1.0 / keep, 0.0).astype(y.dtype)


def rescale_residual_init(variables: Any, factors: np.ndarray) -> Any:
    """Multiplies the residual-output kernels (`RESIDUAL_OUT_KERNELS`) by `factors`: a scalar
    for one block, or one value per layer (leading axis) for a scanned stack. Boxed
    (logically partitioned) leaves keep their metadata."""
    factors = np.asarray(factors, np.float32)

    def scale(path, leaf):
        names = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        if names[-3:] not in RESIDUAL_OUT_KERNELS:
            return leaf
        value = nn.meta.unbox(leaf)
        factor = factors.reshape(factors.shape + (1,) * (value.ndim - factors.ndim))
        value = value * factor.astype(value.dtype)
        return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value

    return jax.tree_util.tree_map_with_path(scale, variables,
                                            is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _with_rescaled_init(target: Any, factors: np.ndarray, initializing: bool) -> Any:
    """`target` (a block or scanned stack class) whose fresh residual-output kernels are
    multiplied by `factors`; applying existing parameters is unchanged.

    flax's map_variables(init=True) initialises, maps out, maps back in, runs again and maps
    out once more; dividing on the way in keeps the stored result scaled exactly once.
    """
    if not initializing:
        return target
    inverse = 1.0 / np.asarray(factors, np.float32)
    return nn.map_variables(target, "params", init=True,
                            trans_in_fn=lambda v: rescale_residual_init(v, inverse),
                            trans_out_fn=lambda v: rescale_residual_init(v, factors))


class EncoderBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); optional layer scale (CaiT / BEiT).

    `rel_pos_window=(h, w)` gives the block its own BEiT relative position bias for a
    [CLS] + h×w patch sequence; a `bias` passed in (e.g. a shared one) is added to it.
    `drop=(rate, rng)` turns on stochastic depth for both residual branches (the Encoder
    passes each layer's; it is an argument so a scanned stack can vary it over layers).
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
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, bias: jax.Array | None = None,
                 drop: tuple[jax.Array, jax.Array] | None = None):
        branch_rngs = None if drop is None or self.deterministic else jax.random.split(drop[1])

        def residual(i: int, y: jax.Array) -> jax.Array:
            return y if branch_rngs is None else drop_branch(branch_rngs[i], y, drop[0])

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
        x = x + residual(0, scale("ls1", y)).astype(x.dtype)
        y = layers.LayerNorm(self.ln_eps, name="ln2")(x)
        y = layers.Mlp(self.mlp_dim, act=self.act, dropout=self.dropout, dtype=self.dtype,
                       name="mlp")(y.astype(self.dtype), deterministic=self.deterministic)
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        x = x + residual(1, scale("ls2", y)).astype(x.dtype)
        x = layers.constrain(x, ("act_batch", "act_len", "act_emb"))
        return (x, None) if self.scanned else x


class Encoder(nn.Module):
    """A stack of `depth` EncoderBlocks.

    `scan=True` compiles one block and loops over stacked parameters (leading `layers` axis,
    param name `layers`), which keeps compile time flat in depth; `remat_policy` trades
    recomputation for activation memory. Unscanned layers are named `layer_0` ... and sow
    their outputs as `encoded_0` ... into the `intermediates` collection.

    `drop_path` is the stochastic-depth rate of the last layer (`drop_path_rates`), drawn from
    the "dropout" rng when not deterministic. Each layer's draw comes from one key split
    `depth` ways, so scanned and unrolled stacks drop the same examples. `rescale_init`
    divides each layer's attention-output and fc2 kernels by sqrt(2 * layer_id) at init
    (BEiT's `fix_init_weight`, layer_id = 1..depth).
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
    drop_path: float = 0.0
    rescale_init: bool = False

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
        rates = drop_path_rates(self.drop_path, self.depth)
        drop = None
        if self.drop_path > 0 and not deterministic:
            drop = (jnp.asarray(rates), jax.random.split(self.make_rng("dropout"), self.depth))
        rescale = 1.0 / np.sqrt(2.0 * np.arange(1, self.depth + 1, dtype=np.float32))
        initializing = self.rescale_init and self.is_initializing()
        if self.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            stack = _with_rescaled_init(stack, rescale, initializing)
            x, _ = stack(name="layers", scanned=True, **kwargs)(x, mask, bias, drop)
            return x
        for i in range(self.depth):
            layer = _with_rescaled_init(block, rescale[i], initializing)
            layer_drop = None if drop is None else (drop[0][i], drop[1][i])
            x = layer(name=f"layer_{i}", **kwargs)(x, mask, bias, layer_drop)
            self.sow("intermediates", f"encoded_{i}", x)
        return x
