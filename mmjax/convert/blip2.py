"""BLIP-2 tables: transformers `Blip2VisionModel`, `Blip2QFormerModel`,
`Blip2ForImageTextRetrieval`, and `Blip2ForConditionalGeneration` / `Blip2Model` with a decoder LM
(OPT, LLaMA, Qwen2: mmjax's Blip2LM), both ways; `bridge_plan` takes the vision / Q-Former /
projection part of the latter alone.

The vision tower stores one fused qkv bias, (q | k | v) with the k part a zero that nothing
reads (softmax cancels a key bias); mmjax's Blip2Vision has no key bias. On import
`split_qkv_bias` rewrites each fused bias of the state dict, in place (api.plan_import hands the
same dict to the engine), as EVA's own spelling `q_bias` / `v_bias`, which the table maps; the
export writes the fused bias back with a zero k part. The Q-Former's layers map onto
mmjax.models.qformer (`attention.attention.*` -> attn, `crossattention.*` -> cross_attn,
`intermediate_query` / `output_query` -> mlp_query + ln2_query, `intermediate` / `output` ->
mlp_text + ln2_text).

The language model (`language_model.*`, the same keys in Blip2Model and
Blip2ForConditionalGeneration: both hold a *ForCausalLM) is mapped by mmjax.convert.decoder_lm's
table, every key and path prefixed; its tied `lm_head` is checked and dropped there. An
encoder-decoder LM (Flan-T5) goes to mmjax.convert.blip2_t5 (mmjax's Blip2T5). transformers'
`image_token_index` placeholders are not part of mmjax's input (Blip2LM puts the queries before the text tokens itself).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from mmjax.convert import decoder_lm
from mmjax.convert.engine import (
    HEADS_BIAS,
    HEADS_IN,
    ConversionError,
    Plan,
    Rule,
    Table,
    attention,
    conv,
    heads_out,
    linear,
    norm,
    require,
    rule,
)
from mmjax.convert.export import Export
from mmjax.convert.vit import hf_activation, hf_activation_name
from mmjax.models import blip2, vit
from mmjax.pretrained import input_spec

VISION = "mmjax.models.blip2.Blip2Vision"
QFORMER = "mmjax.models.qformer.QFormer"
RETRIEVAL = "mmjax.models.blip2.Blip2Retrieval"
BRIDGE = "mmjax.models.blip2.Blip2Bridge"
LM = "mmjax.models.blip2.Blip2LM"
HF_ARCHITECTURES = ("Blip2VisionModel", "Blip2QFormerModel", "Blip2ForImageTextRetrieval")
LM_ARCHITECTURES = ("Blip2Model", "Blip2ForConditionalGeneration")
CLASSES = {**dict(zip(HF_ARCHITECTURES, (VISION, QFORMER, RETRIEVAL))), "Blip2ForConditionalGeneration": LM}
LM_PREFIX = "language_model."
_FUSED_BIAS = re.compile(r"(?P<attn>(.+\.)?self_attn)\.qkv\.bias")
_IGNORE = (r".*position_ids",)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _path(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def vision_rules(src: str = "vision_model", dst: str = "vision_model") -> list[Rule]:
    """Blip2VisionModel (under `src`; "" for the bare model) <-> mmjax Blip2Vision (under `dst`)."""
    layer, to = _key(src, "encoder.layers.{i}"), _path(dst, "encoder/layer_{i}")
    qkv = [f"{to}/attn/{n}/kernel" for n in ("query", "key", "value")]
    return [*conv(_key(src, "embeddings.patch_embedding"), _path(dst, "embedding/conv")),
            rule(_key(src, "embeddings.class_embedding"), _path(dst, "cls")),
            rule(_key(src, "embeddings.position_embedding"), _path(dst, "posemb/pos_embedding")),
            *norm(f"{layer}.layer_norm1", f"{to}/ln1"),
            rule(f"{layer}.self_attn.qkv.weight", qkv, HEADS_IN),
            rule(f"{layer}.self_attn.q_bias", f"{to}/attn/query/bias", HEADS_BIAS),
            rule(f"{layer}.self_attn.v_bias", f"{to}/attn/value/bias", HEADS_BIAS),
            *heads_out(f"{layer}.self_attn.projection", f"{to}/attn/out"),
            *norm(f"{layer}.layer_norm2", f"{to}/ln2"),
            *linear(f"{layer}.mlp.fc1", f"{to}/mlp/fc1"),
            *linear(f"{layer}.mlp.fc2", f"{to}/mlp/fc2"),
            *norm(_key(src, "post_layernorm"), _path(dst, "norm"))]


def qformer_rules(src: str = "qformer", dst: str = "qformer", inner: str = "attention",
                  embeddings_norm: str = "layernorm") -> list[Rule]:
    """Blip2QFormerModel (under `src`) <-> mmjax QFormer (under `dst`); LAVIS's BERT spelling has
    `inner="self"` (`attention.self.query`) and `embeddings_norm="embeddings.LayerNorm"`."""
    layer, to = _key(src, "encoder.layer.{i}"), _path(dst, "layer_{i}")

    def attn(name: str, target: str) -> list[Rule]:
        return attention(*(f"{layer}.{name}.{inner}.{n}" for n in ("query", "key", "value")),
                         f"{layer}.{name}.output.dense", f"{to}/{target}")

    return [*norm(_key(src, embeddings_norm), _path(dst, "ln")),
            *attn("attention", "attn"), *norm(f"{layer}.attention.output.LayerNorm", f"{to}/ln1"),
            *attn("crossattention", "cross_attn"),
            *norm(f"{layer}.crossattention.output.LayerNorm", f"{to}/ln_cross"),
            *linear(f"{layer}.intermediate_query.dense", f"{to}/mlp_query/fc1"),
            *linear(f"{layer}.output_query.dense", f"{to}/mlp_query/fc2"),
            *norm(f"{layer}.output_query.LayerNorm", f"{to}/ln2_query"),
            *linear(f"{layer}.intermediate.dense", f"{to}/mlp_text/fc1"),
            *linear(f"{layer}.output.dense", f"{to}/mlp_text/fc2"),
            *norm(f"{layer}.output.LayerNorm", f"{to}/ln2_text")]


VISION_TABLE = Table(tuple(vision_rules("", "")), ignore=_IGNORE)
QFORMER_TABLE = Table(tuple(qformer_rules("", "")), ignore=_IGNORE)
RETRIEVAL_TABLE = Table((
    *vision_rules(),
    rule("query_tokens", "query_tokens"),
    rule("embeddings.word_embeddings.weight", "embeddings/word/embedding"),
    rule("embeddings.position_embeddings.weight", "embeddings/position/embedding"),
    *qformer_rules(),
    *linear("vision_projection", "vision_projection"),
    *linear("text_projection", "text_projection"),
    *linear("itm_head", "itm_head"),
), ignore=_IGNORE)
BRIDGE_TABLE = Table((
    *vision_rules(),
    rule("query_tokens", "query_tokens"),
    *qformer_rules(),
    *linear("language_projection", "language_projection"),
), ignore=_IGNORE)
TABLES = dict(zip(HF_ARCHITECTURES, (VISION_TABLE, QFORMER_TABLE, RETRIEVAL_TABLE)))


def split_qkv_bias(state: dict[str, np.ndarray]) -> list[str]:
    """Rewrites each fused `...self_attn.qkv.bias` of `state` (in place) as `...self_attn.q_bias`
    and `...self_attn.v_bias`; returns notes (a non-zero k part is dropped: no output reads it)."""
    notes = []
    for key in [k for k in state if _FUSED_BIAS.fullmatch(k)]:
        attn = _FUSED_BIAS.fullmatch(key)["attn"]
        fused = np.asarray(state.pop(key))
        if fused.ndim != 1 or fused.shape[0] % 3:
            raise ConversionError(f"{key}: expected a fused (3 * width,) q | k | v bias, got shape {fused.shape}")
        q, k, v = np.split(fused, 3)
        state[f"{attn}.q_bias"], state[f"{attn}.v_bias"] = q, v
        if np.any(k):
            notes.append(f"Dropped the non-zero key part of {key}: softmax cancels a key bias, no output changes")
    return notes


def fuse_qkv_bias(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of split_qkv_bias: q_bias / v_bias become one fused bias, zero in the k part."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".self_attn.q_bias") or k == "self_attn.q_bias"]:
        attn = key[: -len(".q_bias")]
        q, v = out.pop(key), out.pop(f"{attn}.v_bias")
        out[f"{attn}.qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
    return out


@dataclasses.dataclass(frozen=True)
class FusedBiasExport(Export):
    """An Export whose state dict carries transformers' fused qkv bias (see fuse_qkv_bias)."""

    def state_dict(self, params, what: str) -> dict[str, np.ndarray]:
        return fuse_qkv_bias(super().state_dict(params, what))


