"""ViT tables: timm `VisionTransformer` and Hugging Face `ViTModel` / `ViTForImageClassification`.

timm model names give the architecture (`vit_{size}_patch{P}[_clip][_quickgelu]_{res}`); the
class count comes from the checkpoint's head. The pooling (timm's `global_pool`, `fc_norm`) is not
in a state dict's key names (global_pool="avg", fc_norm=False has token pooling's keys; "max" has
"avg"'s), so it comes from the `timm.create_model` arguments the checkpoint was made with
(`timm_model_args`: explicit, or a timm config beside the checkpoint), else from the name's default
(global_pool="token"), checked against the keys the checkpoint carries. Hugging Face folders give
it in config.json.
"""

from __future__ import annotations

import re

import numpy as np

from mmjax.convert.engine import (
    HEADS_BIAS,
    HEADS_IN,
    ConversionError,
    Plan,
    Table,
    attention,
    conv,
    fused_qkv,
    heads_in,
    heads_out,
    linear,
    norm,
    require,
    rule,
)
from mmjax.convert.export import Export
from mmjax.models import vit
from mmjax.pretrained import input_spec

VIT = "mmjax.models.vit.ViT"

# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------

TIMM_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g", "gigantic": "G"}
TIMM_NAME = re.compile(
    r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)(?P<clip>_clip)?(?P<quickgelu>_quickgelu)?_(?P<res>\d+)")

TIMM_TABLE = Table((
    *conv("patch_embed.proj", "embedding/conv"),
    rule("cls_token", "cls"),
    rule("reg_token", "registers"),
    rule("pos_embed", "posemb/pos_embedding"),
    *norm("norm_pre", "ln_pre"),
    *norm("blocks.{i}.norm1", "encoder/layer_{i}/ln1"),
    *fused_qkv("blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.qkv.bias", "encoder/layer_{i}/attn"),
    *heads_out("blocks.{i}.attn.proj", "encoder/layer_{i}/attn/out"),
    rule("blocks.{i}.ls1.gamma", "encoder/layer_{i}/ls1"),
    *norm("blocks.{i}.norm2", "encoder/layer_{i}/ln2"),
    *linear("blocks.{i}.mlp.fc1", "encoder/layer_{i}/mlp/fc1"),
    *linear("blocks.{i}.mlp.fc2", "encoder/layer_{i}/mlp/fc2"),
    rule("blocks.{i}.ls2.gamma", "encoder/layer_{i}/ls2"),
    *norm("norm", "norm"),
    *norm("fc_norm", "norm", export=False),     # global_pool="avg" (MAE fine-tuning): norm after pooling
    # global_pool="map": timm's AttentionPoolLatent (one latent query, fused k|v) = mmjax's MAPHead
    rule("attn_pool.latent", "map/probe"),
    *heads_in("attn_pool.q", "map/attn/query"),
    rule("attn_pool.kv.weight", ["map/attn/key/kernel", "map/attn/value/kernel"], HEADS_IN),
    rule("attn_pool.kv.bias", ["map/attn/key/bias", "map/attn/value/bias"], HEADS_BIAS),
    *heads_out("attn_pool.proj", "map/attn/out"),
    *norm("attn_pool.norm", "map/ln"),
    *linear("attn_pool.mlp.fc1", "map/mlp/fc1"),
    *linear("attn_pool.mlp.fc2", "map/mlp/fc2"),
    *linear("head", "head"),
))

# timm's mean pooling with fc_norm (its register ViTs' global_pool="avg"): mmjax's `norm` written as fc_norm
TIMM_FC_NORM_TABLE = Table((
    *[r for r in TIMM_TABLE.rules if not r.torch_key.startswith(("norm.", "fc_norm."))],
    *norm("fc_norm", "norm"),
))

