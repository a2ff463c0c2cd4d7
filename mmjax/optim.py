"""Optimizer and learning-rate schedule from config, built on optax.

Config pieces (ConfigDicts or plain dicts)::

    optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                     grad_clip_norm=1.0, freeze=(), wd_exclude=None, mu_dtype=None)
    schedule = dict(lr=5e-4, warmup_steps=2000, decay="cosine", end_lr=0.0)

``optimizer.layer_decay`` (e.g. 0.65, BEiT / MAE fine-tuning) scales each parameter's update
by ``layer_decay ** (L + 1 - layer_id)``: embeddings have id 0, block i has id i + 1 and the
rest (final norm, head) L + 1, where L is the number of blocks.

``optimizer.lr_multipliers`` (e.g. ``(("^head/", 10.0),)``: ViLT's VQA head learns at 10× the
rate, as its ``lr_mult``) scales the update of every parameter whose path matches a regex by its
factor (the first match counts), as a PyTorch parameter group with a larger lr would.

Parameter paths are the pytree keys joined by '/' (mmjax.param_paths), e.g.
``image/encoder/layer_0/attn/query/kernel``. Params are expected as plain
arrays (the trainer unboxes flax ``nn.LogicallyPartitioned`` before building
optimizer state). Boxed trees are tolerated: each box is treated as one leaf,
so the masks and labels built here are tree prefixes of the boxed tree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax import param_paths

__all__ = [
    "DEFAULT_WD_EXCLUDE",
    "OPTIMIZERS",
    "path_strings",
    "decay_mask",
    "layer_ids",
    "make_schedule",
    "build_optimizer",
    "trainable_mask",
    "split_frozen",
    "merge_frozen",
]

# Parameters never weight-decayed by default (matched with re.search on the path).
DEFAULT_WD_EXCLUDE: tuple[str, ...] = (
    r"pos_embedding|posemb|pos_embed",  # Position embeddings.
    r"logit_scale|logit_bias",  # CLIP temperature, SigLIP bias.
    r"norm|ln_|LayerNorm|(^|/)scale$",  # Normalization layers.
    r"bias",  # Biases.
    r"cls",  # Class tokens.
)

_COMMON_KEYS = ("name", "weight_decay", "grad_clip_norm", "freeze", "wd_exclude", "layer_decay", "lr_multipliers")
# Keys each optimizer reads besides the common ones.
OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "adamw": ("b1", "b2", "eps", "mu_dtype"),
    "adam": ("b1", "b2", "eps", "mu_dtype"),
    "sgd": ("momentum", "nesterov"),
    "lamb": ("b1", "b2", "eps"),
}
_SCHEDULE_KEYS = ("lr", "warmup_steps", "decay", "end_lr")
_DECAYS = ("cosine", "linear", "constant")


# A pytree like ``params`` whose leaves are the '/'-joined key paths (see mmjax.param_paths).
path_strings = param_paths.tree_paths


def decay_mask(params: Any, exclude: str | Sequence[str] | None = None) -> Any:
    """Returns a bool pytree: True where weight decay applies.

    Decay applies to leaves with ndim >= 2 whose path matches none of the
    ``exclude`` regexes (``None`` -> ``DEFAULT_WD_EXCLUDE``; a given list
    replaces the defaults). Vectors and scalars are never decayed.
    """
    patterns = [re.compile(p) for p in (DEFAULT_WD_EXCLUDE if exclude is None
                                        else param_paths.patterns(exclude, "optimizer.wd_exclude"))]
    return param_paths.map_with_paths(
        lambda path, leaf: len(param_paths.shape(leaf)) >= 2 and not param_paths.search_any(patterns, path),
        params)


# Layer-wise lr decay: what counts as the embedding (layer 0); blocks are found by param_paths.
LAYER_DECAY_EMBED = r"(^|/)(embedding|stem|cls|mask_token|posemb)(/|$)"


def _num_blocks(params: Any) -> int:
    """Blocks in the model's stack: layer_N count, or the leading axis of scanned `layers`."""
    depths = param_paths.stack_depths(params)
    if len(depths) != 1:
        raise ValueError("optimizer.layer_decay needs one stack of blocks named layer_N or a scanned "
                         f"'layers' stack; found depths {sorted(depths) or 'none'}")
    return depths.pop()


def layer_ids(params: Any, num_blocks: int | None = None) -> Any:
    """Per-leaf layer id for layer-wise lr decay: 0 for embeddings, i + 1 for block i, L + 1 for
    the rest. Scanned leaves get an int array (L, 1, ...) of ids along their leading axis."""
    depth = _num_blocks(params) if num_blocks is None else num_blocks
    embed = re.compile(LAYER_DECAY_EMBED)

    def leaf_id(path: str, leaf: Any) -> Any:
        if param_paths.is_stacked(path):
            return jnp.arange(1, depth + 1).reshape((depth,) + (1,) * (len(param_paths.shape(leaf)) - 1))
        block = param_paths.block_index(path)
        if block is not None:
            return block + 1
        return 0 if embed.search(path) else depth + 1

    return param_paths.map_with_paths(leaf_id, params)