# ---------------------------------------------------------------------------------------------
# transformers config.json <-> mmjax fields
# ---------------------------------------------------------------------------------------------

def vision_fields(c: dict) -> dict:
    """Blip2Vision fields of a Blip2VisionConfig (transformers' defaults: BLIP-2's ViT-g)."""
    return {"variant": None, "width": c.get("hidden_size", 1408), "depth": c.get("num_hidden_layers", 39),
            "num_heads": c.get("num_attention_heads", 16), "mlp_dim": c.get("intermediate_size", 6144),
            "patch_size": c.get("patch_size", 14), "ln_eps": c.get("layer_norm_eps", 1e-6),
            "act": hf_activation(c.get("hidden_act", "gelu")), "qkv_bias": bool(c.get("qkv_bias", True))}


def qformer_fields(c: dict, num_queries: int = 32) -> dict:
    """QFormer fields of a Blip2QFormerConfig (transformers' defaults: BLIP-2's BERT-base Q-Former)."""
    return {"width": c.get("hidden_size", 768), "depth": c.get("num_hidden_layers", 12),
            "num_heads": c.get("num_attention_heads", 12), "mlp_dim": c.get("intermediate_size", 3072),
            "num_queries": num_queries, "cross_attention_frequency": c.get("cross_attention_frequency", 2),
            "text_ffn": bool(c.get("use_qformer_text_input", False)), "act": hf_activation(c.get("hidden_act", "gelu")),
            "ln_eps": c.get("layer_norm_eps", 1e-12)}