# EVA-CLIP's ViT-g/14 (BLIP-2's vision tower) as timm builds it: a ViT with q and v biases, no k bias
EVA_NAMES = ("eva_giant_patch14_clip_224",)
EVA_TABLE = Table((
    *[r for r in TIMM_TABLE.rules if ".attn.qkv." not in r.torch_key],
    rule("blocks.{i}.attn.qkv.weight", [f"encoder/layer_{{i}}/attn/{n}/kernel" for n in ("query", "key", "value")],
         HEADS_IN),
    rule("blocks.{i}.attn.q_bias", "encoder/layer_{i}/attn/query/bias", HEADS_BIAS),
    rule("blocks.{i}.attn.v_bias", "encoder/layer_{i}/attn/value/bias", HEADS_BIAS),
))

# Register ViTs (Darcet et al. 2024) and DINOv2 (Oquab et al. 2023). DINOv2 names: patch 14 at 518 px,
# layer scale; with registers their position embedding skips the prefix tokens (no_embed_class=True),
# without them it covers the class token. vit_*_reg*_gap_*: no class token, mean pooling, no_embed_class.
TIMM_DINOV2_NAME = re.compile(r"vit_(?P<size>small|base|large)_patch14(?:_reg(?P<reg>\d+))?_dinov2")
TIMM_REGISTER_NAME = re.compile(r"vit_(?P<size>base|medium)_patch16_reg(?P<reg>\d+)_gap_(?P<res>\d+)")
TIMM_REGISTER_SIZES = {"small": "S", "base": "B", "medium": "M", "large": "L"}
TIMM_LAYER_SCALE = {"base": None, "medium": 1e-5}     # timm's init_values of the vit_*_reg*_gap_* sizes
DINOV2_LAYER_SCALE = 1e-5

# timm global_pool -> mmjax ViT pool; "max", "avgmax" and "prr" have no mmjax counterpart.
TIMM_POOLS = {"token": "cls", "avg": "gap", "map": "map", "": "none"}
TIMM_POOL_ARGS = ("global_pool", "fc_norm", "class_token", "pool_include_prefix")


def timm_register_architecture(name: str) -> tuple[dict, int] | None:
    """(ViT fields, image size) of a timm DINOv2 or register ViT name (".tag" dropped); None for others."""
    base = name.split(".")[0]
    dinov2, gap = TIMM_DINOV2_NAME.fullmatch(base), TIMM_REGISTER_NAME.fullmatch(base)
    m = dinov2 or gap
    if m is None:
        return None
    registers = int(m["reg"] or 0)
    fields = dict(vit.parse_variant(f"{TIMM_REGISTER_SIZES[m['size']]}/{14 if dinov2 else 16}"), posemb="learn",
                  num_registers=registers, prefix_posemb="none" if registers else "all", ln_eps=1e-6, act="gelu")
    if dinov2:
        return dict(fields, pool="cls", layer_scale=DINOV2_LAYER_SCALE), 518
    return dict(fields, pool="gap", class_token=False, layer_scale=TIMM_LAYER_SCALE[m["size"]]), int(m["res"])


def timm_name_pooling(name: str) -> dict:
    """The timm.create_model pooling arguments a name builds with, when not timm's defaults."""
    if TIMM_REGISTER_NAME.fullmatch(name.split(".")[0]):
        return {"global_pool": "avg", "class_token": False}
    return {}


