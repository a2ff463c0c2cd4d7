"""Warm start: a run's first parameters come from another run or a model directory.

`config.init` (optional; without it, or with `source=None`, a run starts from its fresh init):

  source  a run's workdir (its orbax checkpoints; only the "params" subtree is read, never the
          optimizer state) or a model directory written by `mmjax-convert` (model_config.json
          + checkpoint/); or several, as [(prefix, path), ...] pairs whose parameters are read
          under `prefix` ("" for the root): a bridge model put together from its parts, e.g.
          [("", STAGE1_WORKDIR), ("language_model/", LM_WORKDIR)]
  step    the workdir's checkpoint step to read (default: the newest good one)
  preset  a registered mapping by name ("same" here; each family registers its own with
          `register_preset` in mmjax/convert/<family>.py: "mae_to_vit", "beit_to_classifier");
          the lists below extend it, and rules given here are tried before the preset's
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
import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import checkpoint, layers, param_paths, paths, pretrained
from mmjax.convert.engine import ConversionError
from mmjax.evaluate import split

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
# Presets: registered by name; a family registers its own next to its conversion tables
# ---------------------------------------------------------------------------------------------

# Fixed rules, or a function of the target model's config and the source's (unscanned) paths.
Preset = InitRules | Callable[[Mapping, Sequence[str]], InitRules]
_PRESETS: dict[str, Preset] = {}
# Importing it imports every family's conversion module (mmjax/convert/<family>.py), whose
# `register_preset` calls fill the registry: adding a family adds no code here.
FAMILIES_MODULE = "mmjax.convert.api"


def register_preset(name: str, preset: Preset) -> Preset:
    """Makes `init.preset=name` available. Registering another preset under a taken name is an
    error (registering the same one again, as a re-imported module does, is not)."""
    if not (isinstance(preset, InitRules) or callable(preset)):
        raise TypeError(f"init preset {name!r} must be InitRules or a function (model, source paths) -> "
                        f"InitRules, got {type(preset).__name__}")
    known = _PRESETS.get(name)
    if known is not None and _qualified(known) != _qualified(preset):
        raise ValueError(f"init preset {name!r} is already registered ({_qualified(known)})")
    _PRESETS[name] = preset
    return preset


def _qualified(preset: Preset) -> str:
    if isinstance(preset, InitRules):
        return repr(preset)
    return f"{preset.__module__}.{getattr(preset, '__qualname__', preset)}"


def presets() -> dict[str, Preset]:
    """Every registered preset by name (the families' included)."""
    importlib.import_module(FAMILIES_MODULE)
    return dict(_PRESETS)


def _same(model: Mapping, source: Sequence[str]) -> InitRules:
    """Identical trees (FLIP's unmasked tuning, a longer schedule, another mesh)."""
    return InitRules()


register_preset("same", _same)


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


def init_rules(init: Mapping, model: Mapping, source: Sequence[str]) -> InitRules:
    """The preset's rules (if any) extended by the config's own `rules`, `fresh`, `drop`, `sincos`."""
    rules = []
    for item in init.get("rules") or ():
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ValueError(f"init.rules: each rule is a (target regex, source template) pair, got {item!r}")
        param_paths.patterns(item[0], "init.rules")
        rules.append(tuple(item))
    lists = (param_paths.patterns(init.get(k), f"init.{k}") for k in ("fresh", "drop", "sincos"))
    own = InitRules(tuple(rules), *lists)
    name = init.get("preset")
    if name is None:
        return own
    known = presets()
    if name not in known:
        raise ValueError(f"Unknown init.preset {name!r}; known: {sorted(known)}")
    preset = known[name]
    return own + (preset if isinstance(preset, InitRules) else preset(model, source))


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
        return param_paths.unstack_layers(flat), f"model directory {path} ({type(model).__name__})"
    run_like = paths.isdir(path) and any(                  # a workdir, one step, or checkpoints/
        n in ("checkpoints", "state") or n.isdigit() for n in paths.listdir(path))
    if not run_like:
        raise FileNotFoundError(f"init.source {path!r} is neither a run's workdir (no checkpoints/) nor a "
                                f"model directory (no {pretrained.CONFIG_FILE})")
    step_dir = checkpoint.resolve_step_dir(path, step)  # the newest good step, or `step`
    params = checkpoint.restore_params(step_dir)
    return param_paths.unstack_layers(param_paths.flatten(params)), f"{path} (step {paths.basename(step_dir)})"


def read_sources(source: Any, step: int | None = None) -> tuple[dict[str, np.ndarray], str]:
    """`read_source` of one path, or of [(prefix, path), ...] merged with each prefix put before its
    paths (a path two sources both give is an error)."""
    if isinstance(source, str):
        return read_source(source, step)
    pairs = list(source)
    if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
                            for p in pairs):
        raise ValueError(f"init.source must be a path or a list of (prefix, path) pairs, got {source!r}")
    if step is not None:
        raise ValueError("init.step applies to one source; with several, each is read at its newest good step")
    merged, wheres = {}, []
    for prefix, path in pairs:
        arrays, where = read_source(path)
        clashes = sorted(set(merged) & {prefix + k for k in arrays})
        if clashes:
            raise WarmStartError(f"init.source: {len(clashes)} parameters come from two sources, e.g. {clashes[:3]}")
        merged.update({prefix + k: v for k, v in arrays.items()})
        wheres.append(f"{where} under {prefix!r}" if prefix else where)
    return merged, " + ".join(wheres)


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
        if param_paths.fullmatch_any(rules.sincos, path):
            table = _sincos_table(path, shape, target)
            if isinstance(table, str):
                misshaped.append(table)
            else:
                out.arrays[path] = np.asarray(table, dtype)
                out.sincos.append(path)
            continue
        if param_paths.fullmatch_any(rules.fresh, path):
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
            (out.dropped if param_paths.fullmatch_any(rules.drop, path) else unused).append(path)
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

