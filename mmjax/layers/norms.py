"""LayerNorm and RMSNorm with logically partitioned parameters, computed in float32."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.layers.common import Dtype

NORM_KINDS = ("layernorm", "rmsnorm")


def LayerNorm(epsilon: float = 1e-6, dtype: Dtype = jnp.float32, name: str | None = None,
              use_bias: bool = True, use_scale: bool = True) -> nn.LayerNorm:
    """LayerNorm with logically partitioned scale and bias (computed in float32)."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
        use_bias=use_bias, use_scale=use_scale,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def RMSNorm(epsilon: float = 1e-6, name: str | None = None, use_scale: bool = True) -> nn.RMSNorm:
    """x / sqrt(mean(x²) + eps) · scale, no mean subtraction and no bias (T5, LLaMA); float32."""
    return nn.RMSNorm(
        epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name, use_scale=use_scale,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))


def make_norm(kind: str, epsilon: float, *, use_bias: bool = True, use_scale: bool = True,
              name: str | None = None) -> nn.Module:
    """The norm layer `kind` ("layernorm" or "rmsnorm"; an RMSNorm has no bias to switch off)."""
    if kind == "layernorm":
        return LayerNorm(epsilon, name=name, use_bias=use_bias, use_scale=use_scale)
    if kind == "rmsnorm":
        return RMSNorm(epsilon, name=name, use_scale=use_scale)
    raise ValueError(f"Unknown norm kind {kind!r}; known: {NORM_KINDS}")
