"""Model directories: what `mmjax-convert` writes and `mmjax.load` reads.

    DIR/model_config.json   {"format": "mmjax-model/1", "class": "mmjax.models.vit.ViT",
                             "fields": {...dataclass fields...}, "inputs": [example input specs],
                             "source": {...where the weights came from...}}
    DIR/checkpoint/         orbax checkpoint of {"params": ...}

The directory rebuilds its model without knowing the source. `load` can switch the layer
layout (`scan=True` stacks `layer_{i}` into a scanned `layers` axis and back) and the image
size (learned position embeddings are resampled bicubically, as timm does, and BEiT's relative
position tables as BEiT's fine-tuning code does). A training workdir loads the same way
(`mmjax.runs`): the model the run trains, from its newest good checkpoint or `step=`.
model_config.json may also hold the inference keys of `mmjax.inference_spec`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmjax import layers, paths
from mmjax.convert.engine import ConversionError, stack_layers
from mmjax.param_paths import flatten, is_stacked, unflatten, unstack_layers

FORMAT = "mmjax-model/1"
CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoint"
# Compute/layout knobs that every tower has: an override also reaches nested tower configs.
TOWER_KNOBS = ("scan", "remat_policy", "dtype", "attention_impl")


def input_spec(shape: Sequence[int], dtype: str = "float32") -> dict:
    """One example input for `model.init`, e.g. input_spec((1, 224, 224, 3)) for images."""
    return {"shape": [int(d) for d in shape], "dtype": str(dtype)}


def model_fields(model: nn.Module) -> dict:
    """The module's dataclass fields as JSON values (compute dtypes are left out)."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if k != "dtype"}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value
    fields = {f.name: plain(getattr(model, f.name)) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name", "dtype")}
    json.dumps(fields)      # fails loudly on a field that is not JSON
    return fields


def with_overrides(cls: type, fields: dict, overrides: dict) -> dict:
    """Fields with overrides applied; TOWER_KNOBS also go into nested tower dicts (CLIP's towers)."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: dict(v) if isinstance(v, dict) else v for k, v in fields.items()}
    for key, value in overrides.items():
        placed = key in names
        if placed:
            fields[key] = value
        if key in TOWER_KNOBS:
            for name, sub in fields.items():
                if isinstance(sub, dict) and name in names:
                    sub[key] = value
                    placed = True
        if not placed:
            raise ValueError(f"{cls.__name__} has no field {key!r}; fields: {sorted(names - {'parent', 'name'})}")
    return fields


def _model_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    if not module.startswith("mmjax.models."):
        raise ConversionError(f"Model class {path!r} is not an mmjax model (mmjax.models.*)")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConversionError(f"{path!r} is not a flax module class")
    return cls


def _as_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_tuples(v) for k, v in value.items()}
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def build(class_path: str, fields: dict) -> nn.Module:
    return _model_class(class_path)(**_as_tuples(fields))


def abstract_params(model: nn.Module, inputs: Sequence[dict]) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat path -> ShapeDtypeStruct of the params `model.init` creates (tracing only)."""
    args = [jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"])) for s in inputs]
    shapes = jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs), *args)
    return flatten(nn.meta.unbox(shapes)["params"])


