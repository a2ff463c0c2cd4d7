"""ViLT tables: transformers `ViltModel`, `ViltForMaskedLM`, `ViltForImageAndTextRetrieval` and
`ViltForQuestionAnswering`, both ways.

The text embeddings are BERT's (mmjax.convert.bert.embeddings_rules); the blocks are pre-LN ViT
blocks spelt in transformers' 4.x ViT names. transformers ties the MLM decoder's weight to the
word embeddings (ViltConfig forces tie_word_embeddings=True), as mmjax's LM head does: a stored
`mlm_score.decoder.weight` must equal them and is not written back; its bias is the head's own.
Not supported, with errors: ViltForImagesAndTextClassification (NLVR2's image pairs) and patch
sampling (max_image_length >= 0).
"""

from __future__ import annotations

import numpy as np

from mmjax.convert import bert
from mmjax.convert.engine import ConversionError, Plan, Table, attention, conv, linear, norm, require, rule
from mmjax.convert.vit import hf_activation, hf_activation_name
from mmjax.models import vilt, vit
from mmjax.pretrained import input_spec

VILT = "mmjax.models.vilt.ViLT"
# transformers architecture -> (mmjax head, prefix of the ViltModel inside it)
HF_ARCHITECTURES = {"ViltModel": ("none", ""), "ViltForMaskedLM": ("mlm", "vilt."),
                    "ViltForImageAndTextRetrieval": ("retrieval", "vilt."),
                    "ViltForQuestionAnswering": ("vqa", "vilt.")}
HEAD_ARCHITECTURES = {head: arch for arch, (head, _) in HF_ARCHITECTURES.items()}
DECODER, WORDS = "mlm_score.decoder.weight", "vilt.embeddings.text_embeddings.word_embeddings.weight"


def layer_rules(src: str, dst: str) -> list:
    """One ViltLayer (`encoder.layer.{i}`) <-> one pre-LN mmjax Block (`encoder/layer_{i}`)."""
    return [*norm(f"{src}.layernorm_before", f"{dst}/ln1"),
            *attention(*(f"{src}.attention.attention.{n}" for n in ("query", "key", "value")),
                       f"{src}.attention.output.dense", f"{dst}/attn"),
            *norm(f"{src}.layernorm_after", f"{dst}/ln2"),
            *linear(f"{src}.intermediate.dense", f"{dst}/mlp/fc1"),
            *linear(f"{src}.output.dense", f"{dst}/mlp/fc2")]


def hf_table(prefix: str, ignore: tuple[str, ...] = ()) -> Table:
    """`prefix`: "vilt." inside the heads' models, "" for a bare ViltModel."""
    emb = f"{prefix}embeddings"
    return Table((
        *bert.embeddings_rules(f"{emb}.text_embeddings", "text_embeddings"),
        rule(f"{emb}.cls_token", "cls"),
        rule(f"{emb}.position_embeddings", "pos_embedding"),
        *conv(f"{emb}.patch_embeddings.projection", "patch_embed/conv"),
        rule(f"{emb}.token_type_embeddings.weight", "modality_embedding/embedding"),
        *layer_rules(f"{prefix}encoder.layer.{{i}}", "encoder/layer_{i}"),
        *norm(f"{prefix}layernorm", "ln_final"),
        *linear(f"{prefix}pooler.dense", "pooler"),
        *linear("mlm_score.transform.dense", "lm_head/dense"),
        *norm("mlm_score.transform.LayerNorm", "lm_head/ln"),
        rule("mlm_score.decoder.bias", "lm_head/bias"),
        *linear("rank_output", "retrieval_head"),
        *linear("classifier.0", "vqa_head/fc1"),
        *norm("classifier.1", "vqa_head/ln"),
        *linear("classifier.3", "vqa_head/fc2"),
    ), ignore=(r".*position_ids", r".*token_type_ids", *ignore))


