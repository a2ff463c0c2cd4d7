"""Qwen (v1: Qwen-7B, the LLM of Qwen-VL) in its original layout -> mmjax DecoderLM (kind qwen2),
import only. The Hub's Qwen/Qwen-7B folders hold `QWenLMHeadModel` (trust_remote_code) weights, not
transformers' Qwen2 layout; key names and config fields read from its modeling_qwen.py:

    transformer.wte                     word embeddings
    transformer.h.{i}.ln_1 / ln_2       RMSNorm (layer_norm_epsilon)
    transformer.h.{i}.attn.c_attn       q, k and v fused, with biases  -> attn/{query,key,value}
    transformer.h.{i}.attn.c_proj       output projection, no bias
    transformer.h.{i}.mlp.{w1,w2,c_proj}  c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up
                                        projection, each intermediate_size / 2 wide
    transformer.ln_f, lm_head           final RMSNorm, untied head

Qwen's `use_dynamic_ntk` and `use_logn_attn` change nothing within `seq_length` tokens (they scale
the rotary base and the logits of longer inputs): mmjax does not compute them, and says so. `mmjax-convert --to hf`
writes the imported model in transformers' Qwen2 layout.
"""

from __future__ import annotations

from mmjax.convert.decoder_lm import DECODER_LM
from mmjax.convert.engine import HEADS_OUT, LINEAR, ConversionError, Plan, Table, fused_qkv, rule
from mmjax.pretrained import input_spec

ARCHITECTURE = "QWenLMHeadModel"


def table() -> Table:
    layer, dst = "transformer.h.{i}", "decoder/layer_{i}"
    return Table((
        rule("transformer.wte.weight", "embed/embedding"),
        rule(f"{layer}.ln_1.weight", f"{dst}/ln1/scale"),
        *fused_qkv(f"{layer}.attn.c_attn.weight", f"{layer}.attn.c_attn.bias", f"{dst}/attn"),
        rule(f"{layer}.attn.c_proj.weight", f"{dst}/attn/out/kernel", HEADS_OUT),
        rule(f"{layer}.ln_2.weight", f"{dst}/ln2/scale"),
        rule(f"{layer}.mlp.w1.weight", f"{dst}/mlp/fc1/kernel", LINEAR),
        rule(f"{layer}.mlp.w2.weight", f"{dst}/mlp/gate/kernel", LINEAR),
        rule(f"{layer}.mlp.c_proj.weight", f"{dst}/mlp/fc2/kernel", LINEAR),
        rule("transformer.ln_f.weight", "ln_final/scale"),
        rule("lm_head.weight", "lm_head/kernel", LINEAR),
    ), ignore=(r".*rotary_emb\.inv_freq",))


def fields(config: dict) -> dict:
    """DecoderLM fields of a Qwen config.json (Qwen-7B's defaults where a field is absent)."""
    get = config.get
    if get("rotary_pct", 1.0) != 1.0:
        raise ConversionError(f"Qwen with rotary_pct {get('rotary_pct')} (partial rotary) is not supported")
    if not get("no_bias", True):
        raise ConversionError("Qwen with no_bias=False (an output-projection bias) is not supported")
    width, heads = get("hidden_size", 4096), get("num_attention_heads", 32)
    if get("kv_channels", width // heads) != width // heads:
        raise ConversionError(f"Qwen kv_channels {get('kv_channels')} != hidden_size / heads is not supported")
    if get("intermediate_size", 22016) % 2:
        raise ConversionError("Qwen's intermediate_size covers w1 and w2 together: it must be even")
    return {"kind": "qwen2", "width": width, "depth": get("num_hidden_layers", 32), "num_heads": heads,
            "mlp_dim": get("intermediate_size", 22016) // 2, "vocab_size": get("vocab_size", 151936),
            "max_len": get("max_position_embeddings", get("seq_length", 2048)),
            "norm_eps": get("layer_norm_epsilon", 1e-6), "rope_base": float(get("rotary_emb_base", 10_000.0)),
            "tie_embeddings": bool(get("tie_word_embeddings", False))}


def from_hf(config: dict, state: dict) -> Plan:
    if config.get("tie_word_embeddings", False):
        raise ConversionError("Qwen with a tied head (tie_word_embeddings=True) is not supported")
    notes = [f"{name} is not computed: it changes nothing within seq_length ({config.get('seq_length', 2048)}) "
             f"tokens" for name in ("use_dynamic_ntk", "use_logn_attn") if config.get(name)]
    return Plan(DECODER_LM, fields(config), [input_spec((1, 8), "int32")], table(),
                {"library": "qwen", "architecture": ARCHITECTURE}, notes)
