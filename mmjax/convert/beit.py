"""BEiT tables: timm `beit_*` / `beitv2_*` classifiers and Hugging Face
`BeitForMaskedImageModeling` / `BeitForImageClassification` <-> mmjax `BEiT` (both directions;
the mmjax head picks the transformers class: a visual-token head or a classifier).

BEiT's key projection has no bias (timm stores `q_bias` / `v_bias` beside a fused qkv weight;
transformers gives `k_proj` no bias). Relative position bias tables map as they are (mmjax
builds the same index, checked in tests/models/test_beit.py); index buffers are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from mmjax import pretrained, warm_start
from mmjax.convert.engine import (
    HEADS_BIAS,
    HEADS_IN,
    ConversionError,
    Plan,
    Rule,
    Table,
    conv,
    heads_in,
    heads_out,
    linear,
    norm,
    rule,
)
from mmjax.convert.vit import hf_activation, hf_activation_name
from mmjax.models import vit
from mmjax.pretrained import input_spec

BEIT = "mmjax.models.beit.BEiT"

# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------

TIMM_SIZES = {"base": "B", "large": "L"}
TIMM_NAME = re.compile(r"beit(?:v2)?_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<res>\d+)")

TIMM_TABLE = Table((
    *conv("patch_embed.proj", "embedding/conv"),
    rule("cls_token", "cls"),
    rule("pos_embed", "posemb/pos_embedding"),
    rule("rel_pos_bias.relative_position_bias_table", "rel_pos_bias/table"),
    *norm("blocks.{i}.norm1", "encoder/layer_{i}/ln1"),
    rule("blocks.{i}.attn.qkv.weight", [f"encoder/layer_{{i}}/attn/{n}/kernel" for n in ("query", "key", "value")],
         HEADS_IN),
    rule("blocks.{i}.attn.q_bias", "encoder/layer_{i}/attn/query/bias", HEADS_BIAS),
    rule("blocks.{i}.attn.v_bias", "encoder/layer_{i}/attn/value/bias", HEADS_BIAS),
    rule("blocks.{i}.attn.relative_position_bias_table", "encoder/layer_{i}/rel_pos_bias/table"),
    *heads_out("blocks.{i}.attn.proj", "encoder/layer_{i}/attn/out"),
    rule("blocks.{i}.gamma_1", "encoder/layer_{i}/ls1"),
    *norm("blocks.{i}.norm2", "encoder/layer_{i}/ln2"),
    *linear("blocks.{i}.mlp.fc1", "encoder/layer_{i}/mlp/fc1"),
    *linear("blocks.{i}.mlp.fc2", "encoder/layer_{i}/mlp/fc2"),
    rule("blocks.{i}.gamma_2", "encoder/layer_{i}/ls2"),
    *norm("fc_norm", "norm"),
    *linear("head", "head"),
), ignore=(r".*relative_position_index", r".*k_bias"))


def timm_architecture(name: str) -> tuple[dict, int]:
    """(BEiT fields, image size) of a timm BEiT name such as beit_base_patch16_224 (a ".tag" is dropped)."""
    m = TIMM_NAME.fullmatch(name.split(".")[0])
    if m is None or m["size"] not in TIMM_SIZES:
        raise ConversionError(f"Unknown or unsupported timm BEiT {name!r}. Supported: beit[v2]_<size>_patch<P>_<res> "
                              f"with size in {list(TIMM_SIZES)}, e.g. beit_base_patch16_224")
    fields = dict(vit.parse_variant(f"{TIMM_SIZES[m['size']]}/{m['patch']}"), ln_eps=1e-6)
    return fields, int(m["res"])


def from_timm(name: str, state: dict[str, np.ndarray]) -> Plan:
    fields, size = timm_architecture(name)
    if "head.weight" not in state or "fc_norm.weight" not in state:
        raise ConversionError(f"timm {name}: only classifiers with mean pooling (fc_norm and head) are supported; "
                              "this checkpoint lacks fc_norm.weight or head.weight")
    shared = "rel_pos_bias.relative_position_bias_table" in state
    per_layer = "blocks.0.attn.relative_position_bias_table" in state
    fields.update(num_classes=int(state["head.weight"].shape[0]), abs_posemb="pos_embed" in state,
                  rel_pos="shared" if shared else "layer" if per_layer else "none",
                  layer_scale=0.1 if "blocks.0.gamma_1" in state else None)
    return Plan(BEIT, fields, [input_spec((1, size, size, 3))], TIMM_TABLE, {"library": "timm", "model": name})


def timm_export(config: dict) -> tuple[Table, None]:
    """The table that writes this model directory for timm's Beit (a classifier with mean pooling)."""
    fields = config["fields"]
    if not fields.get("num_classes") or fields.get("use_mask_token"):
        raise ConversionError("This model cannot be written as a timm checkpoint: timm's Beit is a classifier "
                              "(num_classes set) without a mask token")
    return TIMM_TABLE, None


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