def _image_input(vision_config: dict) -> dict:
    size = vision_config.get("image_size", 224)
    return input_spec((1, size, size, 3))


def _composed(config: dict) -> tuple[dict, dict, dict]:
    """(vision fields, Q-Former fields, Q-Former config) of a Blip2Config."""
    vision_config, qformer_config = config.get("vision_config") or {}, config.get("qformer_config") or {}
    vision = vision_fields(vision_config)
    context = qformer_config.get("encoder_hidden_size", vision["width"])
    if context != vision["width"]:
        raise ConversionError(f"qformer_config.encoder_hidden_size {context} differs from the vision width "
                              f"{vision['width']}")
    qformer = qformer_fields(qformer_config, config.get("num_query_tokens", 32))
    del qformer["text_ffn"]          # the composed models decide it
    return vision, qformer, qformer_config


def prefixed(table: Table, torch_prefix: str = LM_PREFIX, mmjax_prefix: str = "language_model/") -> Table:
    """`table` for a model nested under `torch_prefix` (torch) and `mmjax_prefix` (mmjax)."""
    rules = tuple(dataclasses.replace(r, torch_key=torch_prefix + r.torch_key,
                                      mmjax_paths=tuple(mmjax_prefix + p for p in r.mmjax_paths)) for r in table.rules)
    return Table(rules, ignore=tuple(re.escape(torch_prefix) + p for p in table.ignore))


