"""Perceiver resampler tables, both ways: OpenFlamingo's `PerceiverResampler` (open_flamingo.src.
helpers; inside a Flamingo checkpoint under `perceiver.`) and transformers' `IdeficsPerceiverResampler`
(inside IDEFICS under `model.perceiver_resampler.`).

Neither exists as a checkpoint of its own, so there is no `mmjax-convert` format: the Flamingo and
IDEFICS conversions embed `open_flamingo_rules` / `idefics_rules` in their tables, and the
functions below convert a bare resampler's state dict (`prefix` strips / adds an outer module's
name). OpenFlamingo fuses keys and values in one `to_kv` Linear (rows k | v), keeps its FF as a
Sequential (0: LayerNorm, 1: Linear, 2: GELU, 3: Linear) and its media-time embeddings as (M, 1, D).
Head counts are not in the weights: OpenFlamingo's come as arguments (its defaults 8 x 64),
IDEFICS' from its config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import engine
from mmjax.convert.engine import HEADS_IN, HEADS_OUT, LINEAR, ConversionError, Rule, Table, Transform, norm, rule
from mmjax.models.perceiver_resampler import PerceiverResampler

KNOBS = ("dtype", "scan", "remat_policy", "attention_impl")
# OpenFlamingo's media-time embeddings (M, 1, D) <-> mmjax (M, D).
MEDIA_TIME = Transform("media_time", lambda s: (s[0], 1, *s[1:]),
                       lambda x, s: x.reshape(s), lambda y: y[:, None])


def open_flamingo_rules(src: str, dst: str) -> list[Rule]:
    """OpenFlamingo PerceiverResampler keys under `src` (e.g. "perceiver.") <-> mmjax paths under
    `dst` (e.g. "perceiver/"); both prefixes end with their separator or are empty."""
    layer, out = f"{src}layers.{{i}}", f"{dst}layer_{{i}}"
    return [rule(f"{src}latents", f"{dst}latents"),
            rule(f"{src}frame_embs", f"{dst}frame_embs"),
            rule(f"{src}media_time_embs", f"{dst}media_time_embs", MEDIA_TIME),
            *norm(f"{layer}.0.norm_media", f"{out}/attn/norm_media"),
            *norm(f"{layer}.0.norm_latents", f"{out}/attn/norm_latents"),
            rule(f"{layer}.0.to_q.weight", f"{out}/attn/query/kernel", HEADS_IN),
            rule(f"{layer}.0.to_kv.weight", [f"{out}/attn/key/kernel", f"{out}/attn/value/kernel"], HEADS_IN),
            rule(f"{layer}.0.to_out.weight", f"{out}/attn/out/kernel", HEADS_OUT),
            *norm(f"{layer}.1.0", f"{out}/ff_norm"),
            rule(f"{layer}.1.1.weight", f"{out}/ff/fc1/kernel", LINEAR),
            rule(f"{layer}.1.3.weight", f"{out}/ff/fc2/kernel", LINEAR),
            *norm(f"{src}norm", f"{dst}norm")]


def idefics_rules(src: str, dst: str) -> list[Rule]:
    """IdeficsPerceiverResampler keys under `src` (e.g. "model.perceiver_resampler.") <-> mmjax
    paths under `dst`."""
    block, out = f"{src}blocks.{{i}}", f"{dst}layer_{{i}}"
    return [rule(f"{src}latents", f"{dst}latents"),
            *norm(f"{block}.0.context_layer_norm", f"{out}/attn/norm_media"),
            *norm(f"{block}.0.latents_layer_norm", f"{out}/attn/norm_latents"),
            *norm(f"{block}.0.q_layer_norm", f"{out}/attn/q_norm"),
            *norm(f"{block}.0.k_layer_norm", f"{out}/attn/k_norm"),
            rule(f"{block}.0.q_proj.weight", f"{out}/attn/query/kernel", HEADS_IN),
            rule(f"{block}.0.k_proj.weight", f"{out}/attn/key/kernel", HEADS_IN),
            rule(f"{block}.0.v_proj.weight", f"{out}/attn/value/kernel", HEADS_IN),
            rule(f"{block}.0.output_proj.weight", f"{out}/attn/out/kernel", HEADS_OUT),
            *norm(f"{block}.1.ln", f"{out}/ff_norm"),
            rule(f"{block}.1.fc.weight", f"{out}/ff/fc1/kernel", LINEAR),
            rule(f"{block}.1.c_proj.weight", f"{out}/ff/fc2/kernel", LINEAR),
            *norm(f"{src}layer_norm", f"{dst}norm")]


def _numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict of torch tensors (bfloat16 included: numpy has none, so float32) or arrays."""
    return {k: np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v) for k, v in state.items()}


def _get(state: Mapping[str, Any], key: str, what: str) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"The {what} state dict has no {key!r} (is the prefix right?)")
    return state[key]


def _depth(state: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    if found != set(range(len(found))) or not found:
        raise ConversionError(f"The state dict's layers {sorted(found)} are not 0..L-1 (keys {pattern!r})")
    return len(found)


def expected_params(model: PerceiverResampler) -> dict[str, jax.ShapeDtypeStruct]:
    """The model's flat parameter shapes (path -> shape struct), computed without any array."""
    media = jnp.zeros((1, 1, 1, 1, model.width), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), media)
    return engine.flatten(nn.unbox(shapes)["params"])


