"""BLIP tables: transformers `BlipForImageTextRetrieval`, `BlipForConditionalGeneration` and
`BlipForQuestionAnswering`, both ways.

The vision tower (`vision_model.*`: fused qkv, `projection`, `post_layernorm`) maps onto mmjax's
ViT; the text encoder / decoder are BERT layers without token-type embeddings, mapped with
convert/bert.py's rules. The captioner's LM decoder is tied to the word embeddings (transformers'
default, `tie_word_embeddings`): a written-out copy is checked equal on import and never written.
BLIP pretraining's learned ITC temperature has no place in transformers: left out on export, with
a note.
"""

from __future__ import annotations

import numpy as np

from mmjax.convert import bert as bert_rules
from mmjax.convert.engine import (
    ConversionError,
    Plan,
    Rule,
    Table,
    conv,
    fused_qkv,
    heads_out,
    linear,
    norm,
    require,
    rule,
)
from mmjax.convert.export import Export
from mmjax.convert.vit import hf_activation, hf_activation_name
from mmjax.models import bert, blip, vit
from mmjax.pretrained import input_spec

RETRIEVAL = "mmjax.models.blip.BlipRetrieval"
CAPTIONER = "mmjax.models.blip.BlipCaptioner"
QUESTION_ANSWERING = "mmjax.models.blip.BlipQuestionAnswering"
HF_ARCHITECTURES = ("BlipForImageTextRetrieval", "BlipForConditionalGeneration", "BlipForQuestionAnswering")
CLASSES = dict(zip(HF_ARCHITECTURES, (RETRIEVAL, CAPTIONER, QUESTION_ANSWERING)))
DECODER_HEAD = "text_decoder.cls.predictions"
TIED = {f"{DECODER_HEAD}.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        f"{DECODER_HEAD}.decoder.bias": f"{DECODER_HEAD}.bias"}


def vision_rules(src: str = "vision_model", dst: str = "vision_model") -> list[Rule]:
    """BlipVisionModel <-> mmjax ViT (pool="none": post_layernorm is its final norm on all tokens)."""
    layer, to = f"{src}.encoder.layers.{{i}}", f"{dst}/encoder/layer_{{i}}"
    return [*conv(f"{src}.embeddings.patch_embedding", f"{dst}/embedding/conv"),
            rule(f"{src}.embeddings.class_embedding", f"{dst}/cls"),
            rule(f"{src}.embeddings.position_embedding", f"{dst}/posemb/pos_embedding"),
            *norm(f"{layer}.layer_norm1", f"{to}/ln1"),
            *fused_qkv(f"{layer}.self_attn.qkv.weight", f"{layer}.self_attn.qkv.bias", f"{to}/attn"),
            *heads_out(f"{layer}.self_attn.projection", f"{to}/attn/out"),
            *norm(f"{layer}.layer_norm2", f"{to}/ln2"),
            *linear(f"{layer}.mlp.fc1", f"{to}/mlp/fc1"),
            *linear(f"{layer}.mlp.fc2", f"{to}/mlp/fc2"),
            *norm(f"{src}.post_layernorm", f"{dst}/norm")]


def text_rules(src: str, dst: str) -> list[Rule]:
    """BlipTextModel (`src`: text_encoder or text_decoder.bert) <-> mmjax Bert (`dst`)."""
    return [*bert_rules.embeddings_rules(f"{src}.embeddings", f"{dst}/embeddings"),
            *bert_rules.layer_rules(f"{src}.encoder.layer.{{i}}", f"{dst}/encoder/layer_{{i}}")]


RETRIEVAL_TABLE = Table((
    *vision_rules(),
    *text_rules("text_encoder", "text_encoder"),
    *linear("vision_proj", "vision_proj"),
    *linear("text_proj", "text_proj"),
    *linear("itm_head", "itm_head"),
), ignore=(r".*position_ids",))

CAPTIONER_TABLE = Table((
    *vision_rules(),
    *text_rules("text_decoder.bert", "text_decoder"),
    *bert_rules.lm_head_rules(DECODER_HEAD, "text_decoder/lm_head"),
), ignore=(r".*position_ids",))

QUESTION_ANSWERING_TABLE = Table((
    *vision_rules(),
    *text_rules("text_encoder", "text_encoder"),
    *text_rules("text_decoder.bert", "text_decoder"),
    *bert_rules.lm_head_rules(DECODER_HEAD, "text_decoder/lm_head"),
), ignore=(r".*position_ids",))
TABLES = dict(zip(HF_ARCHITECTURES, (RETRIEVAL_TABLE, CAPTIONER_TABLE, QUESTION_ANSWERING_TABLE)))


def _tied_keys(state: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Ignore patterns for the decoder copies of tied parameters; raises for an untied decoder."""
    skipped = []
    for key, source in TIED.items():
        if key not in state:
            continue
        if source not in state or not np.array_equal(state[key], state[source]):
            raise ConversionError(f"{key} differs from {source}: an untied LM decoder is not supported "
                                  "(mmjax's LM head scores against the word embeddings)")
        skipped.append(key.replace(".", r"\."))
    return tuple(skipped)


def _vision_fields(c: dict) -> dict:
    return {"variant": None, "width": c.get("hidden_size", 768), "depth": c.get("num_hidden_layers", 12),
            "num_heads": c.get("num_attention_heads", 12), "mlp_dim": c.get("intermediate_size", 3072),
            "patch_size": c.get("patch_size", 16), "ln_eps": c.get("layer_norm_eps", 1e-5),
            "act": hf_activation(c.get("hidden_act", "gelu"))}


def _text_fields(c: dict) -> dict:
    return {"variant": None, "width": c.get("hidden_size", 768), "depth": c.get("num_hidden_layers", 12),
            "num_heads": c.get("num_attention_heads", 8), "mlp_dim": c.get("intermediate_size", 3072),
            "vocab_size": c.get("vocab_size", 30524), "max_len": c.get("max_position_embeddings", 512),
            "ln_eps": c.get("layer_norm_eps", 1e-12), "act": hf_activation(c.get("hidden_act", "gelu")),
            "dropout": c.get("hidden_dropout_prob", 0.0)}


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    arch = (config.get("architectures") or [""])[0]
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(f"Unsupported BLIP architecture {arch!r}; supported: {list(HF_ARCHITECTURES)}")
    vision_config, text_config = config.get("vision_config") or {}, config.get("text_config") or {}
    if not text_config.get("is_decoder", True):
        raise ConversionError("BLIP text config with is_decoder=False has no cross-attention layers; mmjax's BLIP "
                              "text towers cross-attend to the image in every layer")
    vision, text = _vision_fields(vision_config), _text_fields(text_config)
    if text_config.get("encoder_hidden_size", vision["width"]) != vision["width"]:
        raise ConversionError(f"text_config.encoder_hidden_size {text_config['encoder_hidden_size']} differs from "
                              f"the vision tower's width {vision['width']}")
    size = vision_config.get("image_size", 384)
    inputs = [input_spec((1, size, size, 3)), input_spec((1, text["max_len"]), "int32"),
              input_spec((1, text["max_len"]), "bool")]
    source = {"library": "hf", "architecture": arch, "config": config}
    if arch == "BlipForImageTextRetrieval":
        fields = {"vision": vision, "text": text, "embed_dim": config.get("image_text_hidden_size", 256)}
        return Plan(RETRIEVAL, fields, inputs, RETRIEVAL_TABLE, source)
    table = Table(TABLES[arch].rules, ignore=(*TABLES[arch].ignore, *_tied_keys(state)))
    if arch == "BlipForQuestionAnswering":
        if text["width"] != vision["width"]:
            raise ConversionError(f"BlipForQuestionAnswering's decoder reads the question through "
                                  f"encoder_hidden_size: the text width {text['width']} must equal the vision width "
                                  f"{vision['width']}")
        inputs += [input_spec((1, text["max_len"]), "int32"), input_spec((1, text["max_len"]), "bool")]
    return Plan(CLASSES[arch], {"vision": vision, "text": text}, inputs, table, source)


def _towers(fields: dict) -> tuple[dict, dict]:
    """The vision and text tower fields with BLIP's defaults filled in; raises for what transformers
    cannot express."""
    vision = {**blip.VISION_DEFAULTS, **(fields.get("vision") or {})}
    text = {**blip.TEXT_DEFAULTS, **(fields.get("text") or {})}
    require(vision, "transformers BLIP vision tower", posemb="learn", pre_norm=False, fc_norm=False, patch_bias=True,
            qkv_bias=True, layer_scale=None, conv_stem=[], in_channels=3, class_token=True, num_classes=None,
            representation_size=None)
    require(text, "transformers BLIP text tower", block=None, type_vocab_size=0)
    return vision, text


def hf_export(config: dict) -> Export:
    """The table and config.json that write a BlipRetrieval / BlipCaptioner / BlipQuestionAnswering
    for transformers (BlipForImageTextRetrieval / BlipForConditionalGeneration / BlipForQuestionAnswering)."""
    fields, source = config["fields"], config["source"]
    arch = {c: a for a, c in CLASSES.items()}[config["class"]]
    retrieval = arch == HF_ARCHITECTURES[0]
    vision, text = _towers(fields)
    v = vit.resolve_arch(vit.ViT(**{k: vision.get(k) for k in ("variant", *vit.ARCH_FIELDS)}))
    t = bert.resolve_arch(text.get("variant"), **{k: text.get(k) for k in bert.ARCH_FIELDS})
    image_size = config["inputs"][0]["shape"][1]
    hf = dict(source["config"]) if source.get("library") == "hf" else {}
    vision_config = dict(hf.get("vision_config") or {})
    vision_config.update({
        "model_type": "blip_vision_model", "hidden_size": v["width"], "num_hidden_layers": v["depth"],
        "num_attention_heads": v["num_heads"], "intermediate_size": v["mlp_dim"], "patch_size": v["patch_size"][0],
        "image_size": image_size, "layer_norm_eps": vision["ln_eps"],
        "hidden_act": hf_activation_name(vision["act"])})
    text_config = dict(hf.get("text_config") or {})
    text_config.update({
        "model_type": "blip_text_model", "vocab_size": text["vocab_size"], "hidden_size": t["width"],
        "encoder_hidden_size": v["width"], "intermediate_size": t["mlp_dim"], "num_hidden_layers": t["depth"],
        "num_attention_heads": t["num_heads"], "max_position_embeddings": text.get("max_len", 512),
        "hidden_act": hf_activation_name(text.get("act", "gelu")), "layer_norm_eps": text.get("ln_eps", 1e-12),
        "hidden_dropout_prob": text.get("dropout", 0.0), "is_decoder": True, "tie_word_embeddings": True})
    if arch == "BlipForQuestionAnswering" and t["width"] != v["width"]:
        raise ConversionError(f"transformers' BlipForQuestionAnswering needs equal text and vision widths (its "
                              f"encoder_hidden_size serves both); this model has {t['width']} and {v['width']}")
    hf.update({"architectures": [arch], "model_type": "blip",
               "vision_config": vision_config, "text_config": text_config, "tie_word_embeddings": True})
    if not retrieval:
        return Export(TABLES[arch], hf)
    hf["image_text_hidden_size"] = fields.get("embed_dim", 256)
    if fields.get("learn_temperature"):
        return Export(RETRIEVAL_TABLE, hf, drop=(r"temp",),
                      notes=("Left out the learned ITC temperature (temp): transformers' BlipForImageTextRetrieval "
                             "scores unscaled cosine similarities",))
    return Export(RETRIEVAL_TABLE, hf)
