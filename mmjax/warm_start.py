"""Warm start: a run's first parameters come from another run or a model directory.

`config.init` (optional; without it, or with `source=None`, a run starts from its fresh init):

  source  a run's workdir (its orbax checkpoints; only the "params" subtree is read, never the
          optimizer state) or a model directory written by `mmjax-convert` (model_config.json
          + checkpoint/)
  step    the workdir's checkpoint step to read (default: the newest good one)
  preset  a named mapping from PRESETS ("same", "mae_to_vit", "beit_to_classifier"); the lists
          below extend it, and rules given here are tried before the preset's
  rules   [(target regex, source template), ...]: a target parameter whose path fully matches
          the regex is read from the source path that `match.expand(template)` gives; a target
          that no rule matches is read from the same path in the source
  fresh   target path regexes that keep their fresh initialisation (a new head, say)
  drop    source path regexes that are read and ignored (a pretraining decoder, say)
  sincos  target path regexes of learned position embeddings filled with the fixed 2-D sin-cos
          table of their grid, prefix tokens zero (MAE's fixed embedding, made learnable)

Paths are `/`-joined and use the unscanned layout (`encoder/layer_3/...`) on both sides, so
scanned (`encoder/layers/...`) and unscanned models map onto each other. Every target parameter
must be loaded, fresh or sincos, and every source parameter used or dropped; otherwise one
WarmStartError lists every unmatched target, unused source and mis-shaped pair. Learned position
embeddings (`.../posemb/pos_embedding`) of another grid are resampled bicubically, and BEiT
relative position tables (`.../rel_pos_bias/table`) of another window as BEiT does (fine-tuning
at 384 from a 224 pretraining).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import checkpoint, paths, pretrained
from mmjax.convert.engine import ConversionError, flatten, unstack_layers
from mmjax.models import layers
from mmjax.tasks import base

KEYS = ("source", "step", "preset", "rules", "fresh", "drop", "sincos")
POSEMB = pretrained.POSEMB


class WarmStartError(ConversionError):
    """The source parameters do not fit the model under the given rules."""


@dataclasses.dataclass(frozen=True)
class InitRules:
    """How source parameters map onto target parameters (see the module docstring)."""

    rules: tuple[tuple[str, str], ...] = ()
    fresh: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    sincos: tuple[str, ...] = ()

    def __add__(self, other: InitRules) -> InitRules:
        """`self` first: its rules win; the pattern lists are joined."""
        return InitRules(self.rules + other.rules, self.fresh + other.fresh, self.drop + other.drop,
                         self.sincos + other.sincos)


# ---------------------------------------------------------------------------------------------
# Presets: functions of the target model's config and the source's (unscanned) paths
# ---------------------------------------------------------------------------------------------

def _same(model: Mapping, source: Sequence[str]) -> InitRules:
    """Identical trees (FLIP's unmasked tuning, a longer schedule, another mesh)."""
    return InitRules()


def _mae_to_vit(model: Mapping, source: Sequence[str]) -> InitRules:
    """MAE pretraining → ViT classifier, as MAE's main_finetune.py: copy `embedding`, `cls` and
    `encoder`; a learned `posemb` starts from the fixed sin-cos table; the head (and with
    `fc_norm` the norm, which then acts on the pooled vector) start fresh; the decoder is dropped."""
    fc_norm = bool(model.get("fc_norm", False))
    norm = ("norm/.*",) if fc_norm else ()
    sincos = () if POSEMB in source else (POSEMB,)       # a timm-style MAE ViT has its own table
    return InitRules(fresh=("head/.*", "pre_logits/.*", *norm),
                     drop=("decoder.*", "mask_token", *norm), sincos=sincos)


def _beit_to_classifier(model: Mapping, source: Sequence[str]) -> InitRules:
    """BEiT pretraining (a `beit` run: {"beit", "tokenizer"}, or a BEiT model directory) →
    `beit_classification`, as BEiT's run_class_finetuning.py: copy the backbone, give every
    layer of a per-layer relative position bias the shared table, start `norm` (here on the
    pooled vector) and `head` fresh; drop the mask token, the visual-token head and the dVAE."""
    prefix = "beit/" if any(p.startswith("beit/") for p in source) else ""
    rules = []
    if f"{prefix}rel_pos_bias/table" in source:
        rules.append((r"encoder/layer_\d+/rel_pos_bias/table", f"{prefix}rel_pos_bias/table"))
    if prefix:
        rules.append(("(.*)", prefix + r"\1"))
    return InitRules(tuple(rules), fresh=("norm/.*", "head/.*"),
                     drop=("tokenizer/.*", f"{prefix}mask_token", f"{prefix}norm/.*", f"{prefix}head/.*"))


PRESETS: dict[str, Callable[[Mapping, Sequence[str]], InitRules]] = {
    "same": _same, "mae_to_vit": _mae_to_vit, "beit_to_classifier": _beit_to_classifier}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def config_block(init: Mapping | None = None) -> dict:
    """`init` with every key of KEYS (None when unset); unknown keys are an error."""
    if isinstance(init, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        init = init.to_dict()
    init = dict(init or {})
    unknown = sorted(set(init) - set(KEYS))
    if unknown:
        raise ValueError(f"Unknown init key(s) {unknown}; known: {list(KEYS)}")
    return {k: init.get(k) for k in KEYS}


def _patterns(value: Any, key: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value or ())
    for p in items:
        try:
            re.compile(p)
        except (re.error, TypeError) as e:
            raise ValueError(f"init.{key}: {p!r} is not a regular expression ({e})") from None
    return items


def init_rules(init: Mapping, model: Mapping, source: Sequence[str]) -> InitRules:
    """The preset's rules (if any) extended by the config's own `rules`, `fresh`, `drop`, `sincos`."""
    rules = []
    for item in init.get("rules") or ():
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ValueError(f"init.rules: each rule is a (target regex, source template) pair, got {item!r}")
        _patterns(item[0], "rules")
        rules.append(tuple(item))
    own = InitRules(tuple(rules), _patterns(init.get("fresh"), "fresh"), _patterns(init.get("drop"), "drop"),
                    _patterns(init.get("sincos"), "sincos"))
    name = init.get("preset")
    if name is None:
        return own
    if name not in PRESETS:
        raise ValueError(f"Unknown init.preset {name!r}; known: {sorted(PRESETS)}")
    return own + PRESETS[name](model, source)


# ---------------------------------------------------------------------------------------------
# Reading the source
# ---------------------------------------------------------------------------------------------

def read_source(path: str, step: int | None = None) -> tuple[dict[str, np.ndarray], str]:
    """(unscanned flat params as host arrays, a description) of a run workdir or model directory."""
    path = paths.expand(str(path))  # a local path or a bucket URL (gs://...)
    if not paths.exists(path):
        raise FileNotFoundError(f"init.source {path!r} does not exist (a run's workdir or a model directory "
                                "written by mmjax-convert)")
    # A model directory holds checkpoint/; a run (checkpoints/) also writes model_config.json.
    if paths.isdir(paths.join(path, pretrained.CHECKPOINT_DIR)):
        if step is not None:
            raise ValueError(f"init.step={step} applies to run workdirs; {path} is a model directory")
        model, flat = pretrained.load_arrays(path)
        return unstack_layers(flat), f"model directory {path} ({type(model).__name__})"
    run_like = paths.isdir(path) and any(                  # a workdir, one step, or checkpoints/
        n in ("checkpoints", "state") or n.isdigit() for n in paths.listdir(path))
    if not run_like:
        raise FileNotFoundError(f"init.source {path!r} is neither a run's workdir (no checkpoints/) nor a "
                                f"model directory (no {pretrained.CONFIG_FILE})")
    step_dir = checkpoint.resolve_step_dir(path, step)  # the newest good step, or `step`
    params = checkpoint.restore_params(step_dir)
    return unstack_layers(flatten(params)), f"{path} (step {paths.basename(step_dir)})"


# ---------------------------------------------------------------------------------------------
# Mapping (host side, pure)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Mapped:
    """What `map_params` decided: arrays for loaded targets, and the rest by kind."""

    arrays: dict[str, np.ndarray]
    fresh: list[str]
    sincos: list[str]
    dropped: list[str]
    notes: list[str]


def _matches(patterns: Sequence[str], path: str) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def _source_path(rules: Sequence[tuple[str, str]], target: str) -> str:
    for pattern, template in rules:
        if (m := re.fullmatch(pattern, target)):
            return m.expand(template)
    return target


def _prefix_tokens(path: str, target: Mapping[str, Any]) -> int:
    """1 when the embedding's module has a [CLS] sibling (`.../cls`), as ViT, CLIP and BEiT name it."""
    return int(f"{path[:-len(POSEMB)]}cls" in target)


def _square(tokens: int) -> int | None:
    side = math.isqrt(tokens)
    return side if side * side == tokens else None


def _sincos_table(path: str, shape: tuple[int, ...], target: Mapping[str, Any]) -> np.ndarray | str:
    """The fixed sin-cos table for a (1, prefix + side², width) embedding, or why there is none."""
    prefix = _prefix_tokens(path, target) if path.endswith(POSEMB) else 0
    side = _square(shape[1] - prefix) if len(shape) == 3 and shape[0] == 1 else None
    if side is None or shape[2] % 4:
        return f"{path} {shape}: not a (1, prefix + side², width/4·4) position embedding"
    table = layers.sincos_2d((side, side), shape[2])
    return np.concatenate([np.zeros((1, prefix, shape[2]), np.float32), table], axis=1)


def _report(title: str, problems: dict[str, list[str]]) -> str:
    lines = [title]
    for kind, items in problems.items():
        if items:
            lines += [f"{len(items)} {kind}:", *(f"  {item}" for item in items)]
    lines.append("Map them with init.rules / init.preset, keep targets at their init with init.fresh, "
                 "or ignore source parameters with init.drop.")
    return "\n".join(lines)


def map_params(target: Mapping[str, Any], source: Mapping[str, np.ndarray], rules: InitRules,
               what: str = "init.source") -> Mapped:
    """Maps unscanned flat source arrays onto unscanned flat target shapes (anything with .shape
    and .dtype); raises WarmStartError listing every problem at once."""
    out = Mapped({}, [], [], [], [])
    used: set[str] = set()
    unmatched, misshaped = [], []
    for path, want in target.items():
        shape, dtype = tuple(want.shape), want.dtype
        if _matches(rules.sincos, path):
            table = _sincos_table(path, shape, target)
            if isinstance(table, str):
                misshaped.append(table)
            else:
                out.arrays[path] = np.asarray(table, dtype)
                out.sincos.append(path)
            continue
        if _matches(rules.fresh, path):
            out.fresh.append(path)
            continue
        src = _source_path(rules.rules, path)
        if src not in source:
            unmatched.append(f"{path} {shape}" + (f" (looked for {src})" if src != path else ""))
            continue
        used.add(src)
        value = np.asarray(source[src])
        if value.shape != shape:
            resampled = pretrained.resized(
                path, value, shape, _prefix_tokens(path, target) if path.endswith(POSEMB) else 0)
            if resampled is None:
                misshaped.append(f"{path}: the model needs {shape}, {src} is {value.shape}")
                continue
            out.notes.append(f"init: resized {src} {value.shape} to {path} {shape} (bicubic)")
            value = resampled
        out.arrays[path] = np.asarray(value, dtype)
    unused = []
    for path in source:
        if path not in used:
            (out.dropped if _matches(rules.drop, path) else unused).append(path)
    unused = [f"{p} {np.shape(source[p])}" for p in unused]
    problems = {"model parameters with no source (unmatched targets)": unmatched,
                "source parameters neither used nor dropped (unused sources)": unused,
                "mis-shaped parameters": misshaped}
    if any(problems.values()):
        raise WarmStartError(_report(f"The parameters in {what} do not fit the model:", problems))
    return out


# ---------------------------------------------------------------------------------------------
# Applying to the trainer's sharded parameters
# ---------------------------------------------------------------------------------------------

def _path(keys: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def _unscanned_parts(path: str, leaf: Any) -> list[str]:
    """The unscanned paths of one leaf: itself, or `.../layer_{i}/...` for a scanned leaf."""
    view = np.broadcast_to(np.zeros((), np.dtype(leaf.dtype)), leaf.shape)   # no memory
    return list(unstack_layers({path: view}))


def _summary(paths: Sequence[str]) -> str:
    groups = collections.Counter(p.split("/")[0] for p in paths)
    return ", ".join(f"{name} ({n})" for name, n in groups.items())


def apply(config: ml_collections.ConfigDict, params: Any, shardings: Any) -> Any:
    """`params` with `config.init` applied (unchanged without a source), in the same shardings."""
    init = config_block(config.get("init"))
    if not init["source"]:
        return params
    source, where = read_source(init["source"], init["step"])
    model = config.get("model") or {}
    rules = init_rules(init, model.to_dict() if hasattr(model, "to_dict") else dict(model), list(source))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat_shardings = jax.tree.leaves(shardings)
    paths = [_path(k) for k, _ in leaves]
    parts = {p: _unscanned_parts(p, leaf) for p, (_, leaf) in zip(paths, leaves, strict=True)}
    target = {}
    for p, (_, leaf) in zip(paths, leaves, strict=True):
        for part in parts[p]:
            shape = leaf.shape if len(parts[p]) == 1 and part == p else leaf.shape[1:]
            target[part] = jax.ShapeDtypeStruct(shape, leaf.dtype)
    mapped = map_params(target, source, rules, what=where)

    new_leaves = []
    for p, (_, leaf), sharding in zip(paths, leaves, flat_shardings, strict=True):
        names = parts[p]
        have = [n in mapped.arrays for n in names]
        if not any(have):
            new_leaves.append(leaf)             # fresh: keep the sharded init
            continue
        if all(have):
            host = (mapped.arrays[p] if names == [p] else np.stack([mapped.arrays[n] for n in names]))
        else:                                   # some layers of a scanned leaf fresh, some loaded
            host = np.array(base.fetch(leaf))
            for i, n in enumerate(names):
                if n in mapped.arrays:
                    host[i] = mapped.arrays[n]
        host = np.asarray(host, leaf.dtype)
        new_leaves.append(jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index]))

    for note in mapped.notes:
        print(note, flush=True)
    loaded = len(mapped.arrays) - len(mapped.sincos)
    line = (f"init: {loaded} of {len(target)} parameter arrays from {where}"
            + (f" with preset {init['preset']!r}" if init["preset"] else ""))
    if mapped.fresh:
        line += f"; kept at init: {_summary(mapped.fresh)}"
    if mapped.sincos:
        line += f"; fixed sin-cos table: {', '.join(mapped.sincos)}"
    if mapped.dropped:
        line += f"; dropped from the source: {_summary(mapped.dropped)}"
    print(line, flush=True)
    return jax.tree_util.tree_unflatten(treedef, new_leaves)
