"""Decoder LM tables: transformers `LlamaForCausalLM`, `Qwen2ForCausalLM` and `OPTForCausalLM`
<-> mmjax.models.decoder_lm.DecoderLM, both ways.

A tied head (OPT always; LLaMA / Qwen2 when tie_word_embeddings) scores against the word
embeddings: a `lm_head.weight` in the checkpoint must equal them (checked, then dropped) and is
not written on export, as transformers' save_pretrained leaves it out. Old LLaMA files carry
rotary `inv_freq` buffers: recomputed, so dropped. Configurations mmjax does not compute (other
activations, RoPE types beyond linear / dynamic, sliding-window attention, OPT without LayerNorm
affine parameters) are refused by name.
"""

from __future__ import annotations

import numpy as np

from mmjax.convert.engine import (
    HEADS_BIAS,
    HEADS_IN,
    HEADS_OUT,
    LINEAR,
    ConversionError,
    Plan,
    Rule,
    Table,
    attention,
    linear,
    norm,
    rule,
)
from mmjax.convert.export import Export
from mmjax.models import decoder_lm
from mmjax.pretrained import input_spec

DECODER_LM = "mmjax.models.decoder_lm.DecoderLM"
KIND_OF = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "OPTForCausalLM": "opt"}
HF_ARCHITECTURES = tuple(KIND_OF)
ARCHITECTURE_OF = {kind: arch for arch, kind in KIND_OF.items()}
MODEL_TYPE_OF = {"llama": "llama", "qwen2": "qwen2", "opt": "opt"}
ROPE_SCALINGS = {"default": None, "linear": "linear", "dynamic": "dynamic"}
HEAD = "lm_head.weight"


def _heads_in(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}/kernel", HEADS_IN), rule(f"{src}.bias", f"{dst}/bias", HEADS_BIAS)]


def llama_table(ignore: tuple[str, ...] = ()) -> Table:
    """LLaMA / Qwen2 (`model.*`, `lm_head`) <-> DecoderLM; biases match only where the model has them."""
    layer, dst = "model.layers.{i}", "decoder/layer_{i}"
    return Table((
        rule("model.embed_tokens.weight", "embed/embedding"),
        *_heads_in(f"{layer}.self_attn.q_proj", f"{dst}/attn/query"),
        *_heads_in(f"{layer}.self_attn.k_proj", f"{dst}/attn/key"),
        *_heads_in(f"{layer}.self_attn.v_proj", f"{dst}/attn/value"),
        rule(f"{layer}.self_attn.o_proj.weight", f"{dst}/attn/out/kernel", HEADS_OUT),
        rule(f"{layer}.self_attn.o_proj.bias", f"{dst}/attn/out/bias"),
        *linear(f"{layer}.mlp.gate_proj", f"{dst}/mlp/gate"),
        *linear(f"{layer}.mlp.up_proj", f"{dst}/mlp/fc1"),
        *linear(f"{layer}.mlp.down_proj", f"{dst}/mlp/fc2"),
        rule(f"{layer}.input_layernorm.weight", f"{dst}/ln1/scale"),
        rule(f"{layer}.post_attention_layernorm.weight", f"{dst}/ln2/scale"),
        rule("model.norm.weight", "ln_final/scale"),
        rule(HEAD, "lm_head/kernel", LINEAR),
    ), ignore=(r".*rotary_emb\.inv_freq", *ignore))


def opt_table(ignore: tuple[str, ...] = ()) -> Table:
    """OPT (`model.decoder.*`, tied `lm_head`) <-> DecoderLM(kind="opt")."""
    src, layer, dst = "model.decoder", "model.decoder.layers.{i}", "decoder/layer_{i}"
    return Table((
        rule(f"{src}.embed_tokens.weight", "embed/embedding"),
        rule(f"{src}.embed_positions.weight", "position/embedding"),
        rule(f"{src}.project_in.weight", "project_in/kernel", LINEAR),
        rule(f"{src}.project_out.weight", "project_out/kernel", LINEAR),
        *attention(*(f"{layer}.self_attn.{n}_proj" for n in ("q", "k", "v", "out")), f"{dst}/attn"),
        *norm(f"{layer}.self_attn_layer_norm", f"{dst}/ln1"),
        *linear(f"{layer}.fc1", f"{dst}/mlp/fc1"),
        *linear(f"{layer}.fc2", f"{dst}/mlp/fc2"),
        *norm(f"{layer}.final_layer_norm", f"{dst}/ln2"),
        *norm(f"{src}.final_layer_norm", "ln_final"),
        rule(HEAD, "lm_head/kernel", LINEAR),
    ), ignore=ignore)