def timm_architecture(name: str) -> tuple[dict, int]:
    """(ViT fields, image size) of a timm ViT name such as vit_base_patch16_224 (a ".tag" is dropped),
    a DINOv2 or register ViT (vit_small_patch14_reg4_dinov2, vit_base_patch16_reg4_gap_256), or
    EVA-CLIP's eva_giant_patch14_clip_224."""
    registered = timm_register_architecture(name)
    if registered is not None:
        return registered
    if name.split(".")[0] in EVA_NAMES:
        return dict(vit.parse_variant("g/14"), pool="cls", posemb="learn", ln_eps=1e-6, act="gelu", qkv_bias="qv"), 224
    m = TIMM_NAME.fullmatch(name.split(".")[0])
    if m is None or m["size"] not in TIMM_SIZES:
        raise ConversionError(
            f"Unknown or unsupported timm model {name!r}. Supported: the plain timm ViTs named "
            f"vit_<size>_patch<P>[_clip][_quickgelu]_<res> with size in {list(TIMM_SIZES)}, "
            f"e.g. vit_base_patch16_224, vit_large_patch14_clip_224; DINOv2 (vit_<small|base|large>_patch14"
            f"[_reg<N>]_dinov2); register ViTs vit_<base|medium>_patch16_reg<N>_gap_<res>; and {', '.join(EVA_NAMES)}")
    clip = bool(m["clip"])
    fields = dict(vit.parse_variant(f"{TIMM_SIZES[m['size']]}/{m['patch']}"), pool="cls", posemb="learn",
                  pre_norm=clip, patch_bias=not clip, ln_eps=1e-5 if clip else 1e-6,
                  act="quick_gelu" if m["quickgelu"] else "gelu")
    return fields, int(m["res"])


def timm_pooling(name: str, state: dict[str, np.ndarray], model_args: dict | None = None) -> dict:
    """The ViT fields (pool, class_token, fc_norm) of a timm ViT's pooling.

    `model_args`: the timm.create_model arguments the checkpoint was made with (only global_pool,
    fc_norm, class_token and pool_include_prefix are read); None: the name's default global_pool="token", or "map"
    when the checkpoint holds an attention pool. Raises when the pooling cannot be determined,
    contradicts the checkpoint, or has no mmjax counterpart (max, avgmax, prr).
    """
    args = dict(model_args or {})
    has_norm, has_fc_norm = "norm.weight" in state, "fc_norm.weight" in state
    has_map, has_cls = "attn_pool.latent" in state, "cls_token" in state
    where = f"timm {name}"
    if "global_pool" not in args:
        if has_map:
            args["global_pool"] = "map"     # only global_pool="map" builds timm's attn_pool
        elif has_fc_norm and not has_norm and "fc_norm" not in args:
            raise ConversionError(
                f"{where}: the checkpoint has fc_norm and no final norm, so it pools by global_pool 'avg', "
                "'avgmax' or 'max' (or 'token' with fc_norm=True), and its keys do not say which. Name it: "
                "--model-args '{\"global_pool\": \"avg\"}' (api: timm_model_args=...), or put timm's config.json "
                "(with global_pool) beside the checkpoint")
        else:
            args["global_pool"] = "token"   # the default of every name timm_architecture knows
    pool = args["global_pool"]
    if not isinstance(pool, str) or pool not in TIMM_POOLS:
        raise ConversionError(
            f"{where}: global_pool={pool!r} has no mmjax ViT counterpart; supported: "
            f"{sorted(TIMM_POOLS)} (mmjax pools by class token, mean, attention probe or not at all; "
            "max and avg+max pooling are not implemented)")
    fc_norm = args.get("fc_norm")
    fc_norm = pool in ("avg", "avgmax", "max") if fc_norm is None else bool(fc_norm)   # timm's rule
    if fc_norm != (has_fc_norm and not has_norm):
        raise ConversionError(
            f"{where}: global_pool={pool!r} with fc_norm={fc_norm} needs {'fc_norm' if fc_norm else 'norm'} "
            f"weights, but the checkpoint has {'fc_norm' if has_fc_norm else 'norm' if has_norm else 'neither'}; "
            "the model arguments do not match the checkpoint")
    if (pool == "map") != has_map:
        raise ConversionError(f"{where}: global_pool={pool!r} does not match the checkpoint, which "
                              f"{'has' if has_map else 'lacks'} attn_pool weights")
    # timm pools ("avg", "map") over the patch tokens only unless pool_include_prefix; mmjax's "gap"
    # skips the class token, its attention probe ("map") attends over every token.
    include_prefix = bool(args.get("pool_include_prefix", False))
    if has_cls and pool == "map" and not include_prefix:
        raise ConversionError(f"{where}: global_pool='map' with a class token attends over the patch tokens "
                              "only (pool_include_prefix=False); mmjax's attention pool attends over every "
                              "token, the class token included")
    if "reg_token" in state and pool in ("avg", "map") and include_prefix:
        raise ConversionError(f"{where}: global_pool={pool!r} with pool_include_prefix=True pools the register "
                              "tokens too; mmjax pools without the registers, as timm does by default")
    if has_cls and pool == "avg" and include_prefix:
        raise ConversionError(f"{where}: global_pool='avg' with pool_include_prefix=True averages the class "
                              "token too; mmjax's mean pool averages the patch tokens only")
    if "class_token" in args and bool(args["class_token"]) != has_cls:
        raise ConversionError(f"{where}: class_token={args['class_token']} does not match the checkpoint, "
                              f"which {'has' if has_cls else 'lacks'} cls_token")
    if pool == "token" and not has_cls:
        raise ConversionError(f"{where}: global_pool='token' needs a class token; the checkpoint has no cls_token")
    if pool == "" and "head.weight" in state:
        raise ConversionError(f"{where}: global_pool='' with a head applies the head to every token; "
                              "mmjax's pool='none' returns the tokens without a head (num_classes=0 only)")
    # Without pooling, fc_norm norms every token: the same as the final norm.
    fields = {"pool": TIMM_POOLS[pool], "fc_norm": fc_norm and pool != ""}
    if pool != "token":
        fields["class_token"] = has_cls
    return fields