def save(directory: str, model: nn.Module, params: dict, inputs: Sequence[dict],
         source: dict | None = None, overwrite: bool = False, inference: dict | None = None) -> None:
    """Writes a model directory: model_config.json and an orbax checkpoint of {"params": params}.
    `inference`: "preprocess", "tokenizer", "class_names" (see mmjax.inference_spec)."""
    directory = paths.absolute(directory)  # a local folder or a bucket URL (gs://...)
    config_path = paths.join(directory, CONFIG_FILE)
    if paths.exists(config_path) and not overwrite:
        raise FileExistsError(f"{directory} already holds a model (pass overwrite=True / --overwrite)")
    paths.makedirs(directory, exist_ok=True)
    if overwrite:
        paths.rmtree(paths.join(directory, CHECKPOINT_DIR), ignore_errors=True)
    config = {"format": FORMAT, "class": f"{type(model).__module__}.{type(model).__qualname__}",
              "fields": model_fields(model), "inputs": list(inputs), "source": source or {}, **(inference or {})}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(paths.join(directory, CHECKPOINT_DIR),
                      {"params": jax.tree.map(np.asarray, params)})
    checkpointer.wait_until_finished()
    checkpointer.close()
    with paths.open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def read_config(directory: str) -> dict:
    path = paths.join(directory, CONFIG_FILE)
    if not paths.isfile(path):
        raise FileNotFoundError(f"{directory} is not an mmjax model directory (no {CONFIG_FILE})")
    with paths.open(path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ConversionError(f"{path}: unknown format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load(path: str, *, step: int | None = None, which: str = "params", mesh: jax.sharding.Mesh | None = None,
         sharding: str = "fsdp", image_size: int | tuple[int, int] | None = None,
         **overrides: Any) -> tuple[nn.Module, dict]:
    """(model, variables) from a model directory or a training workdir, ready for `model.apply`;
    a Hugging Face Hub name (`org/name`, `hf-hub:org/name`) of a model directory is read through the
    Hub's cache (mmjax.hub).

    overrides: model fields, e.g. scan=True (layers stacked for nn.scan), dtype=jnp.bfloat16,
    attention_impl="cudnn". image_size: run at another resolution; learned position
    embeddings are resampled (bicubic with antialiasing, timm's `resample_abs_pos_embed`).
    Runs only: `step` (default: the newest good checkpoint) and `which` ("params", or "ema" for
    the EMA / momentum parameters a task keeps). mesh: place the parameters sharded by their
    logical axes under the `sharding` preset (mmjax.sharding); without it they are replicated.
    """
    model, flat, inputs = _load(path, step, which, image_size, overrides)
    if mesh is None:
        return model, {"params": unflatten({p: jnp.asarray(v) for p, v in flat.items()})}
    targets = param_shardings(model, inputs, mesh, sharding)
    return model, {"params": unflatten({p: jax.device_put(v, targets[p]) for p, v in flat.items()})}


def load_arrays(path: str, *, step: int | None = None, which: str = "params",
                image_size: int | tuple[int, int] | None = None,
                **overrides: Any) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """`load` with the parameters as flat host arrays (path -> np.ndarray), checked against the model."""
    model, flat, _ = _load(path, step, which, image_size, overrides)
    return model, flat


def model_config(path: str) -> dict:
    """model_config.json of a model directory or a run (rebuilt from config.json for older runs)."""
    from mmjax import runs
    return runs.read_model_config(path) if runs.is_run(path) else read_config(path)


def inference_spec(path: str, step: int | None = None) -> dict:
    """{"preprocess": pp str | None, "tokenizer": spec dict | None, "class_names": list | None,
    "kind": "contrastive" | "classifier" | "other"} of a model directory or run (see
    mmjax.inference_spec); `step` is checked to exist in a run."""
    from mmjax import inference_spec as spec
    from mmjax import runs
    if step is not None:
        if not runs.is_run(path):
            raise ValueError(f"{path} is a model directory: step= applies to training runs only")
        runs.resolve_step(path, step)
    return spec.spec(model_config(path))


def param_shardings(model: nn.Module, inputs: Sequence[dict], mesh: jax.sharding.Mesh,
                    preset: str = "fsdp") -> dict[str, jax.sharding.NamedSharding]:
    """Flat path -> NamedSharding of the model's params from their logical axis names."""
    from mmjax import sharding as sharding_lib
    args = [jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"])) for s in inputs]
    boxed = jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs), *args)
    return flatten(sharding_lib.logical_shardings(boxed, mesh, sharding_lib.get_rules(preset))["params"])


def _load(path: str, step: int | None, which: str, image_size, overrides: dict):
    """(model, flat host params, example inputs) of a model directory or run (or a Hub name of a
    model directory, mmjax.hub)."""
    from mmjax import hub, runs
    if hub.is_hub_name(path):
        path = hub.snapshot(path)
    if runs.is_run(path):
        config, params, _ = runs.read_params(path, step, which)
        stored = flatten(params)
    else:
        if step is not None or which != "params":
            raise ValueError(f"{path} is a model directory: step= and which= apply to training runs only")
        config = read_config(path)
        checkpointer = ocp.StandardCheckpointer()
        stored = flatten(checkpointer.restore(paths.absolute(paths.join(path, CHECKPOINT_DIR)))["params"])
        checkpointer.close()
    cls = _model_class(config["class"])
    fields = with_overrides(cls, config["fields"], overrides)
    inputs = [dict(s) for s in config["inputs"]]
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for spec in inputs:
            if len(spec["shape"]) == 4:     # NHWC images
                spec["shape"] = [spec["shape"][0], *hw, spec["shape"][3]]
    model = cls(**_as_tuples(fields))
    expected = abstract_params(model, inputs)

    scanned = any(is_stacked(p) for p in expected)
    stored = stack_layers(stored) if scanned else unstack_layers(stored)
    image_hw = next((s["shape"][1:3] for s in inputs if len(s["shape"]) == 4), None)
    stored = _resize_to_model(stored, expected, image_hw)

    problems = [f"missing {p} {tuple(expected[p].shape)}" for p in expected if p not in stored]
    problems += [f"unexpected {p} {np.shape(v)}" for p, v in stored.items() if p not in expected]
    problems += [f"mis-shaped {p}: stored {np.shape(v)}, model needs {tuple(expected[p].shape)}"
                 for p, v in stored.items() if p in expected and np.shape(v) != tuple(expected[p].shape)]
    if problems:
        raise ConversionError(f"{path} does not fit {cls.__name__}({overrides}):\n  " + "\n  ".join(problems))
    return model, {p: np.asarray(v, expected[p].dtype) for p, v in stored.items()}, inputs


