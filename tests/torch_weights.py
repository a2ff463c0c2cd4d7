"""Copies PyTorch reference modules' weights into mmjax block parameters (the small mappings the
reference tests need; the conversion tables in mmjax/convert do the same for whole models)."""

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def dense(linear: torch.nn.Linear) -> dict:
    """nn.Linear (out, in) → flax Dense {"kernel": (in, out)[, "bias"]}."""
    out = {"kernel": to_numpy(linear.weight).T}
    if linear.bias is not None:
        out["bias"] = to_numpy(linear.bias)
    return out


def heads_in(linear: torch.nn.Linear, heads: int) -> dict:
    """A q/k/v projection (heads * head_dim, in) → HeadsDense {"kernel": (in, heads, head_dim)}."""
    w = to_numpy(linear.weight)
    out = {"kernel": w.T.reshape(w.shape[1], heads, -1)}
    if linear.bias is not None:
        out["bias"] = to_numpy(linear.bias).reshape(heads, -1)
    return out


def heads_out(linear: torch.nn.Linear, heads: int) -> dict:
    """An output projection (out, heads * head_dim) → MergeHeadsDense {"kernel": (heads, head_dim, out)}."""
    w = to_numpy(linear.weight)
    out = {"kernel": w.T.reshape(heads, -1, w.shape[0])}
    if linear.bias is not None:
        out["bias"] = to_numpy(linear.bias)
    return out


def norm(module: torch.nn.Module) -> dict:
    """LayerNorm (weight, bias) or an RMS norm (weight only) → {"scale"[, "bias"]}."""
    out = {"scale": to_numpy(module.weight)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = to_numpy(module.bias)
    return out


def attention(q, k, v, o, heads: int, kv_heads: int | None = None) -> dict:
    kv_heads = kv_heads or heads
    return {"query": heads_in(q, heads), "key": heads_in(k, kv_heads), "value": heads_in(v, kv_heads),
            "out": heads_out(o, heads)}


def bert_layer(layer, heads: int) -> dict:
    """transformers' BertLayer (post-LN; with cross-attention when it has one)."""
    def bert_attention(a):
        s = a.self
        return attention(s.query, s.key, s.value, a.output.dense, heads)

    out = {"attn": bert_attention(layer.attention), "ln1": norm(layer.attention.output.LayerNorm),
           "mlp": {"fc1": dense(layer.intermediate.dense), "fc2": dense(layer.output.dense)},
           "ln2": norm(layer.output.LayerNorm)}
    if hasattr(layer, "crossattention"):
        out["cross_attn"] = bert_attention(layer.crossattention)
        out["ln_cross"] = norm(layer.crossattention.output.LayerNorm)
    return out


def llama_layer(layer, heads: int, kv_heads: int) -> dict:
    """transformers' LlamaDecoderLayer (pre-RMSNorm, SwiGLU, grouped-query attention)."""
    a, m = layer.self_attn, layer.mlp
    return {"ln1": norm(layer.input_layernorm),
            "attn": attention(a.q_proj, a.k_proj, a.v_proj, a.o_proj, heads, kv_heads),
            "ln2": norm(layer.post_attention_layernorm),
            "mlp": {"gate": dense(m.gate_proj), "fc1": dense(m.up_proj), "fc2": dense(m.down_proj)}}


def t5_feed_forward(layer) -> dict:
    """transformers' T5LayerFF with a gated act: its norm → ln2, wi_0 (gated) / wi_1 / wo → mlp."""
    f = layer.DenseReluDense
    return {"ln2": norm(layer.layer_norm), "mlp": {"gate": dense(f.wi_0), "fc1": dense(f.wi_1), "fc2": dense(f.wo)}}
