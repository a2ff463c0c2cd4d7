"""One transformer block, described once by a frozen `BlockConfig` that every stack and model
passes whole.

Pre-norm: x + Attn(N(x)) [+ CrossAttn(N(x), context)] + MLP(N(x)); post-norm (BERT, BLIP):
x = N(x + Attn(x)) and so on. Parameter names: `ln1`, `attn/{query,key,value,out}`, `ln_cross`,
`cross_attn/...`, `ln2`, `mlp/{fc1,fc2}` (gated kinds add `mlp/gate`), layer scales `ls1`,
`ls_cross`, `ls2`, BEiT's `rel_pos_bias/table`; with experts `mlp_<name>` (and `ln2_<name>`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import masks, norms
from mmjax.layers import mlp as mlp_lib
from mmjax.layers.attention import ATTENTION_IMPLS, Attention
from mmjax.layers.common import TOKENS, Dtype, constrain
from mmjax.layers.relative_position import RelativePositionBias
from mmjax.layers.rotary import RotaryConfig

NORM_PLACEMENTS = ("pre", "post")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """The architecture of one transformer block.

    num_heads, mlp_dim: attention heads and feed-forward hidden width.
    num_kv_heads: key/value heads for grouped-query attention (None: num_heads).
    head_dim: features per head (None: width // num_heads).
    norm: "pre" (ViT, CLIP, LLaMA) or "post" (BERT, BLIP) residual normalisation.
    norm_kind, norm_eps, norm_bias, norm_scale: "layernorm" or "rmsnorm" and its options.
    mlp: feed-forward kind ("gelu" exact, "gelu_tanh", "quick_gelu", "relu", "silu", "swiglu",
        "geglu", "geglu_exact"); mlp_bias: biases of its dense layers.
    q_bias, k_bias, v_bias, out_bias: each attention projection's bias (BEiT / EVA: no k bias).
    causal: queries see only keys at or before their position.
    cross_attention: a cross-attention sub-layer to a given `context` after self-attention.
    experts: modality names of per-modality feed-forward experts (VLMo), routed by the integer
        token types (index into `experts`); expert_norms: each expert has its own `ln2_<name>`.
    rotary: rotary position embedding of queries and keys (a RotaryConfig or its fields).
    rel_pos_window: (h, w) BEiT relative position bias of the block's own.
    layer_scale: initial value of per-channel residual scales (CaiT / BEiT), None = off.
    dropout: on the residual branches and inside the MLP.
    dtype, attention_impl: compute dtype and attention backend ("xla", "cudnn").
    """

    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm: str = "pre"
    norm_kind: str = "layernorm"
    norm_eps: float = 1e-6
    norm_bias: bool = True
    norm_scale: bool = True
    mlp: str = "gelu"
    mlp_bias: bool = True
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    out_bias: bool = True
    causal: bool = False
    cross_attention: bool = False
    experts: tuple[str, ...] = ()
    expert_norms: bool = False
    rotary: RotaryConfig | None = None
    rel_pos_window: tuple[int, int] | None = None
    layer_scale: float | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    def __post_init__(self):
        # JSON gives lists and dicts: store tuples and a RotaryConfig so the config stays hashable
        set_field = lambda name, value: object.__setattr__(self, name, value)
        set_field("experts", tuple(self.experts))
        set_field("rotary", RotaryConfig.make(self.rotary))
        if self.rel_pos_window is not None:
            set_field("rel_pos_window", tuple(self.rel_pos_window))
        if self.norm not in NORM_PLACEMENTS:
            raise ValueError(f"Unknown norm placement {self.norm!r}; known: {NORM_PLACEMENTS}")
        if self.norm_kind not in norms.NORM_KINDS:
            raise ValueError(f"Unknown norm_kind {self.norm_kind!r}; known: {norms.NORM_KINDS}")
        mlp_lib.check_kind(self.mlp)
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; known: {ATTENTION_IMPLS}")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"Expert names must be unique, got {self.experts}")
        if self.expert_norms and not self.experts:
            raise ValueError("expert_norms needs experts")

    def replace(self, **changes: Any) -> BlockConfig:
        return dataclasses.replace(self, **changes)


def block_config(overrides: BlockConfig | Mapping[str, Any] | None = None, **fields: Any) -> BlockConfig:
    """A model's BlockConfig: its own `fields`, then the user's `overrides` (a dict of BlockConfig
    fields, e.g. dict(norm="post", mlp="swiglu")). A BlockConfig passed as overrides is taken
    whole."""
    if isinstance(overrides, BlockConfig):
        return overrides
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(BlockConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"Unknown block fields {unknown}; BlockConfig fields: {sorted(known)}")
    return BlockConfig(**{**fields, **overrides})


class Block(nn.Module):
    """One block as `config` describes it.

    `drop=(rate, rng)` turns on stochastic depth for every residual branch (the stack passes
    each layer's; an argument so that a scanned stack can vary it over layers). `decode` keeps
    keys/values in the "cache" collection (`mmjax.layers.cache`). With `scanned=True` the block
    returns (x, None), the carry/output pair nn.scan expects.
    """

    config: BlockConfig
    deterministic: bool = True
    decode: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, bias: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 token_types: jax.Array | None = None, positions: jax.Array | None = None,
                 drop: tuple[jax.Array, jax.Array] | None = None):
        """x (batch, length, width). `mask`/`context_mask` (True = may attend) and `bias` broadcast
        to (batch, heads, queries, keys); `token_types` (batch, length) index `config.experts`;
        `positions` (batch or 1, length) are the rotary positions."""
        c = self.config
        if c.cross_attention and context is None and not self.decode:
            raise ValueError("This block has cross-attention: pass its `context` (keys/values' source)")
        if c.experts and token_types is None:
            raise ValueError(f"This block has experts {c.experts}: pass `token_types` (batch, length)")
        mask, context_mask = masks.as_attention_mask(mask), masks.as_attention_mask(context_mask)
        rngs = None
        if drop is not None and not self.deterministic:
            rngs = jax.random.split(drop[1], 3 if c.cross_attention else 2)

        def pre(name: str, x: jax.Array) -> jax.Array:      # the sub-layer's input
            return (self._norm(name, x) if c.norm == "pre" else x).astype(c.dtype)

        def residual(i: int, scale_name: str, x: jax.Array, y: jax.Array) -> jax.Array:
            y = nn.Dropout(c.dropout)(y, deterministic=self.deterministic)
            if c.layer_scale is not None:
                gamma = self.param(scale_name, nn.with_logical_partitioning(
                    nn.initializers.constant(c.layer_scale), ("embed",)), (y.shape[-1],))
                y = y * gamma.astype(y.dtype)
            if rngs is not None:
                y = drop_branch(rngs[i], y, drop[0])
            return x + y.astype(x.dtype)

        def post(name: str, x: jax.Array) -> jax.Array:      # the sub-layer's output
            return self._norm(name, x) if c.norm == "post" else x

        if c.rel_pos_window is not None:
            own = RelativePositionBias(c.num_heads, tuple(c.rel_pos_window), name="rel_pos_bias")()
            bias = own if bias is None else bias + own
        y = self._attention("attn", cross=False)(pre("ln1", x), mask=mask, bias=bias, causal=c.causal,
                                                 positions=positions)
        x = post("ln1", residual(0, "ls1", x, y))
        if c.cross_attention:
            y = self._attention("cross_attn", cross=True)(pre("ln_cross", x), context, mask=context_mask)
            x = post("ln_cross", residual(2, "ls_cross", x, y))
        if not c.experts:
            y = self._mlp("mlp")(pre("ln2", x), deterministic=self.deterministic)
            x = post("ln2", residual(1, "ls2", x, y))
        else:
            x = self._experts(x, token_types, pre, residual, post)
        x = constrain(x, TOKENS)
        return (x, None) if self.scanned else x

    def _experts(self, x, token_types, pre, residual, post) -> jax.Array:
        """Every token goes through its type's expert only: each expert runs on all tokens and a
        select keeps its own tokens' results, so no token reaches (or gets gradient from) another
        modality's expert. Costs one MLP per expert on every token. Types outside the experts'
        range get no feed-forward update."""
        c = self.config
        own = [(token_types == e)[..., None] for e in range(len(c.experts))]
        norm_names = [f"ln2_{name}" if c.expert_norms else "ln2" for name in c.experts]
        shared_input = None if c.expert_norms else pre("ln2", x)
        y = jnp.zeros(x.shape, c.dtype)
        for name, norm_name, mine in zip(c.experts, norm_names, own):
            h = pre(norm_name, x) if c.expert_norms else shared_input
            y = jnp.where(mine, self._mlp(f"mlp_{name}")(h, deterministic=self.deterministic), y)
        x = residual(1, "ls2", x, y)
        if not c.expert_norms:
            return post("ln2", x)
        out = x
        for norm_name, mine in zip(norm_names, own):
            out = jnp.where(mine, post(norm_name, x), out)
        return out

    def _norm(self, name: str, x: jax.Array) -> jax.Array:
        c = self.config
        norm = norms.make_norm(c.norm_kind, c.norm_eps, use_bias=c.norm_bias, use_scale=c.norm_scale, name=name)
        return norm(x) if c.norm == "pre" else norm(x).astype(x.dtype)

    def _attention(self, name: str, cross: bool) -> Attention:
        c = self.config
        return Attention(c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads, q_bias=c.q_bias,
                         k_bias=c.k_bias, v_bias=c.v_bias, out_bias=c.out_bias,
                         rotary=None if cross else c.rotary, cross=cross, decode=self.decode,
                         dtype=c.dtype, attention_impl=c.attention_impl, name=name)

    def _mlp(self, name: str) -> mlp_lib.Mlp:
        c = self.config
        return mlp_lib.Mlp(c.mlp_dim, act=c.mlp, dropout=c.dropout, use_bias=c.mlp_bias, dtype=c.dtype,
                           name=name)


def drop_branch(rng: jax.Array, y: jax.Array, rate: jax.Array) -> jax.Array:
    """Zeroes a residual branch for a random `rate` share of the examples, scales the rest by
    1 / (1 - rate) so the expectation is unchanged. `rate` may be traced (a scanned layer's)."""
    keep = 1.0 - rate
    kept = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return y * jnp.where(kept, 1.0 / keep, 0.0).astype(y.dtype)