def _scale_by_layer_decay(decay: float, num_blocks: int) -> optax.GradientTransformation:
    """Multiplies each update by decay ** (L + 1 - layer id): an lr (and decoupled wd) scale."""

    def update(updates, state, params=None):
        del params
        ids = layer_ids(updates, num_blocks)
        scale = lambda u, i: u * jnp.power(decay, num_blocks + 1 - i).astype(u.dtype)  # noqa: E731
        return jax.tree.map(scale, updates, ids), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _lr_multipliers(value: Any, params: Any) -> list[tuple[re.Pattern, float]]:
    """[(regex, factor), ...] from ``optimizer.lr_multipliers``; every regex must match a parameter."""
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value or ())
    names = jax.tree.leaves(path_strings(params))
    out = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f"optimizer.lr_multipliers takes (regex, factor) pairs, got {pair!r}")
        regex, factor = re.compile(pair[0]), float(pair[1])
        if factor <= 0:
            raise ValueError(f"optimizer.lr_multipliers factor for {pair[0]!r} must be positive, got {factor}")
        if not any(regex.search(name) for name in names):
            raise ValueError(f"optimizer.lr_multipliers regex {pair[0]!r} matches no parameter "
                             f"(paths look like: {', '.join(names[:5])}, ...)")
        out.append((regex, factor))
    return out


def _scale_by_lr_multipliers(multipliers: list[tuple[re.Pattern, float]]) -> optax.GradientTransformation:
    """Multiplies each update by the factor of the first regex its path matches (else 1)."""

    def factor(path: str, leaf: Any) -> float:
        return next((f for regex, f in multipliers if regex.search(path)), 1.0)

    def update(updates, state, params=None):
        del params
        factors = param_paths.map_with_paths(factor, updates)
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _to_dict(cfg: Any, what: str) -> dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"{what} config must be a ConfigDict or a dict, got {type(cfg).__name__}")


