"""big_vision-style experiment configs: load a config file, parse its arg, apply overrides.

An experiment is a Python file (under ``experiments/``) that defines
``get_config(arg: str | None = None) -> ml_collections.ConfigDict``. It is
selected with a spec ``path/to/file.py`` or ``path/to/file.py:key=value,...``
and then tweaked from the command line with ``--config.a.b=value`` overrides.

Locking: every config returned here is ``lock()``-ed. A locked ConfigDict
refuses new keys, so a typo in an override or in code that writes to the
config fails loudly, while existing values stay assignable (overrides need
that). The trainer may turn the final config into a ``FrozenConfigDict``
(immutable, hashable) once overrides are applied; ``apply_overrides`` also
accepts a FrozenConfigDict and returns a locked ConfigDict copy.
"""

from __future__ import annotations

import ast
import copy
import difflib
import hashlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

__all__ = [
    "ConfigKeyError",
    "ConfigTypeError",
    "parse_arg",
    "load_config",
    "apply_overrides",
    "validate",
]

_TRUE = ("true", "1")
_FALSE = ("false", "0")


class ConfigKeyError(KeyError, ValueError):
    """An unknown or missing config key. Catchable as KeyError or ValueError."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message.
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(TypeError, ValueError):
    """A value that cannot take its field's type. Catchable as TypeError or ValueError."""


def _parse_bool(text: str, key: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigTypeError(f"{key}: expected a bool (True/False/true/false/1/0), got {text!r}")


def _literal(text: str) -> Any:
    """literal_eval ``text`` when it is a Python literal, else return it as a str."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _parse_arg_value(text: str, default: Any, key: str) -> Any:
    """Converts one ``parse_arg`` value to the type of its default."""
    if isinstance(default, bool):
        return _parse_bool(text, key)
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigTypeError(
            f"{key}: expected {type(default).__name__}, got {text!r}") from None
    if isinstance(default, str):
        return text
    value = _literal(text)
    if default is not None and not isinstance(value, type(default)):
        if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
            return type(default)(value)
        raise ConfigTypeError(
            f"{key}: expected {type(default).__name__}, got {text!r}")
    return value


def split_top_level(text: str, sep: str) -> list[str]:
    """Splits on `sep` outside brackets and quotes, so ``x=[1, 2],y=3`` has two items for ","."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a ``get_config`` arg like ``"variant=B/16,smoke=True"`` into a ConfigDict.

    The result has exactly the keys of ``defaults``; each given value is
    converted to its default's type (bool accepts True/False/true/false/1/0;
    a None default takes a Python literal, else the raw str). Items split on
    commas outside brackets/quotes, so list values work. A bare ``key``
    (no ``=``) sets a bool default to True. Unknown keys raise a
    ``ConfigKeyError`` (a ValueError) listing the allowed ones.
    """
    values = dict(defaults)
    seen: set[str] = set()
    for item in split_top_level(arg or "", ","):
        item = item.strip()
        if not item:
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigKeyError(
                f"Unknown config arg key {key!r} in {arg!r}; allowed keys: {sorted(defaults)}")
        if key in seen:
            raise ValueError(f"Config arg key {key!r} given twice in {arg!r}")
        seen.add(key)
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"Config arg {key!r} needs a value ({key}=...)")
            values[key] = True
        else:
            values[key] = _parse_arg_value(text.strip(), defaults[key], key)
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config


def _import_file(path: str) -> Any:
    """Imports a Python file by path under a unique module name."""
    abspath = os.path.abspath(path)
    digest = hashlib.sha1(abspath.encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(abspath))[0])
    name = f"mmjax_experiment_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, abspath)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot import config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses/pickle look modules up here.
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/file.py[:arg]`` by calling the file's ``get_config(arg)``.

    The text after the first ``:`` following ``.py`` is passed verbatim as
    ``arg`` (None when absent). Returns a locked ConfigDict.
    """
    match = re.fullmatch(r"(.+?\.py)(?::(.*))?", spec.strip(), flags=re.DOTALL)
    if not match:
        raise ValueError(f"Config spec {spec!r} must look like path/to/file.py[:key=value,...]")
    path, arg = match.group(1), match.group(2)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file not found: {path!r} (from spec {spec!r})")
    module = _import_file(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"Config file {path!r} does not define get_config(arg=None)")
    if not inspect.signature(get_config).parameters:
        if arg is not None:
            raise ValueError(f"{path}: get_config() takes no arg but {arg!r} was given")
        config = get_config()
    else:
        config = get_config(arg)
    if isinstance(config, (ml_collections.FrozenConfigDict, dict)):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    config.lock()
    return config