POSEMB = "posemb/pos_embedding"
REL_POS_TABLE = "rel_pos_bias/table"


def resized(path: str, value: np.ndarray, shape: Sequence[int], num_prefix: int,
            grid: Sequence[int] | None = None) -> np.ndarray | None:
    """`value` brought to `shape` when `path` is a learned position embedding of another grid
    (bicubic, as timm; `num_prefix` tokens such as [CLS] kept, new grid `grid` or square) or a
    BEiT relative position table of another (square) window (BEiT's geometric bicubic); None
    when it is neither or the shapes do not say how."""
    value, shape = np.asarray(value), tuple(shape)
    if path.endswith(POSEMB) and value.ndim == len(shape) == 3 and value.shape[2] == shape[2]:
        tokens = shape[1] - num_prefix
        side = math.isqrt(tokens)
        rows, cols = grid if grid is not None else (side, side)
        if rows * cols != tokens:
            return None
        try:
            return np.asarray(layers.resample_posemb(jnp.asarray(value), (rows, cols), num_prefix,
                                                     method="bicubic"))
        except ValueError:          # the stored grid is not square
            return None
    if (path.endswith(REL_POS_TABLE) and value.ndim == len(shape) and value.shape[:-2] == shape[:-2]
            and value.shape[-1] == shape[-1]):
        side = (math.isqrt(shape[-2] - 3) + 1) // 2         # (2 side - 1)² offsets + 3 [CLS] rows
        if (2 * side - 1) ** 2 + 3 != shape[-2]:
            return None
        try:
            return layers.resize_relative_position_table(value, (side, side))
        except ValueError:
            return None
    return None


def posemb_prefix(flat: dict, owner: str, stored_len: int) -> int:
    """How many prefix tokens (class token, registers) a stored position embedding of `stored_len`
    positions covers: of the ViT layouts (mmjax.models.vit.PREFIX_POSEMBS: all prefix tokens, the
    class token only, none), the first whose remaining positions form a square grid. Sibling `cls`
    and `registers` parameters say which prefix tokens exist."""
    cls = int(f"{owner}cls" in flat)
    registers = np.shape(flat[f"{owner}registers"])[1] if f"{owner}registers" in flat else 0
    for prefix in (cls + registers, cls, 0):
        if stored_len >= prefix and math.isqrt(stored_len - prefix) ** 2 == stored_len - prefix:
            return prefix
    return cls + registers


def _resize_to_model(flat: dict, expected: dict, image_hw: Sequence[int] | None) -> dict:
    """Resizes stored position embeddings and relative position tables made for another image
    size. Sibling `cls` and `registers` parameters mark prefix tokens (`posemb_prefix`); the new grid
    follows the image aspect ratio. What cannot be resized is left for the shape check to report."""
    out = dict(flat)
    if image_hw is None:
        return out
    for path, target in expected.items():
        value = flat.get(path)
        if value is None or np.shape(value) == tuple(target.shape):
            continue
        if path.endswith(POSEMB) and len(target.shape) == 3:
            prefix = posemb_prefix(flat, path[:-len(POSEMB)], np.shape(value)[1])
            tokens = target.shape[1] - prefix
            rows = max(round(math.sqrt(tokens * image_hw[0] / image_hw[1])), 1)
            new = resized(path, value, target.shape, prefix, (rows, tokens // rows))
        else:
            new = resized(path, value, target.shape, 0)
        if new is not None:
            out[path] = new
    return out
