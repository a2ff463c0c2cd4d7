"""Patch embedding and absolute position embeddings: learned, fixed 2-D sine-cosine, and the
resampling of a learned grid to another image size."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers.common import Dtype, dense_init


class PatchEmbed(nn.Module):
    """Splits NHWC images into non-overlapping patches and projects them: (B, h, w, width)."""

    width: int
    patch_size: tuple[int, int]
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        return nn.Conv(
            self.width, self.patch_size, strides=self.patch_size, padding="VALID",
            use_bias=self.use_bias, dtype=self.dtype, name="conv",
            kernel_init=dense_init((None, None, None, "embed"), nn.initializers.lecun_normal()),
            bias_init=dense_init(("embed",), nn.initializers.zeros))(images)


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (MoCo v3 / MAE style), shape (1, h*w, width)."""
    if width % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {width}")
    h, w = grid
    y, x = np.mgrid[:h, :w].astype(np.float32)
    omega = 1.0 / temperature ** (np.arange(width // 4, dtype=np.float32) / (width // 4))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def resample_posemb(posemb: jax.Array, new_grid: tuple[int, int], num_prefix: int = 0,
                    method: str = "bilinear") -> jax.Array:
    """Resizes a (1, prefix + h*w, width) learned position embedding to a new square/rect grid.

    Prefix tokens (e.g. [CLS]) keep their embeddings; the grid part is interpolated.
    """
    prefix, grid_part = posemb[:, :num_prefix], posemb[:, num_prefix:]
    old = int(round(np.sqrt(grid_part.shape[1])))
    if old * old != grid_part.shape[1]:
        raise ValueError(f"Cannot infer a square grid from {grid_part.shape[1]} position embeddings")
    width = grid_part.shape[-1]
    grid_part = grid_part.reshape(1, old, old, width)
    grid_part = jax.image.resize(grid_part, (1, *new_grid, width), method=method)
    grid_part = grid_part.reshape(1, new_grid[0] * new_grid[1], width)
    return jnp.concatenate([prefix, grid_part.astype(posemb.dtype)], axis=1)


class LearnedPosEmb(nn.Module):
    """A learned (1, length, width) position embedding added to the input."""

    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, length, width = x.shape
        if self.has_variable("params", "pos_embedding"):
            stored = jnp.shape(nn.meta.unbox(self.get_variable("params", "pos_embedding")))
            if stored[1] != length:
                raise ValueError(
                    f"Position embedding has {stored[1]} positions but the input has {length} "
                    "tokens (another image size?); resample it with layers.resample_posemb")
        pe = self.param("pos_embedding",
                        nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                     (None, None, "embed")),
                        (1, length, width))
        return x + pe.astype(x.dtype)