def _all_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted paths (groups and leaves) in ``config``."""
    paths = []
    for key in config:
        path = f"{prefix}{key}"
        paths.append(path)
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            paths.extend(_all_paths(value, path + "."))
    return paths


def _unknown_key(config: ml_collections.ConfigDict, dotted: str) -> ConfigKeyError:
    candidates = _all_paths(config)
    close = difflib.get_close_matches(dotted, candidates, n=3, cutoff=0.6)
    leaf = dotted.rsplit(".", 1)[-1]
    for path in candidates:  # Also a right name in the wrong group.
        if path.rsplit(".", 1)[-1] == leaf and path not in close:
            close.append(path)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigKeyError(f"Unknown config key {dotted!r}.{hint}")


def _convert(raw: str, current: Any, dotted: str) -> Any:
    """Parses override text ``raw`` and converts it to the type of ``current``."""
    value = _literal(raw)
    if value is None or current is None:
        return value  # "None" unsets any field; an unset field takes anything.
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigTypeError(
            f"Override {dotted}={raw!r}: {dotted!r} is a group; override its leaves "
            f"(e.g. {dotted}.{next(iter(current.keys()), 'key')}=...)")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(current, bool):
        if isinstance(value, (bool, str, int)):
            return _parse_bool(str(value), dotted)
    elif isinstance(current, str):
        return value if isinstance(value, str) else raw.strip()
    elif isinstance(current, int):
        if number and float(value).is_integer():
            return int(value)
    elif isinstance(current, float):
        if number:
            return float(value)
    elif isinstance(current, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(current)(value)
    elif isinstance(value, type(current)):
        return value
    raise ConfigTypeError(
        f"Override {dotted}={raw!r}: expected {type(current).__name__} "
        f"(current value {current!r}), got {type(value).__name__}")


def _split_override(override: str) -> tuple[str, str]:
    text = override.strip()
    for prefix in ("--config.", "config."):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"Override {override!r} must look like --config.a.b=value")
    return key.strip(), raw


def apply_overrides(
    config: ml_collections.ConfigDict | ml_collections.FrozenConfigDict,
    overrides: Sequence[str],
) -> ml_collections.ConfigDict:
    """Returns a locked copy of ``config`` with ``--config.a.b=value`` overrides applied.

    ``config.a.b=value`` and ``a.b=value`` are accepted too. The key must
    exist (else a ``ConfigKeyError`` naming it, with close matches). The value
    is a Python literal if it parses as one, else a str, then converted to the
    field's type: int -> float is fine, "true"/"false"/1/0 work for bools, a
    str field keeps the raw text, lists and tuples convert to each other,
    ``None`` unsets any field and an unset (None) field takes any value.
    Anything else raises ``ConfigTypeError``.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of strings, not one string")
    if isinstance(config, ml_collections.FrozenConfigDict):
        config = ml_collections.ConfigDict(config)
    else:
        config = copy.deepcopy(config)
    config.lock()
    for override in overrides:
        dotted, raw = _split_override(override)
        *parents, leaf = dotted.split(".")
        node = config
        for depth, key in enumerate(parents):
            child = node.get(key)
            if not isinstance(child, ml_collections.ConfigDict):
                if key in node:
                    raise ConfigKeyError(
                        f"Unknown config key {dotted!r}: "
                        f"{'.'.join(parents[:depth + 1])!r} is not a group")
                raise _unknown_key(config, dotted)
            node = child
        if leaf not in node:
            raise _unknown_key(config, dotted)
        node[leaf] = _convert(raw, node[leaf], dotted)
    return config


def validate(config: ml_collections.ConfigDict, required: Sequence[str]) -> None:
    """Raises ``ConfigKeyError`` naming every required key missing from ``config``.

    Keys are top-level names; dotted names (``model.variant``) check nested keys.
    """
    groups = (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)
    missing = []
    for dotted in required:
        node: Any = config
        for key in dotted.split("."):
            if not isinstance(node, groups) or key not in node:
                missing.append(dotted)
                break
            node = node[key]
    if missing:
        raise ConfigKeyError(
            f"Config is missing required key(s): {', '.join(missing)}; "
            f"it has: {sorted(config.keys())}")