def make_schedule(schedule_cfg: Any, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup 0 -> lr, then decay to end_lr at total_steps.

    ``decay`` is "cosine" (half cosine), "linear", or "constant" (stay at lr;
    end_lr unused). Steps past ``total_steps`` stay at the final value.
    """
    cfg = _to_dict(schedule_cfg, "schedule")
    unknown = sorted(set(cfg) - set(_SCHEDULE_KEYS))
    if unknown:
        raise ValueError(f"Unknown schedule key(s) {unknown}; allowed: {list(_SCHEDULE_KEYS)}")
    if "lr" not in cfg or cfg["lr"] is None:
        raise ValueError("schedule.lr is required")
    lr = float(cfg["lr"])
    warmup = int(cfg.get("warmup_steps") or 0)
    decay = cfg.get("decay") or "constant"
    end_lr = float(cfg.get("end_lr") or 0.0)
    total_steps = int(total_steps)
    if decay not in _DECAYS:
        raise ValueError(f"Unknown schedule decay {decay!r}; known: {list(_DECAYS)}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup < 0 or warmup > total_steps:
        raise ValueError(f"warmup_steps={warmup} must be in [0, total_steps={total_steps}]")
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup, 1)
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if decay == "cosine":
            after = end_lr + (lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif decay == "linear":
            after = lr + (end_lr - lr) * frac
        else:
            after = jnp.full_like(frac, lr)
        return jnp.where(step < warmup, warm, after)

    return schedule


def _freeze_labels(params: Any, freeze: Sequence[str]) -> Any:
    patterns = [re.compile(p) for p in freeze]
    return jax.tree.map(
        lambda name: "frozen" if any(p.search(name) for p in patterns) else "trainable",
        path_strings(params))


def _check_freeze(params: Any, freeze: Sequence[str]) -> None:
    """Raises when a freeze regex matches no parameter (almost always a typo)."""
    names = jax.tree.leaves(path_strings(params))
    for pattern in freeze:
        regex = re.compile(pattern)
        if not any(regex.search(name) for name in names):
            example = ", ".join(names[:5])
            raise ValueError(
                f"optimizer.freeze regex {pattern!r} matches no parameter "
                f"(paths look like: {example}, ...)")


def _check_keys(cfg: dict[str, Any], name: str) -> None:
    """Errors on unknown keys, and on set keys that the chosen optimizer ignores."""
    known = set(_COMMON_KEYS).union(*OPTIMIZERS.values())
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"Unknown optimizer key(s) {unknown}; known: {sorted(known)}")
    unused = sorted(k for k in set(cfg) - set(_COMMON_KEYS) - set(OPTIMIZERS[name])
                    if cfg[k] is not None)
    if unused:
        raise ValueError(f"optimizer key(s) {unused} are not used by {name!r}; "
                         f"set them to None or remove them")


def _core(name: str, cfg: dict[str, Any], lr: optax.Schedule, wd: float,
          mask: Callable[[Any], Any]) -> optax.GradientTransformation:
    """The optimizer proper, without clipping or freezing."""
    b1, b2 = cfg.get("b1", 0.9), cfg.get("b2", 0.999)
    b1, b2 = 0.9 if b1 is None else b1, 0.999 if b2 is None else b2
    eps = cfg.get("eps")
    mu_dtype = cfg.get("mu_dtype")
    mu_dtype = jnp.dtype(mu_dtype) if mu_dtype is not None else None
    if name == "adamw":
        return optax.adamw(lr, b1=b1, b2=b2, eps=1e-8 if eps is None else eps,
                           mu_dtype=mu_dtype, weight_decay=wd, mask=mask)
    if name == "adam":
        if wd:
            raise ValueError("optimizer 'adam' has no weight decay; use 'adamw' "
                             f"or set weight_decay=0 (got {wd})")
        return optax.adam(lr, b1=b1, b2=b2, eps=1e-8 if eps is None else eps,
                          mu_dtype=mu_dtype)
    if name == "lamb":
        return optax.lamb(lr, b1=b1, b2=b2, eps=1e-6 if eps is None else eps,
                          weight_decay=wd, mask=mask)
    # sgd: optional momentum, then decoupled weight decay like adamw.
    momentum = cfg.get("momentum") or 0.0
    parts = []
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=bool(cfg.get("nesterov"))))
    if wd:
        parts.append(optax.add_decayed_weights(wd, mask))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def build_optimizer(
    optimizer_cfg: Any,
    schedule_cfg: Any,
    total_steps: int,
    params: Any,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds ``(tx, schedule)`` from config.

    tx = [freeze: set_to_zero on frozen leaves] + for the rest:
    clip_by_global_norm(grad_clip_norm) -> optimizer -> masked weight decay
    -> -lr(step) [-> × layer_decay ** (L + 1 - layer id)] [-> × lr_multipliers' factor].
    "adamw" follows optax.adamw: update = -lr * (adam + wd * param).
    Clipping sees only trainable grads, so frozen grads never shrink the rest.
    Frozen leaves keep no optimizer state, and tx also takes the trainable partition alone
    (``split_frozen``: frozen leaves are ``optax.MaskedNode`` holes in grads and params), which
    is how the trainer runs it, so frozen leaves get no gradients either.
    ``params`` (plain arrays, or shape structs) is used to check ``freeze``.
    Returns the schedule too, for logging the learning rate.
    """
    cfg = _to_dict(optimizer_cfg, "optimizer")
    name = cfg.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer name {name!r}; known: {sorted(OPTIMIZERS)}")
    _check_keys(cfg, name)
    schedule = make_schedule(schedule_cfg, total_steps)
    wd = float(cfg.get("weight_decay") or 0.0)
    exclude = cfg.get("wd_exclude")
    mask = lambda p: decay_mask(p, exclude)  # noqa: E731 - callable: sees partitioned trees.
    tx = _core(name, cfg, schedule, wd, mask)
    layer_decay = cfg.get("layer_decay")
    if layer_decay is not None:
        if not 0.0 < float(layer_decay) <= 1.0:
            raise ValueError(f"optimizer.layer_decay must be in (0, 1], got {layer_decay}")
        tx = optax.chain(tx, _scale_by_layer_decay(float(layer_decay), _num_blocks(params)))
    multipliers = _lr_multipliers(cfg.get("lr_multipliers"), params)
    if multipliers:
        tx = optax.chain(tx, _scale_by_lr_multipliers(multipliers))
    clip = cfg.get("grad_clip_norm")
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    freeze = list(param_paths.patterns(cfg.get("freeze"), "optimizer.freeze"))
    if freeze:
        _check_freeze(params, freeze)
        tx = optax.multi_transform(
            {"trainable": tx, "frozen": optax.set_to_zero()},
            lambda p: _freeze_labels(p, freeze))
    return tx, schedule


# --- The trainable / frozen partition: frozen leaves are not differentiated ---------------------

def trainable_mask(optimizer_cfg: Any, params: Any) -> Any | None:
    """A bool tree like ``params``: False where ``optimizer.freeze`` matches; None if nothing is."""
    freeze = list(param_paths.patterns(_to_dict(optimizer_cfg, "optimizer").get("freeze"), "optimizer.freeze"))
    if not freeze:
        return None
    _check_freeze(params, freeze)
    return jax.tree.map(lambda label: label == "trainable", _freeze_labels(params, freeze))


def split_frozen(params: Any, mask: Any | None) -> tuple[Any, Any]:
    """(trainable, frozen): two trees like ``params``, each with an ``optax.MaskedNode`` hole
    (no leaf) where the other holds the parameter. Without a mask: (params, None)."""
    if mask is None:
        return params, None
    trainable = jax.tree.map(lambda keep, p: p if keep else optax.MaskedNode(), mask, params)
    frozen = jax.tree.map(lambda keep, p: optax.MaskedNode() if keep else p, mask, params)
    return trainable, frozen


def merge_frozen(trainable: Any, frozen: Any, mask: Any | None) -> Any:
    """The full parameter tree again (the inverse of ``split_frozen``)."""
    if mask is None:
        return trainable
    return jax.tree.map(lambda keep, t, f: t if keep else f, mask, trainable, frozen)
