"""Meshes, the logical-axis vocabulary and the rule presets that map it onto mesh axes.

Every parameter and activation in mmjax is annotated with logical names from `LOGICAL_AXES`.
A preset (`dp`, `fsdp`, `fsdp_tp`) maps those names to the mesh axes `data`, `fsdp` and
`tensor`, so switching from data parallelism to FSDP is a config change, not a code change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# name -> meaning; the presets below must cover every name here.
LOGICAL_AXES = {
    "embed": "model width",
    "mlp": "MLP hidden width",
    "heads": "attention heads",
    "kv": "attention head dimension",
    "vocab": "token or visual-token vocabulary",
    "classes": "classifier outputs",
    "layers": "scanned layer axis",
    "act_batch": "activation batch",
    "act_len": "activation sequence length",
    "act_emb": "activation width",
    "act_mlp": "activation MLP hidden width",
    "act_heads": "activation attention heads",
    "act_kv": "activation head dimension",
}

_BATCH = ("data", "fsdp")
RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "dp": (
        ("act_batch", _BATCH),
        ("embed", None), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("classes", None), ("layers", None), ("act_len", None), ("act_emb", None),
        ("act_mlp", None), ("act_heads", None), ("act_kv", None),
    ),
    "fsdp": (
        ("act_batch", _BATCH),
        ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("classes", None), ("layers", None), ("act_len", None), ("act_emb", None),
        ("act_mlp", None), ("act_heads", None), ("act_kv", None),
    ),
    "fsdp_tp": (
        ("act_batch", _BATCH),
        ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
        ("vocab", "tensor"), ("classes", None), ("layers", None), ("act_len", None),
        ("act_emb", None), ("act_mlp", "tensor"), ("act_heads", "tensor"), ("act_kv", None),
    ),
}


def get_rules(preset: str | Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Returns logical-axis rules for a preset name, or validates user-given rules."""
    if isinstance(preset, str):
        if preset not in RULE_PRESETS:
            raise ValueError(f"Unknown sharding preset {preset!r}; known: {sorted(RULE_PRESETS)}")
        return RULE_PRESETS[preset]
    rules = tuple((str(name), axes) for name, axes in preset)
    unknown = sorted({name for name, _ in rules} - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"Unknown logical axes {unknown} in sharding rules; known: {sorted(LOGICAL_AXES)}")
    return rules


def make_mesh(spec: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh from `[("data", -1), ("fsdp", 1), ("tensor", 1)]`-style specs.

    One axis may be -1 (takes the remaining devices). Axes of `MESH_AXES` that the spec omits
    are added with size 1, so every preset's rules are valid on every mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    spec = [(str(name), int(size)) for name, size in spec]
    names = [name for name, _ in spec]
    unknown = sorted(set(names) - set(MESH_AXES))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"Mesh axes must be distinct names from {MESH_AXES}; got {names}")
    if sum(size == -1 for _, size in spec) > 1:
        raise ValueError(f"At most one mesh axis may be -1; got {spec}")
    known = int(np.prod([size for _, size in spec if size != -1]))
    if known <= 0 or len(devices) % known:
        raise ValueError(f"Mesh {spec} does not fit {len(devices)} devices: the fixed axis sizes "
                         f"multiply to {known}, which must divide the device count")
    spec = [(name, len(devices) // known if size == -1 else size) for name, size in spec]
    spec += [(name, 1) for name in MESH_AXES if name not in names]
    spec.sort(key=lambda item: MESH_AXES.index(item[0]))
    shape = tuple(size for _, size in spec)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"Mesh {dict(spec)} needs {int(np.prod(shape))} devices, but "
                         f"{len(devices)} are available; use -1 for one axis to fill the rest")
    axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
    device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: the product of the axes that `act_batch` maps to."""
    return int(np.prod([mesh.shape[axis] for axis in _BATCH]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for input batches: the leading axis split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(_BATCH))


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """Maps a (boxed, abstract) variable tree to NamedShardings using the logical rules."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
    """Creates variables directly in their sharded layout; returns (unboxed variables, shardings).

    `init_fn(*args)` must return a tree of boxed (logically partitioned) variables. Only the
    shapes are traced first (`jax.eval_shape`); then init runs under jit with out_shardings,
    so no device ever holds the full, unsharded parameters.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)

    def unboxed_init(*a):
        return nn.meta.unbox(init_fn(*a))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
    return variables, shardings


def unsharded_fraction(tree: Any) -> float:
    """Fraction of the bytes in `tree` (of jax.Arrays) that are replicated on every device."""
    total = replicated = 0
    for leaf in jax.tree.leaves(tree):
        nbytes = leaf.size * leaf.dtype.itemsize
        total += nbytes
        if leaf.sharding.is_fully_replicated:
            replicated += nbytes
    return replicated / max(total, 1)


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` that the first device holds."""
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.size * shard.data.dtype.itemsize
    return total


def check_sharded(tree: Any, max_unsharded_fraction: float) -> float:
    """Raises if more than `max_unsharded_fraction` of the bytes are unsharded; returns the fraction."""
    fraction = unsharded_fraction(tree)
    if fraction > max_unsharded_fraction:
        raise ValueError(f"{fraction:.1%} of parameter bytes are replicated on every device, more "
                         f"than the allowed {max_unsharded_fraction:.1%}; check the sharding rules")
    return fraction
