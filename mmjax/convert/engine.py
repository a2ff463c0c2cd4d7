"""The conversion engine: declarative key rules with invertible transforms.

A `Rule` names one PyTorch state-dict key (a pattern: `{i}` stands for a layer index), the
mmjax parameter path(s) it fills (`/`-separated; several paths when a fused tensor such as
qkv is split along its first axis) and a `Transform` that maps the array. Every transform
knows the PyTorch shape that a given mmjax shape requires, so shapes are checked before any
array is touched, and knows its inverse, so the same table converts in both directions.

`to_mmjax` and `to_torch` collect every missing, unexpected and mis-shaped key and raise one
`ConversionError` that lists them all: a checkpoint is loaded completely or not at all.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mmjax import param_paths

Shape = tuple[int, ...]


class ConversionError(ValueError):
    """A checkpoint that does not fit the model (or a model that does not fit a format)."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one tensor changes between PyTorch and mmjax layouts.

    torch_shape: the PyTorch shape that an mmjax parameter of a given shape requires.
    to_mmjax: (torch array, mmjax shape) -> mmjax array.  to_torch: mmjax array -> torch array.
    """

    name: str
    torch_shape: Callable[[Shape], Shape]
    to_mmjax: Callable[[np.ndarray, Shape], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


COPY = Transform("copy", lambda s: s, lambda x, s: x, lambda y: y)
# torch Linear weight (out, in) <-> flax Dense kernel (in, out).
LINEAR = Transform("linear", lambda s: s[::-1], lambda x, s: x.T, lambda y: y.T)
# torch Conv2d weight OIHW <-> flax Conv kernel HWIO.
CONV = Transform("conv", lambda s: (s[3], s[2], s[0], s[1]),
                 lambda x, s: x.transpose(2, 3, 1, 0), lambda y: y.transpose(3, 2, 0, 1))
# Linear into heads: weight (heads*head_dim, embed) <-> kernel (embed, heads, head_dim).
HEADS_IN = Transform("heads_in", lambda s: (s[1] * s[2], s[0]),
                     lambda x, s: x.T.reshape(s), lambda y: y.reshape(y.shape[0], -1).T)
# Its bias: (heads*head_dim,) <-> (heads, head_dim).
HEADS_BIAS = Transform("heads_bias", lambda s: (s[0] * s[1],),
                       lambda x, s: x.reshape(s), lambda y: y.reshape(-1))
# Linear out of heads: weight (embed, heads*head_dim) <-> kernel (heads, head_dim, embed).
HEADS_OUT = Transform("heads_out", lambda s: (s[2], s[0] * s[1]),
                      lambda x, s: x.T.reshape(s), lambda y: y.reshape(-1, y.shape[-1]).T)


def drop_leading(n: int) -> Transform:
    """torch tensor without the `n` leading unit axes that mmjax keeps, e.g. (w,) <-> (1, 1, w)."""
    return Transform(f"drop_leading({n})", lambda s: s[n:],
                     lambda x, s: x.reshape(s), lambda y: y.reshape(y.shape[n:]))


@dataclasses.dataclass(frozen=True)
class Rule:
    """torch key pattern -> mmjax path pattern(s), with a transform.

    `export=False` marks an alternative (e.g. legacy) spelling of a key that is read but never
    written; the first exportable rule for an mmjax path decides the written name.
    """

    torch_key: str
    mmjax_paths: tuple[str, ...]
    transform: Transform = COPY
    export: bool = True


def rule(torch_key: str, mmjax_path: str | Iterable[str], transform: Transform = COPY,
         export: bool = True) -> Rule:
    paths = (mmjax_path,) if isinstance(mmjax_path, str) else tuple(mmjax_path)
    return Rule(torch_key, paths, transform, export)


# Helpers for the common module shapes; `src` is a torch module prefix, `dst` an mmjax one.

def linear(src: str, dst: str, **kw) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}/kernel", LINEAR, **kw), rule(f"{src}.bias", f"{dst}/bias", **kw)]


def norm(src: str, dst: str, **kw) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}/scale", **kw), rule(f"{src}.bias", f"{dst}/bias", **kw)]


def conv(src: str, dst: str, **kw) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}/kernel", CONV, **kw), rule(f"{src}.bias", f"{dst}/bias", **kw)]


def heads_in(src: str, dst: str, **kw) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}/kernel", HEADS_IN, **kw),
            rule(f"{src}.bias", f"{dst}/bias", HEADS_BIAS, **kw)]


def heads_out(src: str, dst: str, **kw) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}/kernel", HEADS_OUT, **kw), rule(f"{src}.bias", f"{dst}/bias", **kw)]


def fused_qkv(weight: str, bias: str, dst: str) -> list[Rule]:
    """One (3*width, width) in-projection (rows q | k | v) <-> mmjax query/key/value."""
    names = ("query", "key", "value")
    return [rule(weight, [f"{dst}/{n}/kernel" for n in names], HEADS_IN),
            rule(bias, [f"{dst}/{n}/bias" for n in names], HEADS_BIAS)]


def attention(q: str, k: str, v: str, out: str, dst: str, **kw) -> list[Rule]:
    """Separate q/k/v/out torch Linears <-> mmjax Attention."""
    return [*heads_in(q, f"{dst}/query", **kw), *heads_in(k, f"{dst}/key", **kw),
            *heads_in(v, f"{dst}/value", **kw), *heads_out(out, f"{dst}/out", **kw)]


@dataclasses.dataclass(frozen=True)
class Table:
    """The rules of one model family in one source ecosystem.

    `ignore`: regular expressions for torch keys that carry no weights (buffers such as
    `position_ids`, metadata such as OpenAI's `input_resolution`); read and dropped.
    """

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "_torch_res", [_compile(r.torch_key) for r in self.rules])
        object.__setattr__(self, "_mmjax_res", [[_compile(p) for p in r.mmjax_paths] for r in self.rules])
        object.__setattr__(self, "_ignore_res", [re.compile(p) for p in self.ignore])


@dataclasses.dataclass
class Plan:
    """What a source checkpoint becomes: an mmjax model (class path and fields), the example
    inputs that initialise it, the table that fills its parameters, and a note of the source."""

    model_class: str
    fields: dict
    inputs: list[dict]
    table: Table
    source: dict
    notes: list[str] = dataclasses.field(default_factory=list)


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(re.escape(p) if j % 2 == 0 else f"(?P<{p}>\\d+)" for j, p in enumerate(parts))
    return re.compile(regex)


def _shape(x: Any) -> Shape:
    return tuple(int(d) for d in np.shape(x))


def _report(title: str, problems: dict[str, list[str]]) -> str:
    lines = [title]
    for kind, items in problems.items():
        if items:
            lines.append(f"{len(items)} {kind}:")
            lines.extend(f"  {item}" for item in items)
    return "\n".join(lines)


def to_mmjax(state: Mapping[str, np.ndarray], table: Table, expected: Mapping[str, Any],
             what: str = "checkpoint") -> dict[str, np.ndarray]:
    """Maps a flat torch state dict onto the flat mmjax params `expected` (path -> shape/dtype).

    Returns path -> array (cast to the expected dtype). Raises ConversionError listing every
    unexpected, mis-shaped and missing key when the checkpoint does not fit exactly.
    """
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    reported: set[str] = set()        # targets of mis-shaped keys: not "missing" as well
    unexpected, misshaped, duplicated = [], [], []
    for key, value in state.items():
        if any(r.fullmatch(key) for r in table._ignore_res):
            continue
        shape = _shape(value)
        found = next(((r, m) for r, m in zip(table.rules, (t.fullmatch(key) for t in table._torch_res)) if m),
                     None)
        if found is None:
            unexpected.append(f"{key} {shape}: no rule for this key")
            continue
        rl, match = found
        paths = [p.format(**match.groupdict()) for p in rl.mmjax_paths]
        absent = [p for p in paths if p not in expected]
        if absent:
            unexpected.append(f"{key} {shape}: the model has no {absent[0]}")
            continue
        parts = [rl.transform.torch_shape(_shape(expected[p])) for p in paths]
        want = parts[0] if len(parts) == 1 else (sum(s[0] for s in parts), *parts[0][1:])
        if shape != want:
            misshaped.append(f"{key}: checkpoint has {shape}, the model needs {want} (for {', '.join(paths)})")
            reported.update(paths)
            continue
        pieces = np.split(np.asarray(value), np.cumsum([s[0] for s in parts])[:-1]) if len(paths) > 1 else [value]
        for path, piece in zip(paths, pieces):
            if path in out:
                duplicated.append(f"{key} and {origin[path]} both map to {path}")
                continue
            target = expected[path]
            dtype = getattr(target, "dtype", np.float32)
            array = rl.transform.to_mmjax(np.asarray(piece), _shape(target))
            out[path], origin[path] = np.asarray(array, dtype, order="C"), key    # contiguous: fast to save
    missing = [f"{p} {_shape(expected[p])}{_expected_key(table, p)}" for p in expected
               if p not in out and p not in reported]
    problems = {"unexpected keys (no place in the model)": unexpected, "mis-shaped keys": misshaped,
                "keys mapped twice": duplicated, "missing model parameters (absent from the checkpoint)": missing}
    if any(problems.values()):
        raise ConversionError(_report(f"The {what} does not fit the model:", problems))
    return out


def _expected_key(table: Table, path: str) -> str:
    """", from KEY": the checkpoint key that a missing mmjax parameter is read from, to name it."""
    for rl, regexes in zip(table.rules, table._mmjax_res):
        for regex in regexes:
            if rl.export and (m := regex.fullmatch(path)):
                return f", from {rl.torch_key.format(**m.groupdict())}"
    return ""


def to_torch(params: Mapping[str, np.ndarray], table: Table, what: str = "state dict") -> dict[str, np.ndarray]:
    """Maps flat mmjax params (path -> array) back to a torch-keyed state dict (numpy arrays)."""
    pieces: dict[str, dict[int, np.ndarray]] = {}
    owner: dict[str, Rule] = {}
    unmapped = []
    for path, value in params.items():
        found = None
        for rl, regexes in zip(table.rules, table._mmjax_res):
            if not rl.export:
                continue
            for j, regex in enumerate(regexes):
                if (m := regex.fullmatch(path)):
                    found = rl, j, m
                    break
            if found:
                break
        if found is None:
            unmapped.append(f"{path} {_shape(value)}")
            continue
        rl, j, match = found
        key = rl.torch_key.format(**match.groupdict())
        owner[key] = rl
        pieces.setdefault(key, {})[j] = np.array(rl.transform.to_torch(np.asarray(value)), order="C")
    incomplete = [f"{key}: has {sorted(p)} of the {len(owner[key].mmjax_paths)} fused parts"
                  for key, p in pieces.items() if len(p) != len(owner[key].mmjax_paths)]
    if unmapped or incomplete:
        raise ConversionError(_report(
            f"These parameters have no place in the {what}:",
            {"parameters without a rule": unmapped, "incomplete fused tensors": incomplete}))
    return {key: p[0] if len(p) == 1 else np.concatenate([p[j] for j in range(len(p))])
            for key, p in pieces.items()}


def require(fields: dict, target: str, **wanted) -> None:
    """Raises unless the model's computation (not only its parameters) can be expressed in `target`.
    Tuples and lists compare alike (model_config.json stores tuples as lists)."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    bad = [f"{k}={fields.get(k)!r} (needs {v!r})" for k, v in wanted.items() if plain(fields.get(k, v)) != plain(v)]
    if bad:
        raise ConversionError(f"This model cannot be written as a {target} checkpoint: {', '.join(bad)}")


# ---------------------------------------------------------------------------------------------
# Flat paths and scanned layouts: mmjax.param_paths, with layout errors as ConversionError
# ---------------------------------------------------------------------------------------------

flatten, unflatten, unstack_layers = param_paths.flatten, param_paths.unflatten, param_paths.unstack_layers


def stack_layers(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`param_paths.stack_layers`: unrolled `layer_{i}` params -> a scanned `layers` stack."""
    try:
        return param_paths.stack_layers(flat)
    except param_paths.LayerStackError as e:
        raise ConversionError(str(e)) from None
