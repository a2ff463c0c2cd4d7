"""Parameter paths: the one spelling of where a parameter lives, shared by the optimizer
(weight-decay exclusion, layer-wise lr decay, freezing), the converters and warm start.

A path is the pytree keys joined by "/" (`image/encoder/layer_0/attn/query/kernel`). A stack
of blocks is stored one of two ways: unrolled, one subtree per block (`.../layer_{i}/...`), or
scanned, every leaf stacked on a leading layer axis (`.../layers/...`, `nn.scan`'s layout).
`stack_layers` / `unstack_layers` move flat parameters between the two, so tables and rules
are written once, for the unrolled layout. A flax `nn.LogicallyPartitioned` box counts as one
leaf, so trees of path strings built here are tree prefixes of boxed trees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import meta

SEP = "/"
# One block of an unrolled stack (group 2 is its index), and a scanned stack.
BLOCK = re.compile(r"(^|/)layer_(\d+)(/|$)")
STACK = re.compile(r"(^|/)layers(/|$)")


class LayerStackError(ValueError):
    """Unrolled blocks that cannot form a stack (their indices are not 0..L-1)."""


# ---------------------------------------------------------------------------------------------
# Paths of pytrees
# ---------------------------------------------------------------------------------------------

def is_box(x: Any) -> bool:
    """A flax metadata box (nn.LogicallyPartitioned): one parameter, not a subtree."""
    return isinstance(x, meta.AxisMetadata)


def key_name(key: Any) -> str:
    """The name of one jax key-path entry (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def join(key_path: Iterable[Any]) -> str:
    """A jax key path (from `tree_flatten_with_path` and friends) as a "/"-joined string."""
    return SEP.join(key_name(k) for k in key_path)


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`tree` with every parameter (boxes whole) replaced by fn(path, parameter)."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: fn(join(kp), leaf), tree, is_leaf=is_box)


def tree_paths(tree: Any) -> Any:
    """A pytree like `tree` whose leaves are the parameters' "/"-joined paths."""
    return map_with_paths(lambda path, _: path, tree)


def paths_and_leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """([(path, parameter), ...] in tree order, treedef): for rebuilding with `tree_unflatten`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    return [(join(kp), leaf) for kp, leaf in leaves], treedef


def shape(leaf: Any) -> tuple[int, ...]:
    """The shape of a parameter, boxed or not (arrays, shape structs, Python scalars)."""
    value = leaf.unbox() if is_box(leaf) else leaf
    return tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a/b/c": leaf}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + SEP))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dicts (the inverse of `flatten`)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(SEP)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------------------------
# Block stacks: unrolled `layer_{i}` and scanned `layers`
# ---------------------------------------------------------------------------------------------

def block_index(path: str) -> int | None:
    """i for a parameter of unrolled block `layer_{i}`, else None."""
    m = BLOCK.search(path)
    return None if m is None else int(m.group(2))


def is_stacked(path: str) -> bool:
    """Whether the parameter belongs to a scanned stack (its leading axis is the layer)."""
    return STACK.search(path) is not None


def stacked_path(path: str) -> str:
    """`.../layer_{i}/...` -> `.../layers/...` (unchanged without `layer_{i}`)."""
    m = BLOCK.search(path)
    return path if m is None else path[:m.start()] + f"{m.group(1)}layers{m.group(3)}" + path[m.end():]


def unstacked_paths(path: str, depth: int) -> list[str]:
    """The `depth` unrolled paths of a scanned parameter's layers; [path] when it is not scanned."""
    m = STACK.search(path)
    if m is None:
        return [path]
    return [path[:m.start()] + f"{m.group(1)}layer_{i}{m.group(2)}" + path[m.end():] for i in range(depth)]


def stack_depths(tree: Any) -> set[int]:
    """The block counts found in `tree`: 1 + the largest `layer_{i}` and every scanned stack's
    leading axis (one element for a model with one stack or with equally deep stacks)."""
    items, _ = paths_and_leaves(tree)
    unrolled = [i for i in (block_index(p) for p, _ in items) if i is not None]
    depths = {shape(leaf)[0] for p, leaf in items if is_stacked(p)}
    return depths | ({max(unrolled) + 1} if unrolled else set())


def stack_layers(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unrolled `.../layer_{i}/...` params -> scanned `.../layers/...` stacked on axis 0.

    The layout of `layers.Stack(scan=True)` (and of any block stack that follows its
    naming). Paths without `layer_{i}` pass through.
    """
    out, groups = {}, {}
    for path, value in flat.items():
        i = block_index(path)
        if i is None:
            out[path] = value
        else:
            groups.setdefault(stacked_path(path), {})[i] = value
    for stacked, blocks in groups.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise LayerStackError(f"Cannot stack {stacked}: layers {sorted(blocks)} are not 0..{len(blocks) - 1}")
        out[stacked] = np.stack([np.asarray(blocks[i]) for i in range(len(blocks))])
    return out


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned `.../layers/...` params -> `.../layer_{i}/...` (the inverse of stack_layers)."""
    out = {}
    for path, value in flat.items():
        if not is_stacked(path):
            out[path] = value
            continue
        value = np.asarray(value)
        out.update(zip(unstacked_paths(path, value.shape[0]), value))
    return out


# ---------------------------------------------------------------------------------------------
# Regular expressions over paths (config-given: freeze, wd_exclude, warm-start rules, drops)
# ---------------------------------------------------------------------------------------------

def patterns(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    """A regex or a list of them (None: none) as a tuple, each checked to compile; a bad one
    raises ValueError naming `what` (the config key) and the pattern."""
    items = (value,) if isinstance(value, str) else tuple(value or ())
    for p in items:
        try:
            re.compile(p)
        except (re.error, TypeError) as e:
            raise ValueError(f"{what}: {p!r} is not a regular expression ({e})") from None
    return items


def search_any(regexes: Sequence[str | re.Pattern], path: str) -> bool:
    """Whether any regex matches somewhere in `path` (re.search: freeze, weight-decay exclusion)."""
    return any(re.search(r, path) for r in regexes)


def fullmatch_any(regexes: Sequence[str | re.Pattern], path: str) -> bool:
    """Whether any regex matches all of `path` (re.fullmatch: warm-start and export rules)."""
    return any(re.fullmatch(r, path) for r in regexes)
