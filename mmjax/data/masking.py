"""BEiT's blockwise masking (Bao et al. 2022, Algorithm 1), in JAX so it runs inside a step.

Rectangular blocks are added one at a time until `num_masking_patches` patches are masked:
each block draws an area uniformly from [min_num_patches, remaining] and a log-uniform aspect
ratio in [min_aspect, 1/min_aspect], is placed uniformly at random, and is kept only if it
masks at least one new patch and no more than the remaining budget. After 10 failed draws in
a row the mask is returned as it is (BEiT's `MaskingGenerator` does the same), so a mask may
hold slightly fewer patches than asked. The default (14×14 grid, 75 patches, blocks ≥ 16) is
BEiT's ImageNet setting.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_FAILED_DRAWS = 10


def block_mask(rng: jax.Array, grid: tuple[int, int] = (14, 14), num_masking_patches: int = 75,
               min_num_patches: int = 16, max_num_patches: int | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None) -> jax.Array:
    """One boolean (h, w) mask, True = masked. `vmap` over rngs for a batch."""
    height, width = grid
    if not 0 < num_masking_patches <= height * width:
        raise ValueError(f"num_masking_patches={num_masking_patches} must be in [1, {height * width}]")
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]

    def draw(state):
        mask, count, failed, key = state
        key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
        budget = jnp.minimum(num_masking_patches - count, max_num_patches).astype(jnp.float32)
        # Python's random.uniform(a, b) also covers b < a (a small remaining budget); jax's clamps.
        area = min_num_patches + (budget - min_num_patches) * jax.random.uniform(k_area, ())
        aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=log_aspect[0], maxval=log_aspect[1]))
        h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        top = jax.random.randint(k_top, (), 0, jnp.maximum(height - h, 0) + 1)
        left = jax.random.randint(k_left, (), 0, jnp.maximum(width - w, 0) + 1)
        block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        new = jnp.sum(block & ~mask)
        accept = (h < height) & (w < width) & (new > 0) & (new <= budget)
        mask = jnp.where(accept, mask | block, mask)
        return mask, count + jnp.where(accept, new, 0), jnp.where(accept, 0, failed + 1), key

    def keep_going(state):
        _, count, failed, _ = state
        return (count < num_masking_patches) & (failed < MAX_FAILED_DRAWS)

    init = (jnp.zeros(grid, bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), rng)
    return jax.lax.while_loop(keep_going, draw, init)[0]


def block_masks(rng: jax.Array, batch: int, grid: tuple[int, int] = (14, 14), **kwargs) -> jax.Array:
    """A batch of flattened masks (batch, h*w), True = masked, row-major like the patch tokens."""
    masks = jax.vmap(lambda key: block_mask(key, grid, **kwargs))(jax.random.split(rng, batch))
    return masks.reshape(batch, grid[0] * grid[1])
