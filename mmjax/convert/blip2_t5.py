"""BLIP-2 with Flan-T5 (mmjax.models.blip2_t5.Blip2T5): transformers `Blip2ForConditionalGeneration` /
`Blip2Model` whose text_config is T5, both ways, and LAVIS `blip2_t5` files, import only.

transformers: the vision tower, queries, Q-Former and language_projection as mmjax.convert.blip2
maps them, `language_model.*` by mmjax.convert.t5's table, every key and path prefixed; the
`embed_tokens` copies of `shared.weight` are checked and dropped there. BLIP-2's Flan-T5 configs
set dense_act_fn "gelu" (LAVIS's blip2_t5.py: `t5_config.dense_act_fn = "gelu"`): the gate's
GELU is exact there ("geglu_exact"), where a plain Flan-T5 runs gelu_new (tanh).

LAVIS (lavis/models/blip2_models/blip2_t5.py, whose modeling_t5.py is transformers' T5 with its
key names): visual_encoder.*, ln_vision, Qformer.bert.* and query_tokens as blip2_opt, `t5_proj`
(the language_projection) and `t5_model.*` (T5ForConditionalGeneration). The released files keep
the trained parameters only: Flan-T5 comes from its transformers folder (merged under `t5_model.`,
its config.json read). Without one, T5's sizes come from the shapes (heads from the relative
position table) and the published max_distance 128 and eps 1e-6.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mmjax.convert import blip2, t5
from mmjax.convert.engine import ConversionError, Plan, Table, linear
from mmjax.convert.export import Export
from mmjax.models import blip2 as blip2_models
from mmjax.pretrained import input_spec

T5_CLASS = "mmjax.models.blip2_t5.Blip2T5"
LAVIS_PREFIX = "t5_model."
_LAVIS_LAYER = {"encoder": re.compile(r"t5_model\.encoder\.block\.(\d+)\."),
                "decoder": re.compile(r"t5_model\.decoder\.block\.(\d+)\.")}


def is_t5(config: dict) -> bool:
    """Whether a Blip2Config's language model is T5 (encoder-decoder)."""
    return (config.get("text_config") or {}).get("model_type") == "t5"


def _inputs(image: dict) -> list[dict]:
    """Blip2T5's example inputs: images, prompt ids and mask, decoder ids."""
    return [image, input_spec((1, 8), "int32"), input_spec((1, 8), "bool"), input_spec((1, 4), "int32")]


def _language_table(fields: dict, state: Mapping, torch_prefix: str) -> Table:
    """t5's table under `torch_prefix` (torch) and language_model/ (mmjax), the embedding copies ignored."""
    part = {k[len(torch_prefix):]: v for k, v in state.items() if k.startswith(torch_prefix)}
    table = t5.t5_table(fields["mlp"], ignore=t5.tied_ignores(part, fields["tie_embeddings"]))
    return blip2.prefixed(table, torch_prefix)


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    """Blip2ForConditionalGeneration / Blip2Model with a T5 text_config -> Blip2T5. Rewrites the
    fused qkv biases of `state` in place (blip2.split_qkv_bias)."""
    vision, qformer, qformer_config = blip2._composed(config)
    text = dict(config.get("text_config") or {})
    fields = t5.fields_from_hf(text)
    language = _language_table(fields, state, blip2.LM_PREFIX)
    notes = blip2.split_qkv_bias(state)
    ignore = blip2._text_ffn_ignored(qformer_config, notes)
    if config.get("image_token_index") is not None:
        notes.append(f"image_token_index {config['image_token_index']}: transformers' input_ids start with "
                     f"{qformer['num_queries']} such placeholders; Blip2T5 takes the prompt tokens alone")
    table = Table((*blip2.BRIDGE_TABLE.rules, *language.rules), ignore=(*blip2._IGNORE, *ignore, *language.ignore))
    source = {"library": "hf", "architecture": (config.get("architectures") or [""])[0], "config": config}
    return Plan(T5_CLASS, {"vision": vision, "qformer_fields": qformer, "lm": fields},
                _inputs(blip2._image_input(config.get("vision_config") or {})), table, source, notes)