def _summary(paths: Sequence[str]) -> str:
    groups = collections.Counter(p.split("/")[0] for p in paths)
    return ", ".join(f"{name} ({n})" for name, n in groups.items())


def apply(config: ml_collections.ConfigDict, params: Any, shardings: Any) -> Any:
    """`params` with `config.init` applied (unchanged without a source), in the same shardings."""
    init = config_block(config.get("init"))
    if not init["source"]:
        return params
    source, where = read_sources(init["source"], init["step"])
    model = config.get("model") or {}
    rules = init_rules(init, model.to_dict() if hasattr(model, "to_dict") else dict(model), list(source))

    leaves, treedef = param_paths.paths_and_leaves(params)
    flat_shardings = jax.tree.leaves(shardings)
    # The unscanned paths of each leaf: itself, or `.../layer_{i}/...` for a scanned leaf.
    parts = {p: param_paths.unstacked_paths(p, leaf.shape[0] if param_paths.is_stacked(p) else 1)
             for p, leaf in leaves}
    target = {}
    for p, leaf in leaves:
        for part in parts[p]:
            shape = leaf.shape[1:] if param_paths.is_stacked(p) else leaf.shape
            target[part] = jax.ShapeDtypeStruct(shape, leaf.dtype)
    mapped = map_params(target, source, rules, what=where)

    new_leaves = []
    for (p, leaf), sharding in zip(leaves, flat_shardings, strict=True):
        names = parts[p]
        have = [n in mapped.arrays for n in names]
        if not any(have):
            new_leaves.append(leaf)             # fresh: keep the sharded init
            continue
        if all(have):
            host = (mapped.arrays[p] if names == [p] else np.stack([mapped.arrays[n] for n in names]))
        else:                                   # some layers of a scanned leaf fresh, some loaded
            host = np.array(split.fetch(leaf))
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