def _import(state: Mapping[str, Any], model: PerceiverResampler, rules: list[Rule], what: str) -> dict:
    """The tables name unrolled layers; a scanned model gets them stacked."""
    flat = engine.to_mmjax(state, Table(tuple(rules)), expected_params(model.clone(scan=False)), what)
    return engine.unflatten(engine.stack_layers(flat) if model.scan else flat)


def _export(params: Mapping, rules: list[Rule], what: str) -> dict[str, np.ndarray]:
    flat = {path: np.asarray(value) for path, value in engine.flatten(nn.unbox(params)).items()}
    return engine.to_torch(engine.unstack_layers(flat), Table(tuple(rules)), what)


def _knobs(knobs: Mapping[str, Any]) -> dict:
    """Only the fields that do not change the architecture (which comes from the checkpoint)."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise TypeError(f"Unknown resampler options {unknown}; known: {list(KNOBS)}")
    return dict(knobs)


def _check(model: PerceiverResampler, target: str, **wanted) -> None:
    """Raises unless `model` computes what `target` computes (not only holds its weights)."""
    arch = {**model.arch(), "max_num_media": model.max_num_media, "max_num_frames": model.max_num_frames}
    bad = [f"{k}={arch[k]!r} (needs {v!r})" for k, v in wanted.items() if arch[k] != v]
    if bad:
        raise ConversionError(f"This resampler cannot be written as {target}: {', '.join(bad)}")


# ---------------------------------------------------------------------------------------------
# OpenFlamingo
# ---------------------------------------------------------------------------------------------

def from_open_flamingo(state: Mapping[str, Any], *, num_heads: int = 8, head_dim: int = 64, prefix: str = "",
                       **knobs) -> tuple[PerceiverResampler, dict]:
    """(model, params) from an OpenFlamingo PerceiverResampler state dict (its heads and head
    width as built: `heads`, `dim_head`, default 8 and 64). `knobs`: fields that change how the
    model computes, not what (dtype, scan, remat_policy, attention_impl)."""
    state = _numpy(state)
    what = "OpenFlamingo PerceiverResampler"
    latents = _get(state, f"{prefix}latents", what)
    inner = _get(state, f"{prefix}layers.0.0.to_q.weight", what).shape[0]
    if inner != num_heads * head_dim:
        raise ConversionError(f"to_q projects to {inner} features, not num_heads x head_dim = "
                              f"{num_heads} x {head_dim}: pass the heads the model was built with")
    extra = {name: state[f"{prefix}{name}"].shape[0] for name in ("frame_embs", "media_time_embs")
             if f"{prefix}{name}" in state}
    model = PerceiverResampler(
        width=latents.shape[1], spelling="open_flamingo", num_latents=latents.shape[0],
        depth=_depth(state, rf"{re.escape(prefix)}layers\.(\d+)\.0\.to_q\.weight"), num_heads=num_heads,
        head_dim=head_dim, mlp_dim=_get(state, f"{prefix}layers.0.1.1.weight", what).shape[0],
        max_num_frames=extra.get("frame_embs"), max_num_media=extra.get("media_time_embs"), **_knobs(knobs))
    return model, _import(state, model, open_flamingo_rules(prefix, ""), f"{what} state dict")


def to_open_flamingo(model: PerceiverResampler, params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """The OpenFlamingo PerceiverResampler state dict (numpy arrays) of `params`; it loads into a
    PerceiverResampler built with heads=model.arch()["num_heads"], dim_head=...["head_dim"] (the
    weights do not record them)."""
    _check(model, "OpenFlamingo's PerceiverResampler", act="gelu", qk_norm=False)
    return _export(params, open_flamingo_rules(prefix, ""), "OpenFlamingo PerceiverResampler")


# ---------------------------------------------------------------------------------------------
# IDEFICS (transformers)
# ---------------------------------------------------------------------------------------------

def idefics_model(config: Mapping[str, Any], **knobs) -> PerceiverResampler:
    """The resampler that an IdeficsConfig (its `to_dict()`) describes: width = the vision
    tower's embed_dim, the rest from `perceiver_config`; `knobs` as in `from_open_flamingo`."""
    perceiver, vision = config.get("perceiver_config") or {}, config.get("vision_config") or {}
    known = {"resampler_n_latents": "num_latents", "resampler_depth": "depth", "resampler_n_heads": "num_heads",
             "resampler_head_dim": "head_dim", "qk_layer_norms_perceiver": "qk_norm"}
    fields = {ours: perceiver[theirs] for theirs, ours in known.items() if theirs in perceiver}
    width = vision.get("embed_dim", 768)
    return PerceiverResampler(width=width, spelling="idefics", mlp_dim=4 * width, **fields, **_knobs(knobs))


def from_idefics(state: Mapping[str, Any], config: Mapping[str, Any], prefix: str = "",
                 **knobs) -> tuple[PerceiverResampler, dict]:
    """(model, params) from an IdeficsPerceiverResampler state dict and its IdeficsConfig dict."""
    model = idefics_model(config, **knobs)
    return model, _import(_numpy(state), model, idefics_rules(prefix, ""), "IdeficsPerceiverResampler state dict")


def to_idefics(model: PerceiverResampler, params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """The IdeficsPerceiverResampler state dict (numpy arrays) of `params`."""
    _check(model, "transformers' IdeficsPerceiverResampler", act="relu", max_num_media=None, max_num_frames=None)
    if (model.mlp_dim or 4 * model.width) != 4 * model.width:
        raise ConversionError(f"IDEFICS' perceiver FF is 4 x width = {4 * model.width} wide, not {model.mlp_dim}")
    return _export(params, idefics_rules(prefix, ""), "IdeficsPerceiverResampler")
