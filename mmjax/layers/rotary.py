"""Rotary position embedding (RoPE, Su et al. 2021) in the half-split layout of GPT-NeoX / LLaMA:
the rotated part of a head is split in two halves (x1, x2) that rotate as (x1 cos − x2 sin,
x2 cos + x1 sin), one frequency per pair.

`RotaryConfig` sets the base, a context-extension `scaling` ("linear": positions ÷ factor, as
position interpolation; "dynamic": NTK-aware base growth once the sequence passes
`max_positions`, as transformers' dynamic RoPE) and the `fraction` of each head that rotates
(GPT-NeoX's rotary_pct; the rest passes through).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

SCALINGS = (None, "linear", "dynamic")


@dataclasses.dataclass(frozen=True)
class RotaryConfig:
    base: float = 10_000.0
    scaling: str | None = None
    factor: float = 1.0
    max_positions: int | None = None     # the trained context length ("dynamic" only)
    fraction: float = 1.0

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"Unknown rotary scaling {self.scaling!r}; known: {SCALINGS}")
        if self.scaling == "dynamic" and self.max_positions is None:
            raise ValueError("rotary scaling='dynamic' needs max_positions (the trained context length)")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"rotary fraction must be in (0, 1], got {self.fraction}")
        if self.factor <= 0:
            raise ValueError(f"rotary factor must be positive, got {self.factor}")

    @classmethod
    def make(cls, value: RotaryConfig | Mapping | None) -> RotaryConfig | None:
        """A RotaryConfig from itself, a dict of its fields (as stored in JSON) or None."""
        return cls(**value) if isinstance(value, Mapping) else value

    def rotary_dim(self, head_dim: int) -> int:
        """How many features of a head rotate: an even number."""
        dim = int(head_dim * self.fraction) // 2 * 2
        if dim == 0:
            raise ValueError(f"rotary fraction {self.fraction} of head_dim {head_dim} rotates nothing")
        return dim

    def inverse_frequencies(self, dim: int, positions: jax.Array) -> jax.Array:
        """1 / base^(2i/dim) for i < dim/2 (float32), after the configured scaling."""
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        base = jnp.float32(self.base)
        if self.scaling == "dynamic":
            length = jnp.maximum(jnp.max(positions) + 1, self.max_positions).astype(jnp.float32)
            growth = self.factor * length / self.max_positions - (self.factor - 1)
            base = base * growth ** (dim / (dim - 2))
        inv = 1.0 / base ** exponents
        return inv / self.factor if self.scaling == "linear" else inv


def apply_rotary(x: jax.Array, positions: jax.Array, config: RotaryConfig) -> jax.Array:
    """Rotates x (batch, length, heads, head_dim) by its tokens' `positions` (batch or 1, length)."""
    dim = config.rotary_dim(x.shape[-1])
    angles = positions.astype(jnp.float32)[..., None] * config.inverse_frequencies(dim, positions)
    cos, sin = (f(angles)[:, :, None, :] for f in (jnp.cos, jnp.sin))   # (B, L, 1, dim/2)
    rotated, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
    x1, x2 = rotated[..., :dim // 2], rotated[..., dim // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