HF_ARCHITECTURES = ("BeitForMaskedImageModeling", "BeitForImageClassification")


def _hf_block(p: str, dst: str, **kw) -> list[Rule]:
    """The norms and layer scales of one BEiT layer under the torch prefix `p` (same in 4.x and 5.x)."""
    return [
        *norm(f"{p}.layernorm_before", f"{dst}/ln1", **kw),
        rule(f"{p}.lambda_1", f"{dst}/ls1", **kw),
        *norm(f"{p}.layernorm_after", f"{dst}/ln2", **kw),
        rule(f"{p}.lambda_2", f"{dst}/ls2", **kw),
    ]


def _hf_table(head: str, final_norm: str) -> Table:
    new, old, dst = "beit.layers.{i}", "beit.encoder.layer.{i}", "encoder/layer_{i}"
    legacy = {"export": False}
    return Table((
        *conv("beit.embeddings.patch_embeddings.projection", "embedding/conv"),
        rule("beit.embeddings.cls_token", "cls"),
        rule("beit.embeddings.mask_token", "mask_token"),
        rule("beit.embeddings.position_embeddings", "posemb/pos_embedding"),
        rule("beit.shared_position_bias.relative_position_bias_table", "rel_pos_bias/table"),
        *_hf_block(new, dst),
        *heads_in(f"{new}.attention.q_proj", f"{dst}/attn/query"),
        rule(f"{new}.attention.k_proj.weight", f"{dst}/attn/key/kernel", HEADS_IN),
        *heads_in(f"{new}.attention.v_proj", f"{dst}/attn/value"),
        *heads_out(f"{new}.attention.o_proj", f"{dst}/attn/out"),
        rule(f"{new}.relative_position_bias.relative_position_bias_table", f"{dst}/rel_pos_bias/table"),
        *linear(f"{new}.mlp.fc1", f"{dst}/mlp/fc1"),
        *linear(f"{new}.mlp.fc2", f"{dst}/mlp/fc2"),
        *norm(final_norm, "norm"),
        *linear(head, "head"),
        # transformers 4.x spellings, read only
        rule("beit.encoder.relative_position_bias.relative_position_bias_table", "rel_pos_bias/table", **legacy),
        *_hf_block(old, dst, **legacy),
        *heads_in(f"{old}.attention.attention.query", f"{dst}/attn/query", **legacy),
        rule(f"{old}.attention.attention.key.weight", f"{dst}/attn/key/kernel", HEADS_IN, **legacy),
        *heads_in(f"{old}.attention.attention.value", f"{dst}/attn/value", **legacy),
        *heads_out(f"{old}.attention.output.dense", f"{dst}/attn/out", **legacy),
        rule(f"{old}.attention.attention.relative_position_bias.relative_position_bias_table",
             f"{dst}/rel_pos_bias/table", **legacy),
        *linear(f"{old}.intermediate.dense", f"{dst}/mlp/fc1", **legacy),
        *linear(f"{old}.output.dense", f"{dst}/mlp/fc2", **legacy),
    ), ignore=(r".*relative_position_index", r".*position_ids"))


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    arch = (config.get("architectures") or [""])[0]
    get = config.get
    if not get("use_mean_pooling", True):
        raise ConversionError("BEiT with use_mean_pooling=False is not supported (mmjax BEiT mean-pools patches)")
    if get("use_shared_relative_position_bias") and get("use_relative_position_bias"):
        raise ConversionError("BEiT with both shared and per-layer relative position bias is not supported")
    layer_scale = get("layer_scale_init_value", 0.1)
    fields = {"width": get("hidden_size", 768), "depth": get("num_hidden_layers", 12),
              "num_heads": get("num_attention_heads", 12), "mlp_dim": get("intermediate_size", 3072),
              "patch_size": get("patch_size", 16), "in_channels": get("num_channels", 3),
              "layer_scale": layer_scale if layer_scale and layer_scale > 0 else None,
              "rel_pos": ("shared" if get("use_shared_relative_position_bias")
                          else "layer" if get("use_relative_position_bias") else "none"),
              "abs_posemb": bool(get("use_absolute_position_embeddings", False)),
              "act": hf_activation(get("hidden_act", "gelu")), "ln_eps": get("layer_norm_eps", 1e-12)}
    if arch == "BeitForMaskedImageModeling":
        fields.update(vocab_size=get("vocab_size", 8192), use_mask_token=True)
        table = _hf_table("lm_head", "layernorm")
    else:
        head = state.get("classifier.weight")
        fields.update(num_classes=int(head.shape[0]) if head is not None else len(get("id2label") or {0: 0, 1: 1}),
                      use_mask_token="beit.embeddings.mask_token" in state)
        table = _hf_table("classifier", "beit.pooler.layernorm")
    size = get("image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return Plan(BEIT, fields, [input_spec((1, *size, fields["in_channels"]))], table,
                {"library": "hf", "architecture": arch, "config": config})