def from_timm(name: str, state: dict[str, np.ndarray], model_args: dict | None = None) -> Plan:
    fields, size = timm_architecture(name)
    head = state.get("head.weight")
    fields["num_classes"] = int(head.shape[0]) if head is not None else None
    fields.update(timm_pooling(name, state, {**timm_name_pooling(name), **(model_args or {})}))
    source = {"library": "timm", "model": name}
    if model_args:
        source["model_args"] = {k: model_args[k] for k in TIMM_POOL_ARGS if k in model_args}
    table = EVA_TABLE if fields.get("qkv_bias") == "qv" else TIMM_TABLE
    return Plan(VIT, fields, [input_spec((1, size, size, 3))], table, source)


def timm_export(config: dict) -> tuple[Table, None]:
    """The table that writes this model directory (model_config.json as `config`) for timm. Register
    ViTs may also pool by mean (timm's global_pool="avg" with fc_norm, as its reg*_gap names)."""
    fields = config["fields"]
    require(fields, "timm", posemb="learn", representation_size=None, conv_stem=[])
    if fields.get("num_registers"):
        if fields.get("prefix_posemb", "all") == "cls":
            raise ConversionError("This model cannot be written as a timm checkpoint: timm's position embedding "
                                  "covers all prefix tokens or none, this model's the class token only "
                                  "(prefix_posemb='cls', as transformers' Dinov2WithRegisters)")
        pooling = {"pool": "gap", "fc_norm": True} if fields.get("pool") == "gap" else {"pool": "cls", "fc_norm": False}
        require(fields, "timm", **pooling)
    else:
        require(fields, "timm", pool="cls", fc_norm=False)
    if fields.get("fc_norm"):
        return TIMM_FC_NORM_TABLE, None
    return (EVA_TABLE if config["fields"].get("qkv_bias") == "qv" else TIMM_TABLE), None


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
HF_VIT_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")