def _language_plan(config: dict, state: dict[str, np.ndarray]) -> Plan:
    """decoder_lm's plan for the `language_model.*` part of a Blip2Config checkpoint."""
    text = dict(config.get("text_config") or {})
    kind = text.get("model_type", "opt")
    if kind not in decoder_lm.ARCHITECTURE_OF:
        raise ConversionError(f"BLIP-2 with a {kind!r} language model is not supported; supported: "
                              f"{sorted(decoder_lm.ARCHITECTURE_OF)}")
    if kind == "opt" and text.get("word_embed_proj_dim", text.get("hidden_size")) != text.get("hidden_size"):
        raise ConversionError("text_config.word_embed_proj_dim differs from hidden_size: language_projection "
                              "(hidden_size wide) cannot feed OPT's narrower word embeddings")
    part = {k[len(LM_PREFIX):]: v for k, v in state.items() if k.startswith(LM_PREFIX)}
    return decoder_lm.from_hf({**text, "architectures": [decoder_lm.ARCHITECTURE_OF[kind]]}, part)


def _text_ffn_ignored(qformer_config: dict, notes: list[str]) -> list[str]:
    if not qformer_config.get("use_qformer_text_input", False):
        return []
    notes.append("Left out the Q-Former's text feed-forward (intermediate / output): only the queries are read")
    return [r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*"]


def lm_plan(config: dict, state: dict[str, np.ndarray]) -> Plan:
    """Blip2ForConditionalGeneration / Blip2Model with a decoder LM -> mmjax Blip2LM. Rewrites the
    fused qkv biases of `state` in place (split_qkv_bias)."""
    vision, qformer, qformer_config = _composed(config)
    language = _language_plan(config, state)
    notes = split_qkv_bias(state)
    ignore = _text_ffn_ignored(qformer_config, notes)
    if config.get("image_token_index") is not None:
        notes.append(f"image_token_index {config['image_token_index']}: transformers' input_ids start with "
                     f"{qformer['num_queries']} such placeholders; Blip2LM takes the text tokens alone")
    table = Table((*BRIDGE_TABLE.rules, *prefixed(language.table).rules),
                  ignore=(*_IGNORE, *ignore, *prefixed(language.table).ignore))
    fields = {"vision": vision, "qformer_fields": qformer, "lm": language.fields}
    inputs = [_image_input(config.get("vision_config") or {}), input_spec((1, 8), "int32")]
    source = {"library": "hf", "architecture": (config.get("architectures") or [""])[0], "config": config}
    return Plan(LM, fields, inputs, table, source, notes)


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    arch = (config.get("architectures") or [""])[0]
    if arch in LM_ARCHITECTURES:
        if (config.get("text_config") or {}).get("model_type") == "t5":
            from mmjax.convert import blip2_t5  # it builds on this module's tables

            return blip2_t5.from_hf(config, state)
        return lm_plan(config, state)
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(f"Unsupported BLIP-2 architecture {arch!r}; supported: "
                              f"{list(HF_ARCHITECTURES + LM_ARCHITECTURES)}")
    notes = split_qkv_bias(state)
    source = {"library": "hf", "architecture": arch, "config": config}
    if arch == "Blip2VisionModel":
        return Plan(VISION, vision_fields(config), [_image_input(config)], VISION_TABLE, source, notes)
    if arch == "Blip2QFormerModel":
        fields = qformer_fields(config)
        length = fields["num_queries"] + int(fields["text_ffn"])      # one text token builds the text FFN
        inputs = [input_spec((1, length, fields["width"])), input_spec((1, length), "bool"),
                  input_spec((1, 1, config.get("encoder_hidden_size", 1408)))]
        return Plan(QFORMER, fields, inputs, QFORMER_TABLE, source, notes)
    vision, qformer, qformer_config = _composed(config)
    if not qformer_config.get("use_qformer_text_input", False):
        raise ConversionError("Blip2ForImageTextRetrieval needs qformer_config.use_qformer_text_input=True (the "
                              "text feed-forward that ITC and ITM read)")
    max_len = qformer_config.get("max_position_embeddings", 512)
    fields = {"vision": vision, "qformer_fields": qformer, "vocab_size": qformer_config.get("vocab_size", 30522),
              "max_len": max_len, "embed_dim": config.get("image_text_hidden_size", 256)}
    inputs = [_image_input(config.get("vision_config") or {}), input_spec((1, max_len), "int32"),
              input_spec((1, max_len), "bool")]
    if config.get("image_token_index") is not None:
        notes.append("The config has image_token_index: transformers' processor prepends the query placeholders "
                     "to input_ids; mmjax's Blip2Retrieval takes the text tokens alone")
    return Plan(RETRIEVAL, fields, inputs, RETRIEVAL_TABLE, source, notes)


def bridge_plan(config: dict, state: dict[str, np.ndarray]) -> Plan:
    """A Blip2Model / Blip2ForConditionalGeneration checkpoint without its language model: vision
    tower, queries, Q-Former and language_projection into mmjax's Blip2Bridge. Rewrites the fused
    qkv biases of `state` in place (split_qkv_bias); the language_model.* keys are ignored, with a note."""
    vision, qformer, qformer_config = _composed(config)
    notes = split_qkv_bias(state)
    ignore = [r"language_model\..*", *_text_ffn_ignored(qformer_config, notes)]
    text = config.get("text_config") or {}
    lm_width = text.get("hidden_size", text.get("d_model"))      # T5 spells it d_model
    if lm_width is None:
        raise ConversionError("The config has no text_config.hidden_size: language_projection's width is unknown")
    lm = [k for k in state if k.startswith("language_model.")]
    if lm:
        notes.append(f"Left out the language model ({len(lm)} language_model.* keys): from_hf converts it too")
    fields = {"vision": vision, "qformer_fields": qformer, "lm_width": lm_width}
    table = Table(BRIDGE_TABLE.rules, ignore=(*BRIDGE_TABLE.ignore, *ignore))
    source = {"library": "hf", "architecture": (config.get("architectures") or [""])[0], "config": config}
    return Plan(BRIDGE, fields, [_image_input(config.get("vision_config") or {})], table, source, notes)


# ---------------------------------------------------------------------------------------------
# mmjax -> transformers
# ---------------------------------------------------------------------------------------------

def _vision_config(fields: dict, image_size: int, base: dict) -> dict:
    vision = {**{f.name: f.default for f in dataclasses.fields(blip2.Blip2Vision)
                 if f.name not in ("parent", "name")}, **fields}
    require(vision, "transformers Blip2VisionModel", posemb="learn", pre_norm=False, fc_norm=False, patch_bias=True,
            layer_scale=None, conv_stem=[], in_channels=3, class_token=True, num_classes=None,
            representation_size=None, pool="none", block=None)
    arch = vit.resolve_arch(vit.ViT(**{k: vision.get(k) for k in ("variant", *vit.ARCH_FIELDS)}))
    return {**base, "model_type": "blip_2_vision_model", "hidden_size": arch["width"],
            "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
            "intermediate_size": arch["mlp_dim"], "patch_size": arch["patch_size"][0], "image_size": image_size,
            "layer_norm_eps": vision["ln_eps"], "hidden_act": hf_activation_name(vision["act"]),
            "qkv_bias": bool(vision["qkv_bias"])}


def _qformer_config(fields: dict, context_width: int, text_ffn: bool, base: dict) -> dict:
    q = {**blip2.QFORMER_DEFAULTS, **fields}
    return {**base, "model_type": "blip_2_qformer", "hidden_size": q["width"], "num_hidden_layers": q["depth"],
            "num_attention_heads": q["num_heads"], "intermediate_size": q["mlp_dim"],
            "hidden_act": hf_activation_name(q["act"]), "layer_norm_eps": q["ln_eps"],
            "cross_attention_frequency": q["cross_attention_frequency"], "encoder_hidden_size": context_width,
            "use_qformer_text_input": text_ffn}


def hf_export(config: dict) -> Export:
    """The table and config.json that write a Blip2Vision / QFormer / Blip2Retrieval model
    directory for transformers (Blip2VisionModel / Blip2QFormerModel / Blip2ForImageTextRetrieval)."""
    if config["class"] == LM:
        return lm_export(config)
    fields, source, inputs = config["fields"], config["source"], config["inputs"]
    arch = {c: a for a, c in CLASSES.items()}[config["class"]]
    hf = dict(source["config"]) if source.get("library") == "hf" and source.get("architecture") == arch else {}
    if arch == "Blip2VisionModel":
        hf = _vision_config(fields, inputs[0]["shape"][1], hf)
    elif arch == "Blip2QFormerModel":
        hf = _qformer_config(fields, inputs[2]["shape"][-1], bool(fields.get("text_ffn")), hf)
    else:
        vision = _vision_config(fields.get("vision") or {}, inputs[0]["shape"][1], hf.get("vision_config") or {})
        qformer = _qformer_config(fields.get("qformer_fields") or {}, vision["hidden_size"], True,
                                  hf.get("qformer_config") or {})
        qformer.update(vocab_size=fields.get("vocab_size", 30522), max_position_embeddings=fields.get("max_len", 512))
        num_queries = {**blip2.QFORMER_DEFAULTS, **(fields.get("qformer_fields") or {})}["num_queries"]
        hf.update({"model_type": "blip-2", "vision_config": vision, "qformer_config": qformer,
                   "num_query_tokens": num_queries,
                   "image_text_hidden_size": fields.get("embed_dim", 256)})
    hf["architectures"] = [arch]
    return FusedBiasExport(TABLES[arch], hf)


def lm_export(config: dict) -> Export:
    """Blip2LM -> transformers Blip2ForConditionalGeneration (or Blip2Model, when imported from one):
    the language model through decoder_lm's export, prefixed. transformers' forward needs
    image_token_index: it is kept from an imported config, otherwise left for the user to set."""
    fields, source, inputs = config["fields"], config["source"], config["inputs"]
    from_hf_lm = source.get("library") == "hf" and source.get("architecture") in LM_ARCHITECTURES
    arch = source["architecture"] if from_hf_lm else "Blip2ForConditionalGeneration"
    hf = dict(source["config"]) if from_hf_lm else {}
    vision = _vision_config(fields.get("vision") or {}, inputs[0]["shape"][1], hf.get("vision_config") or {})
    qformer = _qformer_config(fields.get("qformer_fields") or {}, vision["hidden_size"], False,
                              hf.get("qformer_config") or {})
    text_source = {"library": "hf", "config": hf["text_config"]} if hf.get("text_config") else {}
    language = decoder_lm.hf_export({"fields": fields.get("lm") or {}, "source": text_source})
    text = {k: v for k, v in language.hf_config.items() if k != "architectures"}
    num_queries = {**blip2.QFORMER_DEFAULTS, **(fields.get("qformer_fields") or {})}["num_queries"]
    hf.update({"model_type": "blip-2", "architectures": [arch], "vision_config": vision, "qformer_config": qformer,
               "text_config": text, "num_query_tokens": num_queries})
    notes = () if hf.get("image_token_index") is not None else (
        "Set image_token_index in config.json (the tokenizer's image placeholder id) before running "
        "transformers' forward / generate",)
    table = Table((*BRIDGE_TABLE.rules, *prefixed(language.table).rules))
    return FusedBiasExport(table, hf, notes=notes)