def hf_export(config: dict) -> tuple[Table, dict]:
    """BeitForMaskedImageModeling (a visual-token head) or BeitForImageClassification (a classifier):
    the table and a config.json that describes the model."""
    fields, source = config["fields"], config["source"]
    module = pretrained.build(config["class"], fields)
    arch = module.arch()
    if module.vocab_size is not None:
        name, table = "BeitForMaskedImageModeling", _hf_table("lm_head", "layernorm")
        head = {"vocab_size": module.vocab_size}
    elif module.num_classes:
        name, table = "BeitForImageClassification", _hf_table("classifier", "beit.pooler.layernorm")
        labels = (source.get("config") or {}).get("id2label") or {}
        if len(labels) != module.num_classes:
            labels = {str(i): f"LABEL_{i}" for i in range(module.num_classes)}
        head = {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}
    else:
        raise ConversionError("This BEiT cannot be written as a Hugging Face checkpoint: it has no head (set "
                              "vocab_size for BeitForMaskedImageModeling or num_classes for "
                              "BeitForImageClassification)")
    patch = arch["patch_size"]
    if patch[0] != patch[1]:
        raise ConversionError(f"This BEiT cannot be written as a Hugging Face checkpoint: its patches are "
                              f"{patch[0]}x{patch[1]}, and transformers' BEiT takes square patches only")
    height, width = config["inputs"][0]["shape"][1:3]
    use_mask_token = module.vocab_size is not None if module.use_mask_token is None else module.use_mask_token
    generated = {
        "architectures": [name], "model_type": "beit", "hidden_size": arch["width"],
        "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
        "intermediate_size": arch["mlp_dim"], "hidden_act": hf_activation_name(module.act),
        "layer_norm_eps": module.ln_eps, "image_size": height if height == width else [height, width],
        "patch_size": patch[0], "num_channels": module.in_channels, "use_mask_token": use_mask_token,
        "use_absolute_position_embeddings": module.abs_posemb,
        "use_relative_position_bias": module.rel_pos == "layer",
        "use_shared_relative_position_bias": module.rel_pos == "shared",
        "layer_scale_init_value": module.layer_scale or 0.0, "use_mean_pooling": True,
        "hidden_dropout_prob": module.dropout, "drop_path_rate": getattr(module, "drop_path", 0.0), **head}
    # A transformers source keeps its other settings; the architecture is the model's.
    base = source.get("config", {}) if source.get("library") == "hf" else {}
    return table, {**{k: v for k, v in base.items() if k not in ("id2label", "label2id")}, **generated}


# ---------------------------------------------------------------------------------------------
# Warm start (`config.init.preset`): a BEiT pretraining run or model directory -> a classifier
# ---------------------------------------------------------------------------------------------

def beit_to_classifier(model: Mapping, source: Sequence[str]) -> warm_start.InitRules:
    """BEiT pretraining (a `beit` run: {"beit", "tokenizer"}, or a BEiT model directory) →
    `beit_classification`, as BEiT's run_class_finetuning.py: copy the backbone, give every
    layer of a per-layer relative position bias the shared table, start `norm` (here on the
    pooled vector) and `head` fresh; drop the mask token, the visual-token head and the dVAE."""
    prefix = "beit/" if any(p.startswith("beit/") for p in source) else ""
    rules = []
    if f"{prefix}rel_pos_bias/table" in source:
        rules.append((r"encoder/layer_\d+/rel_pos_bias/table", f"{prefix}rel_pos_bias/table"))
    if prefix:
        rules.append(("(.*)", prefix + r"\1"))
    return warm_start.InitRules(tuple(rules), fresh=("norm/.*", "head/.*"),
                     drop=("tokenizer/.*", f"{prefix}mask_token", f"{prefix}norm/.*", f"{prefix}head/.*"))


warm_start.register_preset("beit_to_classifier", beit_to_classifier)