def hf_export(config: dict) -> Export:
    """Blip2T5 -> transformers Blip2ForConditionalGeneration (or Blip2Model, when imported from one)
    with a T5 text_config. transformers' forward needs image_token_index: kept from an imported
    config, otherwise left for the user to set."""
    fields, source, inputs = config["fields"], config["source"], config["inputs"]
    from_hf_lm = source.get("library") == "hf" and source.get("architecture") in blip2.LM_ARCHITECTURES
    arch = source["architecture"] if from_hf_lm else "Blip2ForConditionalGeneration"
    hf = dict(source["config"]) if from_hf_lm else {}
    vision = blip2._vision_config(fields.get("vision") or {}, inputs[0]["shape"][1], hf.get("vision_config") or {})
    qformer = blip2._qformer_config(fields.get("qformer_fields") or {}, vision["hidden_size"], False,
                                    hf.get("qformer_config") or {})
    lm = {k: v for k, v in (fields.get("lm") or {}).items() if k not in ("scan", "remat_policy")}
    text = {k: v for k, v in t5.hf_config(lm, hf.get("text_config")).items() if k != "architectures"}
    num_queries = {**blip2_models.QFORMER_DEFAULTS, **(fields.get("qformer_fields") or {})}["num_queries"]
    hf.update({"model_type": "blip-2", "architectures": [arch], "vision_config": vision, "qformer_config": qformer,
               "text_config": text, "num_query_tokens": num_queries, "use_decoder_only_language_model": False})
    notes = () if hf.get("image_token_index") is not None else (
        "Set image_token_index in config.json (the tokenizer's image placeholder id) before running "
        "transformers' forward / generate",)
    table = Table((*blip2.BRIDGE_TABLE.rules, *blip2.prefixed(t5.t5_table(lm.get("mlp", "geglu"))).rules))
    return blip2.FusedBiasExport(table, hf, notes=notes)


# --- LAVIS blip2_t5 -----------------------------------------------------------------------------------

def _shape(state: Mapping, key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"Not a LAVIS blip2_t5 checkpoint: it has no {key} (pass Flan-T5's transformers "
                              f"folder too: its weights are not in LAVIS's released files)")
    return tuple(np.shape(state[key]))


def lavis_t5_fields(state: Mapping, lm_config: dict | None = None) -> dict:
    """T5 fields of LAVIS's `t5_model`: from its transformers config.json when given, else from the
    shapes; the gate's GELU is exact either way (LAVIS overrides dense_act_fn with "gelu")."""
    layer = "t5_model.encoder.block.0.layer"
    if lm_config is not None:
        fields = t5.fields_from_hf({**lm_config, "dense_act_fn": "gelu"})
    else:
        vocab, width = _shape(state, "t5_model.shared.weight")
        buckets, heads = _shape(state, f"{layer}.0.SelfAttention.relative_attention_bias.weight")
        inner = _shape(state, f"{layer}.0.SelfAttention.q.weight")[0]
        gated = f"{layer}.1.DenseReluDense.wi_0.weight" in state
        mlp_dim = _shape(state, f"{layer}.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
        depth = {k: 1 + max((int(m[1]) for key in state if (m := pattern.match(key))), default=-1)
                 for k, pattern in _LAVIS_LAYER.items()}
        fields = {"width": width, "encoder_depth": depth["encoder"], "decoder_depth": depth["decoder"],
                  "num_heads": heads, "head_dim": inner // heads, "mlp_dim": mlp_dim, "vocab_size": vocab,
                  "num_buckets": buckets, "max_distance": 128, "mlp": "geglu_exact" if gated else "relu",
                  "tie_embeddings": "t5_model.lm_head.weight" not in state, "norm_eps": 1e-6}
    if fields["mlp"] != "geglu_exact":
        raise ConversionError(f"LAVIS blip2_t5 runs a gated-GELU Flan-T5; this t5_model's feed-forward is "
                              f"{fields['mlp']!r}")
    return fields


def lavis_plan(state: Mapping, tower_rules: list, vision: dict, qformer: dict, image: dict,
               lm_config: dict | None = None) -> Plan:
    """The plan of a LAVIS blip2_t5 state dict (its vision / Q-Former rules and fields from
    blip2_lavis) -> Blip2T5."""
    fields = lavis_t5_fields(state, lm_config)
    language = _language_table(fields, state, LAVIS_PREFIX)
    table = Table((*tower_rules, *linear("t5_proj", "language_projection"), *language.rules),
                  ignore=(*blip2._IGNORE, *language.ignore))
    notes = ["LAVIS's blip2_t5 runs Flan-T5's gate with the exact GELU (dense_act_fn 'gelu'): kept "
             "(lm.mlp 'geglu_exact')"]
    return Plan(T5_CLASS, {"vision": vision, "qformer_fields": qformer, "lm": fields}, _inputs(image), table,
                {"library": "lavis", "model": "blip2_t5"}, notes)
