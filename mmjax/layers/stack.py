"""The block stack: `depth` blocks described by one BlockConfig, unrolled or scanned, with
rematerialisation, stochastic depth, BEiT's depth-rescaled init and cross-attention placement.

Parameter layout. Unrolled: `layer_0` ... `layer_{depth-1}` (each also sown as `encoded_i` into
`intermediates`). Scanned: one segment `layers` whose leaves carry a leading layer axis. With
cross-attention in only some layers the scanned stack runs segments of identical groups: layers
before `cross_attention_from` form `layers` (no cross-attention), the rest form groups of
`cross_attention_every` blocks (`block_0` with cross-attention, `block_1`... without), named
`layers` when they are the only segment, else `layers_from_<first layer>`. `to_scanned` /
`to_unrolled` move parameters between the two layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import param_paths
from mmjax.layers.block import Block, BlockConfig

# Names accepted by `remat_policy`; values are jax.checkpoint policies (None = save nothing).
REMAT_POLICIES = {
    "none": "none",
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The kernels that write into the residual stream, which BEiT's init rescales per layer (expert
# MLPs' `mlp_<name>/fc2/kernel` too).
RESIDUAL_OUT_KERNELS = (("attn", "out", "kernel"), ("mlp", "fc2", "kernel"), ("cross_attn", "out", "kernel"))


def drop_path_rates(drop_path: float, depth: int) -> np.ndarray:
    """Per-layer stochastic-depth rates, rising linearly from 0 to `drop_path` (timm / BEiT / MAE)."""
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    return np.linspace(0.0, drop_path, depth, dtype=np.float32)


def is_residual_out(names: Sequence[Any]) -> bool:
    """Whether a parameter path ends in a kernel that writes into the residual stream."""
    names = tuple(names)
    if names[-3:] in RESIDUAL_OUT_KERNELS:
        return True
    return len(names) >= 3 and str(names[-3]).startswith("mlp_") and names[-2:] == ("fc2", "kernel")


def rescale_residual_init(variables: Any, factors: np.ndarray) -> Any:
    """Multiplies the residual-output kernels by `factors`: a scalar for one block, one value per
    layer (leading axis) for a scanned stack, or (groups, blocks per group) for a scanned stack of
    groups (`block_j` takes column j). Boxed (logically partitioned) leaves keep their metadata."""
    factors = np.asarray(factors, np.float32)

    def scale(path, leaf):
        names = tuple(param_paths.key_name(k) for k in path)
        if not is_residual_out(names):
            return leaf
        factor = factors
        if factors.ndim == 2:
            member = next(n for n in names if str(n).startswith("block_"))
            factor = factors[:, int(str(member)[len("block_"):])]
        value = nn.meta.unbox(leaf)
        factor = factor.reshape(factor.shape + (1,) * (value.ndim - factor.ndim))
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


class Segment(NamedTuple):
    """`groups` repeats of `len(configs)` consecutive blocks from layer `start`, scanned as `name`."""
    name: str
    start: int
    groups: int
    configs: tuple[BlockConfig, ...]


class BlockGroup(nn.Module):
    """A few consecutive, different blocks (`block_0`, ...): the unit a scanned segment repeats."""

    configs: tuple[BlockConfig, ...]
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, bias, context, context_mask, token_types, positions, drop):
        for j, config in enumerate(self.configs):
            layer_drop = None if drop is None else (drop[0][j], drop[1][j])
            x = Block(config, self.deterministic, self.decode, name=f"block_{j}")(
                x, mask, bias, context, context_mask, token_types, positions, layer_drop)
        return x, None


class Stack(nn.Module):
    """`depth` blocks as `block` describes them.

    `scan=True` compiles one block (or group) and loops over stacked parameters, which keeps
    compile time flat in depth; `remat_policy` trades recomputation for activation memory.
    `drop_path` is the stochastic-depth rate of the last layer (`drop_path_rates`), drawn from the
    "dropout" rng when not deterministic; each layer's draw comes from one key split `depth` ways,
    so scanned and unrolled stacks drop the same examples. `rescale_init` divides each layer's
    residual-output kernels by sqrt(2 * layer_id) at init (BEiT's `fix_init_weight`).
    With `block.cross_attention`, layers `cross_attention_from`, then every
    `cross_attention_every`-th, have the cross-attention sub-layer (Q-Former: every 2nd; ALBEF's
    fusion layers: from 6 on); the others are plain blocks.
    """

    block: BlockConfig
    depth: int
    scan: bool = False
    remat_policy: str = "none"
    drop_path: float = 0.0
    rescale_init: bool = False
    cross_attention_every: int = 1
    cross_attention_from: int = 0

    @nn.nowrap
    def has_cross_attention(self, layer: int) -> bool:
        start, every = self.cross_attention_from, self.cross_attention_every
        return self.block.cross_attention and layer >= start and (layer - start) % every == 0

    @nn.nowrap
    def layer_config(self, layer: int) -> BlockConfig:
        return self.block.replace(cross_attention=self.has_cross_attention(layer))

    @nn.nowrap
    def segments(self) -> list[Segment]:
        """The scanned layout (see the module docstring)."""
        start, every = self.cross_attention_from, self.cross_attention_every
        if not self.block.cross_attention or (start == 0 and every == 1):
            return [Segment("layers", 0, self.depth, (self.block,))]
        if (self.depth - start) % every:
            raise ValueError(f"A scanned stack needs the {self.depth - start} layers from layer {start} on to "
                             f"form whole groups of cross_attention_every={every}")
        plain = self.block.replace(cross_attention=False)
        segments = [Segment("layers", 0, start, (plain,))] if start else []
        name = f"layers_from_{start}" if start else "layers"
        return segments + [Segment(name, start, (self.depth - start) // every,
                                   (self.block,) + (plain,) * (every - 1))]

    @nn.nowrap
    def _check(self) -> None:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
        if self.cross_attention_every < 1 or not 0 <= self.cross_attention_from < max(self.depth, 1):
            raise ValueError(f"cross_attention_every must be >= 1 and cross_attention_from in [0, depth), got "
                             f"{self.cross_attention_every}, {self.cross_attention_from}")

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, bias: jax.Array | None = None, *,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 token_types: jax.Array | None = None, positions: jax.Array | None = None,
                 deterministic: bool = True, decode: bool = False,
                 layer_range: tuple[int, int] | None = None) -> jax.Array:
        """x (batch, length, width). Every layer gets the same `mask` (True = may attend; (batch,
        keys) or broadcastable to (batch, heads, queries, keys); combined with a causal block's
        own), additive attention `bias`, cross-attention `context` (batch, context length,
        context width) with its `context_mask`, expert `token_types` (batch, length) and rotary
        `positions` (batch or 1, length). `decode=True`: see `mmjax.layers.cache`.
        `layer_range=(start, stop)` runs only those layers (ALBEF runs its text layers and its
        fusion layers apart); a scanned stack runs whole segments, so the bounds must fall on
        segment boundaries (0, cross_attention_from, depth)."""
        self._check()
        first, stop = (0, self.depth) if layer_range is None else tuple(layer_range)
        if layer_range is None and self.depth == 0:
            return x   # a zero-depth stack (a test's embeddings-only model) is the identity
        if not 0 <= first < stop <= self.depth:
            raise ValueError(f"layer_range {layer_range} is not a non-empty range within the {self.depth} layers")
        rates = drop_path_rates(self.drop_path, self.depth)
        drop = None
        if self.drop_path > 0 and not deterministic:
            drop = (jnp.asarray(rates), jax.random.split(self.make_rng("dropout"), self.depth))
        rescale = 1.0 / np.sqrt(2.0 * np.arange(1, self.depth + 1, dtype=np.float32))
        initializing = self.rescale_init and self.is_initializing()
        inputs = (mask, bias, context, context_mask, token_types, positions)
        remat = lambda cls: cls if self.remat_policy == "none" else nn.remat(
            cls, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
        if not self.scan:
            block = remat(Block)
            for i in range(first, stop):
                layer = _with_rescaled_init(block, rescale[i], initializing)
                layer_drop = None if drop is None else (drop[0][i], drop[1][i])
                x = layer(self.layer_config(i), deterministic, decode, name=f"layer_{i}")(x, *inputs, layer_drop)
                self.sow("intermediates", f"encoded_{i}", x)
            return x
        for segment in self.segments():
            size = len(segment.configs)
            layers = slice(segment.start, segment.start + segment.groups * size)
            if layers.stop <= first or layers.start >= stop:
                continue
            if layers.start < first or layers.stop > stop:
                raise ValueError(f"layer_range {layer_range} cuts the scanned segment {segment.name!r} (layers "
                                 f"{layers.start}..{layers.stop - 1}); a scanned stack runs whole segments")
            shape = (segment.groups,) if size == 1 else (segment.groups, size)
            part = None if drop is None else (drop[0][layers].reshape(shape),
                                              drop[1][layers].reshape(shape + drop[1].shape[1:]))
            target = remat(Block if size == 1 else BlockGroup)
            stack = nn.scan(target, variable_axes={"params": 0, "cache": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast,) * len(inputs) + (0,), length=segment.groups,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            stack = _with_rescaled_init(stack, rescale[layers].reshape(shape), initializing)
            if size == 1:
                module = stack(segment.configs[0], deterministic, decode, scanned=True, name=segment.name)
            else:
                module = stack(segment.configs, deterministic, decode, name=segment.name)
            x, _ = module(x, *inputs, part)
        return x


def to_scanned(params: dict, stack: Stack) -> dict:
    """Unrolled stack parameters (`layer_i`) in `stack`'s scanned layout."""
    out = {}
    for segment in stack.segments():
        size = len(segment.configs)
        members = []
        for j in range(size):
            layers = [params[f"layer_{segment.start + g * size + j}"] for g in range(segment.groups)]
            members.append(jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
        out[segment.name] = members[0] if size == 1 else {f"block_{j}": m for j, m in enumerate(members)}
    return out


def to_unrolled(params: dict, stack: Stack) -> dict:
    """Scanned stack parameters (`stack.segments()` layout) as `layer_i` entries."""
    out = {}
    for segment in stack.segments():
        size = len(segment.configs)
        scanned = params[segment.name]
        for g in range(segment.groups):
            for j in range(size):
                member = scanned if size == 1 else scanned[f"block_{j}"]
                out[f"layer_{segment.start + g * size + j}"] = jax.tree.map(lambda x, g=g: x[g], member)
    return out