def _hf_vit_table(p: str) -> Table:
    """`p` is "vit." inside ViTForImageClassification, "" for a bare ViTModel.

    transformers 5 names (layers.{i}.attention.q_proj, mlp.fc1) are written; the 4.x names
    (encoder.layer.{i}.attention.attention.query, intermediate.dense) are read too.
    """
    new, old = f"{p}layers.{{i}}", f"{p}encoder.layer.{{i}}"
    dst = "encoder/layer_{i}"
    return Table((
        *conv(f"{p}embeddings.patch_embeddings.projection", "embedding/conv"),
        rule(f"{p}embeddings.cls_token", "cls"),
        rule(f"{p}embeddings.position_embeddings", "posemb/pos_embedding"),
        *norm(f"{new}.layernorm_before", f"{dst}/ln1"),
        *attention(*(f"{new}.attention.{n}_proj" for n in "qkvo"), f"{dst}/attn"),
        *norm(f"{new}.layernorm_after", f"{dst}/ln2"),
        *linear(f"{new}.mlp.fc1", f"{dst}/mlp/fc1"),
        *linear(f"{new}.mlp.fc2", f"{dst}/mlp/fc2"),
        *norm(f"{p}layernorm", "norm"),
        *linear("pooler.dense", "pre_logits"),
        *linear("classifier", "head"),
        # transformers 4.x spellings, read only
        *norm(f"{old}.layernorm_before", f"{dst}/ln1", export=False),
        *heads_in(f"{old}.attention.attention.query", f"{dst}/attn/query", export=False),
        *heads_in(f"{old}.attention.attention.key", f"{dst}/attn/key", export=False),
        *heads_in(f"{old}.attention.attention.value", f"{dst}/attn/value", export=False),
        *heads_out(f"{old}.attention.output.dense", f"{dst}/attn/out", export=False),
        *norm(f"{old}.layernorm_after", f"{dst}/ln2", export=False),
        *linear(f"{old}.intermediate.dense", f"{dst}/mlp/fc1", export=False),
        *linear(f"{old}.output.dense", f"{dst}/mlp/fc2", export=False),
    ), ignore=(r".*position_ids",))


def hf_activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"Unsupported hidden_act {name!r}; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def hf_activation_name(act: str) -> str:
    """The transformers `hidden_act` of an mmjax activation (the inverse of hf_activation)."""
    names = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
             "silu": "silu"}
    if act not in names:
        raise ConversionError(f"Activation {act!r} has no transformers hidden_act; supported: {sorted(names)}")
    return names[act]


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    arch = (config.get("architectures") or ["ViTModel"])[0]
    get = config.get
    if not get("qkv_bias", True):
        raise ConversionError("ViT with qkv_bias=False is not supported "
                              "(mmjax attention biases q/k/v and out together)")
    fields = {"width": get("hidden_size", 768), "depth": get("num_hidden_layers", 12),
              "num_heads": get("num_attention_heads", 12), "mlp_dim": get("intermediate_size", 3072),
              "patch_size": get("patch_size", 16), "in_channels": get("num_channels", 3), "pool": "cls",
              "posemb": "learn", "act": hf_activation(get("hidden_act", "gelu")),
              "ln_eps": get("layer_norm_eps", 1e-12)}
    if arch == "ViTForImageClassification":
        head = state.get("classifier.weight")
        fields["num_classes"] = int(head.shape[0]) if head is not None else len(get("id2label") or {0: 0, 1: 1})
        prefix = "vit."
    else:
        prefix = ""
        if "pooler.dense.weight" in state:
            if get("pooler_act", "tanh") != "tanh":
                raise ConversionError(f"ViT pooler activation {get('pooler_act')!r} is not supported (tanh only)")
            fields["representation_size"] = get("pooler_output_size") or fields["width"]
    size = get("image_size", 224)
    return Plan(VIT, fields, [input_spec((1, size, size, fields["in_channels"]))], _hf_vit_table(prefix),
                {"library": "hf", "architecture": arch, "config": config})


