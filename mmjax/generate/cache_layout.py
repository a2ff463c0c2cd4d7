"""Where the batch sits in a decoding cache, so the generation loop can shard it like
activations, repeat it for beams and reorder it when beams change.

`layers_cache_layout` describes the cache of `mmjax.layers` (see `mmjax.layers.cache`):
`cached_key` / `cached_value` / `cross_key` / `cross_value` are (..., batch, length, kv_heads,
head_dim), the leading axes being scanned layers; `cache_index` and other scalar counters have no
batch axis. A decoder with another cache convention gives its own layout function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import param_paths


class LeafLayout(NamedTuple):
    """A cache leaf's logical axes (mmjax.sharding names; "act_batch" marks the batch axis) and
    whether it follows the beams (False: equal for all beams of one example, e.g. projected
    cross-attention keys, so reordering beams can skip it)."""
    axes: tuple[str | None, ...]
    follows_beams: bool


CacheLayout = Callable[[tuple, jax.Array], LeafLayout]
_KEY_VALUE_HEADS = ("act_batch", "act_len", "act_heads", "act_kv")


def layers_cache_layout(path: tuple, leaf: Any) -> LeafLayout:
    """The layout of one leaf of an `mmjax.layers` cache, by its name."""
    name = str(param_paths.key_name(path[-1]))
    ndim = len(jnp.shape(leaf))
    if name in ("cached_key", "cached_value", "cross_key", "cross_value"):
        if ndim < 4:
            raise ValueError(f"Cache leaf {name} should be (..., batch, length, heads, head_dim), got shape "
                             f"{jnp.shape(leaf)}")
        return LeafLayout(("layers",) * (ndim - 4) + _KEY_VALUE_HEADS, not name.startswith("cross_"))
    if name == "cache_index" or ndim == 0:     # counters (a scanned stack's: one per layer)
        return LeafLayout(("layers",) * ndim, False)
    raise ValueError(f"Unknown cache leaf {'/'.join(str(param_paths.key_name(k)) for k in path)}: "
                     "give the decoder a cache_layout that names its axes")


def _batch_axis(layout: LeafLayout) -> int | None:
    return layout.axes.index("act_batch") if "act_batch" in layout.axes else None


def constrain(cache: Any, layout: CacheLayout) -> Any:
    """Annotates every leaf with its logical axes (a no-op outside a mesh / rules context)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: nn.with_logical_constraint(x, layout(p, x).axes), cache)


def repeat_rows(cache: Any, layout: CacheLayout, times: int) -> Any:
    """Each example's rows repeated `times` times in place (b → b*times .. b*times+times-1)."""
    def repeat(path, x):
        axis = _batch_axis(layout(path, x))
        return x if axis is None else jnp.repeat(x, times, axis=axis)
    return jax.tree_util.tree_map_with_path(repeat, cache)


def reorder_beams(cache: Any, layout: CacheLayout, origin: jax.Array) -> Any:
    """Rows laid out as (batch * beams) take the rows of their beam's `origin` (batch, beams):
    a gather inside each example, so a batch-sharded cache stays where it is."""
    batch, beams = origin.shape

    def reorder(path, x):
        leaf_layout = layout(path, x)
        axis = _batch_axis(leaf_layout)
        if axis is None or not leaf_layout.follows_beams:
            return x
        grouped = x.reshape(x.shape[:axis] + (batch, beams) + x.shape[axis + 1:])
        take = jax.vmap(lambda rows, index: jnp.take(rows, index, axis=axis), in_axes=(axis, 0), out_axes=axis)
        return take(grouped, origin).reshape(x.shape)

    return jax.tree_util.tree_map_with_path(reorder, cache)