def _tied_decoder(state: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The ignore pattern for a stored decoder weight that repeats the word embeddings."""
    if DECODER not in state:
        return ()
    if WORDS not in state or not np.array_equal(state[DECODER], state[WORDS]):
        raise ConversionError(f"{DECODER} differs from {WORDS}: an untied MLM decoder is not supported "
                              "(transformers' ViltForMaskedLM and mmjax's LM head tie it to the word embeddings)")
    return (DECODER.replace(".", r"\."),)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


def _hf_image_size(value) -> int:
    """transformers' ViLT takes one int (its visual_embed and default pixel_mask square it)."""
    size = _pair(value)
    if size[0] != size[1]:
        raise ConversionError(f"transformers' ViLT needs a square image_size (its position grid), got {size}")
    return size[0]


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    arch = (config.get("architectures") or ["ViltModel"])[0]
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(f"Unsupported ViLT architecture {arch!r}; supported: {sorted(HF_ARCHITECTURES)} "
                              "(NLVR2's ViltForImagesAndTextClassification is not)")
    get = config.get
    if not get("qkv_bias", True):
        raise ConversionError("ViLT with qkv_bias=False is not supported (mmjax's blocks bias q/k/v)")
    if get("max_image_length", -1) is not None and get("max_image_length", -1) >= 0:
        raise ConversionError(f"ViLT max_image_length={get('max_image_length')} samples patches at random; "
                              "mmjax keeps every patch (max_image_length=-1)")
    head, prefix = HF_ARCHITECTURES[arch]
    if prefix and not any(k.startswith(prefix) for k in state):
        prefix = ""
    image_size, patch = _pair(get("image_size", 384)), _pair(get("patch_size", 32))
    fields = {"variant": None, "width": get("hidden_size", 768), "depth": get("num_hidden_layers", 12),
              "num_heads": get("num_attention_heads", 12), "mlp_dim": get("intermediate_size", 3072),
              "patch_size": list(patch), "image_size": list(image_size), "in_channels": get("num_channels", 3),
              "vocab_size": get("vocab_size", 30522), "max_len": get("max_position_embeddings", 40),
              "type_vocab_size": get("type_vocab_size", 2), "modality_types": get("modality_type_vocab_size", 2),
              "ln_eps": get("layer_norm_eps", 1e-12), "act": hf_activation(get("hidden_act", "gelu")),
              "dropout": get("hidden_dropout_prob", 0.0), "head": head}
    if head == "vqa":
        fields["num_answers"] = int(state["classifier.3.weight"].shape[0]) if "classifier.3.weight" in state \
            else len(get("id2label") or {})
    inputs = [input_spec((1, fields["max_len"]), "int32"),
              input_spec((1, image_size[0], image_size[1], fields["in_channels"]))]
    table = hf_table(prefix, _tied_decoder(state) if head == "mlm" else ())
    return Plan(VILT, fields, inputs, table, {"library": "hf", "architecture": arch, "config": config})


def hf_export(config: dict) -> tuple[Table, dict]:
    """The table and config.json that write this model directory for transformers: the ViltFor*
    class of its head (ViltModel without one)."""
    fields = config["fields"]
    require(fields, "transformers ViLT", block=None)
    if fields.get("type_vocab_size", 2) < 1:
        raise ConversionError("transformers' ViLT needs token-type embeddings (type_vocab_size >= 1)")
    head = fields.get("head", "none")
    if head not in HEAD_ARCHITECTURES:
        raise ConversionError(f"transformers has no ViLT class for the {head!r} head; exportable heads: "
                              f"{sorted(HEAD_ARCHITECTURES)}")
    arch_name = HEAD_ARCHITECTURES[head]
    arch = vilt.ViLT(**{k: fields.get(k) for k in vit.ARCH_FIELDS}, variant=fields.get("variant", "B/32")).arch()
    if arch["patch_size"][0] != arch["patch_size"][1]:
        raise ConversionError(f"transformers' ViLT needs square patches, got {arch['patch_size']}")
    image_size = fields.get("image_size", 384)
    source = config["source"]
    hf_config = dict(source["config"]) if source.get("library") == "hf" else {}
    hf_config.update({
        "architectures": [arch_name], "model_type": "vilt", "hidden_size": arch["width"],
        "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
        "intermediate_size": arch["mlp_dim"], "hidden_act": hf_activation_name(fields.get("act", "gelu")),
        "patch_size": arch["patch_size"][0], "image_size": _hf_image_size(image_size),
        "num_channels": fields.get("in_channels", 3), "vocab_size": fields.get("vocab_size", 30522),
        "max_position_embeddings": fields.get("max_len", 40), "type_vocab_size": fields.get("type_vocab_size", 2),
        "modality_type_vocab_size": fields.get("modality_types", 2), "layer_norm_eps": fields.get("ln_eps", 1e-12),
        "hidden_dropout_prob": fields.get("dropout", 0.0), "qkv_bias": True, "max_image_length": -1,
        "tie_word_embeddings": True})
    hf_config.setdefault("attention_probs_dropout_prob", 0.0)
    if head == "vqa":
        answers = fields.get("num_answers", 3129)
        if len(hf_config.get("id2label") or {}) != answers:
            hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(answers)}
            hf_config["label2id"] = {f"LABEL_{i}": i for i in range(answers)}
    return hf_table("" if head == "none" else "vilt."), hf_config