def hf_export(config: dict) -> tuple[Table, dict] | Export:
    """The table and config.json that write this model directory for transformers (ViT or DINOv2)."""
    fields, source = config["fields"], config["source"]
    if is_hf_dinov2(fields, source):
        return dinov2_hf_export(config)
    require(fields, "Hugging Face ViT", pool="cls", posemb="learn", pre_norm=False, fc_norm=False,
            patch_bias=True, qkv_bias=True, layer_scale=None, conv_stem=[], prefix_posemb="all")
    image_size = config["inputs"][0]["shape"][1]
    if source.get("library") == "hf":
        hf_config = source["config"]
    else:
        arch = vit.ViT(**{k: v for k, v in fields.items() if k in ("variant", "width", "depth", "mlp_dim",
                                                                     "num_heads", "patch_size")}).arch()
        act = hf_activation_name(fields.get("act", "gelu"))
        classes = fields.get("num_classes")
        hf_config = {
            "architectures": ["ViTForImageClassification" if classes else "ViTModel"], "model_type": "vit",
            "hidden_size": arch["width"], "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
            "intermediate_size": arch["mlp_dim"], "hidden_act": act, "layer_norm_eps": fields.get("ln_eps", 1e-6),
            "image_size": image_size, "patch_size": arch["patch_size"][0],
            "num_channels": fields.get("in_channels", 3), "qkv_bias": True,
            "pooler_output_size": fields.get("representation_size") or arch["width"], "pooler_act": "tanh"}
        if classes:
            hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(classes)}
            hf_config["label2id"] = {f"LABEL_{i}": i for i in range(classes)}
    classifier = (hf_config.get("architectures") or ["ViTModel"])[0] == "ViTForImageClassification"
    if classifier != bool(fields.get("num_classes")):
        raise ConversionError("The model's head does not match the Hugging Face architecture in its source config")
    return _hf_vit_table("vit." if classifier else ""), hf_config



# ---------------------------------------------------------------------------------------------
# Hugging Face transformers DINOv2: Dinov2Model, Dinov2WithRegistersModel
# ---------------------------------------------------------------------------------------------

HF_DINOV2_ARCHITECTURES = ("Dinov2Model", "Dinov2WithRegistersModel")
HF_DINOV2_MODEL_TYPES = {"Dinov2Model": "dinov2", "Dinov2WithRegistersModel": "dinov2_with_registers"}
# transformers' mask token (the input of masked patches in DINOv2's training) has no mmjax counterpart.
HF_MASK_TOKEN = "embeddings.mask_token"


def _hf_dinov2_table() -> Table:
    """transformers 5 names are written; the 4.x attention names are read too."""
    layer, dst = "encoder.layer.{i}", "encoder/layer_{i}"
    return Table((
        *conv("embeddings.patch_embeddings.projection", "embedding/conv"),
        rule("embeddings.cls_token", "cls"),
        rule("embeddings.register_tokens", "registers"),
        rule("embeddings.position_embeddings", "posemb/pos_embedding"),
        *norm(f"{layer}.norm1", f"{dst}/ln1"),
        *attention(*(f"{layer}.attention.{n}_proj" for n in "qkvo"), f"{dst}/attn"),
        rule(f"{layer}.layer_scale1.lambda1", f"{dst}/ls1"),
        *norm(f"{layer}.norm2", f"{dst}/ln2"),
        *linear(f"{layer}.mlp.fc1", f"{dst}/mlp/fc1"),
        *linear(f"{layer}.mlp.fc2", f"{dst}/mlp/fc2"),
        rule(f"{layer}.layer_scale2.lambda1", f"{dst}/ls2"),
        *norm("layernorm", "norm"),
        *heads_in(f"{layer}.attention.attention.query", f"{dst}/attn/query", export=False),
        *heads_in(f"{layer}.attention.attention.key", f"{dst}/attn/key", export=False),
        *heads_in(f"{layer}.attention.attention.value", f"{dst}/attn/value", export=False),
        *heads_out(f"{layer}.attention.output.dense", f"{dst}/attn/out", export=False),
    ), ignore=(re.escape(HF_MASK_TOKEN),))