def table_for(kind: str, ignore: tuple[str, ...] = ()) -> Table:
    return opt_table(ignore) if kind == "opt" else llama_table(ignore)


def _tied_head(state: dict[str, np.ndarray], embed_key: str) -> tuple[str, ...]:
    """The ignore pattern for a `lm_head.weight` that repeats the word embeddings (raises if it differs)."""
    if HEAD not in state:
        return ()
    if np.shape(state[HEAD]) != np.shape(state[embed_key]) or not np.array_equal(state[HEAD], state[embed_key]):
        raise ConversionError(f"{HEAD} differs from {embed_key} but the config ties them (tie_word_embeddings)")
    return (r"lm_head\.weight",)


def _rope(config: dict) -> dict:
    """RoPE fields from transformers' `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_SCALINGS:
        raise ConversionError(f"RoPE type {rope_type!r} is not supported; supported: {sorted(ROPE_SCALINGS)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported for LLaMA / Qwen2")
    base = params.get("rope_theta", config.get("rope_theta", 10_000.0))
    return {"rope_base": float(base), "rope_scaling": ROPE_SCALINGS[rope_type],
            "rope_factor": float(params.get("factor", 1.0)) if rope_type != "default" else 1.0}


def _llama_fields(config: dict, kind: str) -> dict:
    get = config.get
    if get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    if kind == "qwen2" and get("use_sliding_window", False):
        raise ConversionError("Qwen2 sliding-window attention (use_sliding_window=True) is not supported")
    width, heads = get("hidden_size", 4096), get("num_attention_heads", 32)
    kv_heads, head_dim = get("num_key_value_heads") or heads, get("head_dim") or width // heads
    fields = {"kind": kind, "width": width, "depth": get("num_hidden_layers", 32), "num_heads": heads,
              "mlp_dim": get("intermediate_size", 11008), "vocab_size": get("vocab_size", 32000),
              "max_len": get("max_position_embeddings", 2048), "num_kv_heads": kv_heads if kv_heads != heads else None,
              "head_dim": head_dim if head_dim != width // heads else None, "norm_eps": get("rms_norm_eps", 1e-6),
              "tie_embeddings": bool(get("tie_word_embeddings", False)), **_rope(config)}
    if kind == "llama":
        fields.update(attention_bias=bool(get("attention_bias", False)), mlp_bias=bool(get("mlp_bias", False)))
    return fields


def _opt_fields(config: dict) -> dict:
    get = config.get
    if get("activation_function", "relu") != "relu":
        raise ConversionError(f"OPT activation_function {get('activation_function')!r} is not supported (relu only)")
    if not get("layer_norm_elementwise_affine", True):
        raise ConversionError("OPT without LayerNorm affine parameters (layer_norm_elementwise_affine=False) "
                              "is not supported")
    if get("_remove_final_layer_norm", False):
        raise ConversionError("OPT with _remove_final_layer_norm=True (pre-v4.20 fine-tunes) is not supported")
    if not get("tie_word_embeddings", True):
        raise ConversionError("OPT with an untied head (tie_word_embeddings=False) is not supported")
    width = get("hidden_size", 768)
    bias = bool(get("enable_bias", True))
    return {"kind": "opt", "width": width, "depth": get("num_hidden_layers", 12),
            "num_heads": get("num_attention_heads", 12), "mlp_dim": get("ffn_dim", 3072),
            "vocab_size": get("vocab_size", 50272), "max_len": get("max_position_embeddings", 2048),
            "embed_dim": get("word_embed_proj_dim") or width, "norm": "pre" if get("do_layer_norm_before", True)
            else "post", "attention_bias": bias, "mlp_bias": bias, "tie_embeddings": True}


def fields_from_hf(config: dict) -> dict:
    """DecoderLM fields from a transformers config.json (dict)."""
    arch = (config.get("architectures") or [""])[0]
    if arch not in KIND_OF:
        raise ConversionError(f"Not a supported decoder LM architecture: {arch!r}; supported: {HF_ARCHITECTURES}")
    kind = KIND_OF[arch]
    return _opt_fields(config) if kind == "opt" else _llama_fields(config, kind)


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    fields = fields_from_hf(config)
    embed_key = "model.decoder.embed_tokens.weight" if fields["kind"] == "opt" else "model.embed_tokens.weight"
    ignore = _tied_head(state, embed_key) if fields["tie_embeddings"] else ()
    inputs = [input_spec((1, 8), "int32")]
    return Plan(DECODER_LM, fields, inputs, table_for(fields["kind"], ignore),
                {"library": "hf", "architecture": config["architectures"][0], "config": config})


def hf_config(fields: dict, base: dict | None = None) -> dict:
    """transformers config.json for a DecoderLM's fields (over `base`, the imported config)."""
    model = decoder_lm.DecoderLM(**fields)
    arch, block = model.arch(), model.block_config()
    kind = arch["kind"]
    out = dict(base or {})
    out.update({"architectures": [ARCHITECTURE_OF[kind]], "model_type": MODEL_TYPE_OF[kind],
                "hidden_size": arch["width"], "num_hidden_layers": arch["depth"],
                "num_attention_heads": arch["num_heads"], "vocab_size": arch["vocab_size"],
                "max_position_embeddings": arch["max_len"], "tie_word_embeddings": arch["tie_embeddings"]})
    if kind == "opt":
        out.update({"ffn_dim": arch["mlp_dim"], "word_embed_proj_dim": arch["embed_dim"],
                    "do_layer_norm_before": model.norm == "pre", "enable_bias": block.q_bias,
                    "activation_function": "relu", "layer_norm_elementwise_affine": True, "dropout": model.dropout})
        return out
    out.update({"intermediate_size": arch["mlp_dim"], "num_key_value_heads": block.num_kv_heads or arch["num_heads"],
                "head_dim": block.head_dim or arch["width"] // arch["num_heads"], "rms_norm_eps": arch["norm_eps"],
                "hidden_act": "silu"})
    rope = {"rope_type": block.rotary.scaling or "default", "rope_theta": block.rotary.base}
    if block.rotary.scaling:
        rope["factor"] = block.rotary.factor
    out.update({"rope_parameters": rope, "rope_theta": block.rotary.base})
    out.pop("rope_scaling", None)
    if kind == "llama":
        out.update({"attention_bias": block.out_bias, "mlp_bias": block.mlp_bias})
    else:
        out["use_sliding_window"] = False
    return out


def hf_export(config: dict) -> Export:
    """The table and config.json that write a DecoderLM model directory for transformers."""
    fields = config["fields"]
    model = decoder_lm.DecoderLM(**{k: v for k, v in fields.items() if k not in ("scan", "remat_policy")})
    block, kind = model.block_config(), model.arch()["kind"]
    if fields.get("block"):
        raise ConversionError(f"A DecoderLM with block overrides {fields['block']} has no transformers equivalent")
    if kind == "opt" and len({block.q_bias, block.mlp_bias, block.out_bias}) > 1:
        raise ConversionError("transformers' OPT has one enable_bias for attention and MLP: "
                              f"attention_bias={block.q_bias} and mlp_bias={block.mlp_bias} differ")
    if kind == "qwen2" and (block.out_bias or block.mlp_bias):
        raise ConversionError("transformers' Qwen2 has no output-projection or MLP biases")
    source = config.get("source") or {}
    base = source.get("config") if source.get("library") == "hf" else None
    return Export(table_for(kind), hf_config(fields, base))
