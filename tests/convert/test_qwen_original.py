"""Qwen (v1) in its original layout (QWenLMHeadModel, the Qwen-7B / Qwen-VL files) -> mmjax through
`mmjax-convert --source hf`. Its modeling code is trust_remote_code and not installed: the reference is
transformers' Qwen2ForCausalLM (the same computation within seq_length: q/k/v biases, no output bias,
RMSNorm, SwiGLU, rotary positions), its weights renamed to Qwen's keys as modeling_qwen.py names them
(fused c_attn, w2 the gate, w1 the up projection). Same logits; the import exports to transformers'
Qwen2 layout and loads there strictly; Qwen-7B's table checked at real size by shapes only."""

import json

import jax
import numpy as np
import pytest
from blip2_names import shape_problems
from references import require

import mmjax
from mmjax import param_paths, pretrained
from mmjax.convert import io, qwen
from mmjax.models.decoder_lm import DecoderLM

torch = require("torch")
transformers = require("transformers")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
             vocab_size=256, max_position_embeddings=64, rope_theta=10_000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=False, initializer_range=0.1)
PROMPT = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def original_names(state: dict) -> dict:
    """transformers Qwen2 names -> Qwen's original ones (modeling_qwen.py); torch tensors (meta too)."""
    out = {"transformer.wte.weight": state["model.embed_tokens.weight"], "transformer.ln_f.weight":
           state["model.norm.weight"], "lm_head.weight": state["lm_head.weight"]}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    for i in range(layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.c_attn.{part}"] = torch.cat(
                [state[f"{src}self_attn.{n}_proj.{part}"] for n in ("q", "k", "v")])
        out[f"{dst}attn.c_proj.weight"] = state[f"{src}self_attn.o_proj.weight"]
        out[f"{dst}ln_1.weight"] = state[f"{src}input_layernorm.weight"]
        out[f"{dst}ln_2.weight"] = state[f"{src}post_attention_layernorm.weight"]
        out[f"{dst}mlp.w1.weight"] = state[f"{src}mlp.up_proj.weight"]
        out[f"{dst}mlp.w2.weight"] = state[f"{src}mlp.gate_proj.weight"]
        out[f"{dst}mlp.c_proj.weight"] = state[f"{src}mlp.down_proj.weight"]
    return out


def qwen_config(hf: dict) -> dict:
    """The config.json of a Qwen folder with the same sizes."""
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": hf["hidden_size"],
            "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": hf["num_attention_heads"],
            "intermediate_size": 2 * hf["intermediate_size"], "vocab_size": hf["vocab_size"],
            "seq_length": hf["max_position_embeddings"], "max_position_embeddings": hf["max_position_embeddings"],
            "layer_norm_epsilon": hf["rms_norm_eps"], "rotary_emb_base": hf["rope_theta"], "rotary_pct": 1.0,
            "kv_channels": hf["hidden_size"] // hf["num_attention_heads"], "no_bias": True, "use_dynamic_ntk": True,
            "use_logn_attn": True, "tie_word_embeddings": False}


def test_original_qwen_matches_and_exports_to_qwen2(tmp_path, convert, diff, capsys):
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, attn_implementation="eager")).eval()
    with torch.no_grad():       # biases and norm scales away from 0 / 1
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    (tmp_path / "qwen").mkdir()
    io.write_hf_folder(str(tmp_path / "qwen"), qwen_config(SMALL),
                       {k: v.numpy() for k, v in original_names(ref.state_dict()).items()})
    convert("--source", "hf", "--checkpoint", tmp_path / "qwen", "--output", tmp_path / "mm")
    assert "use_logn_attn is not computed" in capsys.readouterr().out
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert model.arch()["kind"] == "qwen2" and model.arch()["mlp_dim"] == SMALL["intermediate_size"]
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(PROMPT)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)(variables, PROMPT)["logits"])
    assert diff(got, want, "original Qwen logits") <= 5e-6        # measured ~1e-6 (logits up to ~3)

    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "qwen2")
    with open(tmp_path / "qwen2" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]
    loaded, info = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "qwen2"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in state.items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value, err_msg=key)


def test_qwen_7b_table_by_shape():
    """Qwen-7B's config (Qwen/Qwen-7B config.json): every original key placed, every parameter filled."""
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 22016,
              "vocab_size": 151936, "seq_length": 8192, "max_position_embeddings": 8192, "kv_channels": 128,
              "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True,
              "tie_word_embeddings": False}
    plan = qwen.from_hf(config, {})
    assert plan.fields == {**plan.fields, "width": 4096, "mlp_dim": 11008, "vocab_size": 151936}
    scanned = pretrained.abstract_params(pretrained.build(plan.model_class, {**plan.fields, "scan": True}), plan.inputs)
    expected = {layer: tuple(s.shape[1:]) if param_paths.is_stacked(p) else tuple(s.shape)
                for p, s in scanned.items() for layer in param_paths.unstacked_paths(p, 32)}
    with torch.device("meta"):      # the same sizes in transformers' layout, renamed: the original shapes
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=11008, vocab_size=151936, tie_word_embeddings=False))
    original = {k: tuple(v.shape) for k, v in original_names(ref.state_dict()).items()}
    assert original["transformer.h.0.attn.c_attn.weight"] == (3 * 4096, 4096)
    assert shape_problems(plan.table, original, expected) == []      # every key placed, every parameter filled
    assert DecoderLM(**plan.fields).arch() == DecoderLM(variant="qwen-7b").arch()


def test_unsupported_qwen_configs_are_refused():
    with pytest.raises(qwen.ConversionError, match="rotary_pct 0.5"):
        qwen.from_hf({"rotary_pct": 0.5}, {})
    with pytest.raises(qwen.ConversionError, match="tied head"):
        qwen.from_hf({"tie_word_embeddings": True}, {})