def from_hf_dinov2(config: dict, state: dict[str, np.ndarray]) -> Plan:
    """A transformers Dinov2Model / Dinov2WithRegistersModel: pooled = the normed class token, as
    its pooler_output. Its MLP width is hidden_size * mlp_ratio (intermediate_size is unused)."""
    arch = (config.get("architectures") or ["Dinov2Model"])[0]
    get = config.get
    if get("use_swiglu_ffn", False):
        raise ConversionError(f"{arch} with use_swiglu_ffn=True (DINOv2 giant) is not supported: mmjax's ViT "
                              "has no fused SwiGLU feed-forward of transformers' layout")
    if not get("qkv_bias", True):
        raise ConversionError(f"{arch} with qkv_bias=False is not supported (mmjax biases q/k/v and out together)")
    width = get("hidden_size", 768)
    fields = {"width": width, "depth": get("num_hidden_layers", 12), "num_heads": get("num_attention_heads", 12),
              "mlp_dim": int(width * get("mlp_ratio", 4)), "patch_size": get("patch_size", 14),
              "in_channels": get("num_channels", 3), "pool": "cls", "posemb": "learn",
              "act": hf_activation(get("hidden_act", "gelu")), "ln_eps": get("layer_norm_eps", 1e-6),
              "layer_scale": get("layerscale_value", 1.0)}
    if arch == "Dinov2WithRegistersModel":     # the class token has a position embedding, registers not
        fields.update(num_registers=get("num_register_tokens", 4), prefix_posemb="cls")
    size = get("image_size", 224)      # transformers' Dinov2Config default
    return Plan(VIT, fields, [input_spec((1, size, size, fields["in_channels"]))], _hf_dinov2_table(),
                {"library": "hf", "architecture": arch, "config": config})


def is_hf_dinov2(fields: dict, source: dict) -> bool:
    """A ViT that transformers holds as DINOv2: one with layer scale or registers, or read from one."""
    from_dinov2 = source.get("library") == "hf" and source.get("architecture") in HF_DINOV2_ARCHITECTURES
    return from_dinov2 or fields.get("layer_scale") is not None or bool(fields.get("num_registers"))


def dinov2_hf_export(config: dict) -> Export:
    """The table, config.json and zero mask token that write this model directory for transformers'
    Dinov2Model (Dinov2WithRegistersModel with registers)."""
    fields, source = config["fields"], config["source"]
    arch_name = "Dinov2WithRegistersModel" if fields.get("num_registers") else "Dinov2Model"
    target = f"Hugging Face {arch_name}"
    require(fields, target, pool="cls", posemb="learn", pre_norm=False, fc_norm=False, patch_bias=True,
            qkv_bias=True, conv_stem=[], representation_size=None, num_classes=None, block=None,
            prefix_posemb="cls" if fields.get("num_registers") else "all")
    if fields.get("layer_scale") is None:
        raise ConversionError(f"This model cannot be written as a {target} checkpoint: it has no layer scale")
    arch = vit.ViT(**{k: v for k, v in fields.items() if k in ("variant", *vit.ARCH_FIELDS)}).arch()
    if source.get("library") == "hf" and source.get("architecture") == arch_name:
        hf_config = source["config"]
    else:
        hf_config = {
            "architectures": [arch_name], "model_type": HF_DINOV2_MODEL_TYPES[arch_name],
            "hidden_size": arch["width"], "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
            "mlp_ratio": arch["mlp_dim"] / arch["width"], "hidden_act": hf_activation_name(fields.get("act", "gelu")),
            "layer_norm_eps": fields.get("ln_eps", 1e-6), "image_size": config["inputs"][0]["shape"][1],
            "patch_size": arch["patch_size"][0], "num_channels": fields.get("in_channels", 3), "qkv_bias": True,
            "layerscale_value": fields["layer_scale"], "use_swiglu_ffn": False}
        if fields.get("num_registers"):
            hf_config["num_register_tokens"] = fields["num_registers"]
    mask_token = np.zeros((1, arch["width"]), np.float32)
    return Export(_hf_dinov2_table(), hf_config, fixed={HF_MASK_TOKEN: mask_token},
                  notes=(f"{HF_MASK_TOKEN} (transformers' input for masked patches in DINOv2 training) is "
                         "written as zeros: mmjax does not keep it",))
