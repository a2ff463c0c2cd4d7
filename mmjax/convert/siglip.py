"""SigLIP tables (Zhai et al. 2023): Hugging Face `SiglipModel` and timm's `vit_*_siglip_*` towers.

A SigLIP is an mmjax CLIP whose image embedding is the tower's attention-pooled (MAP) output with
no projection, whose text tower is bidirectional and pooled at the last position followed by a
Linear with a bias, and whose logits are exp(logit_scale) * cos + logit_bias with no clip.
timm's `vit_*_siglip_*` image towers are plain ViTs (no class token, MAP or mean pooling) whose
sizes and activations are listed here by name, so no timm is needed to read them.
open_clip's `ViT-*-SigLIP*` models are a timm tower (`visual.trunk.*`, sized by its timm name) and
open_clip's text tower. big_vision's `.npz` SigLIP checkpoints are not read yet.
"""

from __future__ import annotations

import re

import numpy as np

from mmjax.convert import clip, library_configs
from mmjax.convert.clip import _hf_block as hf_encoder_layer
from mmjax.convert.clip import _open_clip_block as open_clip_layer
from mmjax.convert.engine import (
    CONV,
    ConversionError,
    Plan,
    Rule,
    Table,
    Transform,
    drop_leading,
    fused_qkv,
    heads_out,
    linear,
    norm,
    require,
    rule,
)
from mmjax.convert.vit import TIMM_TABLE, VIT, hf_activation, hf_activation_name, timm_pooling
from mmjax.convert.vit import timm_export as vit_timm_table_export
from mmjax.pretrained import input_spec

CLIP = "mmjax.models.clip.CLIP"
HF_ARCHITECTURES = ("SiglipModel",)
# transformers stores SigLIP's temperature and bias as shape (1,) tensors; mmjax as scalars.
SCALAR = Transform("scalar", lambda s: (1,), lambda x, s: x.reshape(s), lambda y: np.reshape(y, (1,)))

# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

HF_SIGLIP_TABLE = Table((
    rule("vision_model.embeddings.patch_embedding.weight", "visual/embedding/conv/kernel", CONV),
    rule("vision_model.embeddings.patch_embedding.bias", "visual/embedding/conv/bias"),
    rule("vision_model.embeddings.position_embedding.weight", "visual/posemb/pos_embedding", drop_leading(1)),
    *hf_encoder_layer("vision_model.encoder.layers.{i}", "visual/encoder/layer_{i}"),
    *norm("vision_model.post_layernorm", "visual/norm"),
    rule("vision_model.head.probe", "visual/map/probe"),
    *fused_qkv("vision_model.head.attention.in_proj_weight", "vision_model.head.attention.in_proj_bias",
               "visual/map/attn"),
    *heads_out("vision_model.head.attention.out_proj", "visual/map/attn/out"),
    *norm("vision_model.head.layernorm", "visual/map/ln"),
    *linear("vision_model.head.mlp.fc1", "visual/map/mlp/fc1"),
    *linear("vision_model.head.mlp.fc2", "visual/map/mlp/fc2"),
    rule("text_model.embeddings.token_embedding.weight", "textual/token_embedding/embedding"),
    rule("text_model.embeddings.position_embedding.weight", "textual/pos_embedding"),
    *hf_encoder_layer("text_model.encoder.layers.{i}", "textual/encoder/layer_{i}"),
    *norm("text_model.final_layer_norm", "textual/ln_final"),
    *linear("text_model.head", "text_proj"),
    rule("logit_scale", "logit_scale", SCALAR),
    rule("logit_bias", "logit_bias", SCALAR),
), ignore=(r".*position_ids",))

# transformers' SiglipTextConfig / SiglipVisionConfig defaults, for keys a config.json may omit.
HF_TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                    "layer_norm_eps": 1e-6}
HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True}
# The CLIP fields every SigLIP has (and that a SiglipModel export requires).
SIGLIP_CLIP_FIELDS = {"image_projection": False, "text_proj_bias": True, "max_logit_scale": None}
SIGLIP_IMAGE_FIELDS = {"pool": "map", "class_token": False, "posemb": "learn", "pre_norm": False,
                       "patch_bias": True, "fc_norm": False}


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    t = {**HF_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    v = {**HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    if not v["vision_use_head"]:
        raise ConversionError("SiglipModel with vision_use_head=False has no image embedding "
                              "(transformers' SiglipModel needs the attention-pooling head)")
    image = {"width": v["hidden_size"], "depth": v["num_hidden_layers"], "num_heads": v["num_attention_heads"],
             "mlp_dim": v["intermediate_size"], "patch_size": v["patch_size"], "in_channels": v["num_channels"],
             **SIGLIP_IMAGE_FIELDS, "ln_eps": v["layer_norm_eps"], "act": hf_activation(v["hidden_act"])}
    text = {"vocab_size": t["vocab_size"], "context_length": t["max_position_embeddings"], "width": t["hidden_size"],
            "depth": t["num_hidden_layers"], "num_heads": t["num_attention_heads"], "mlp_dim": t["intermediate_size"],
            "causal": False, "pool": "last", "act": hf_activation(t["hidden_act"]), "ln_eps": t["layer_norm_eps"]}
    embed_dim = t.get("projection_size", t["hidden_size"])
    if embed_dim != image["width"]:
        raise ConversionError(f"SiglipModel text projection_size {embed_dim} differs from the image width "
                              f"{image['width']}; the image embedding has no projection, so they must match")
    fields = {"embed_dim": embed_dim, "image": image, "text": text, "logit_bias_init": 0.0, **SIGLIP_CLIP_FIELDS}
    size = v["image_size"]
    inputs = [input_spec((1, size, size, v["num_channels"])), input_spec((1, text["context_length"]), "int32")]
    return Plan(CLIP, fields, inputs, HF_SIGLIP_TABLE, {"library": "hf", "architecture": "SiglipModel",
                                                        "config": config})


def is_siglip(fields: dict) -> bool:
    """A CLIP model directory holding a SigLIP (no image projection): CLIP exporters refuse it."""
    return fields.get("image_projection", True) is False


def hf_export(config: dict) -> tuple[Table, dict]:
    """The table and config.json that write this model directory for transformers' SiglipModel."""
    fields, source = config["fields"], config["source"]
    target = "Hugging Face SiglipModel"
    require(fields, target, **SIGLIP_CLIP_FIELDS)
    if fields.get("logit_bias_init") is None:
        raise ConversionError(f"This model cannot be written as a {target} checkpoint: it has no logit_bias")
    image, text = fields["image"], fields["text"]
    require(image, f"{target} (image tower)", **SIGLIP_IMAGE_FIELDS, representation_size=None, layer_scale=None,
            qkv_bias=True, conv_stem=[], block=None, num_classes=None)
    require(text, f"{target} (text tower)", causal=False, pool="last", block=None)
    if source.get("library") == "hf" and source.get("architecture") == "SiglipModel":
        return HF_SIGLIP_TABLE, source["config"]
    patch = image["patch_size"]
    vision_config = {
        "model_type": "siglip_vision_model", "hidden_size": image["width"], "intermediate_size": image["mlp_dim"],
        "num_hidden_layers": image["depth"], "num_attention_heads": image["num_heads"],
        "num_channels": image.get("in_channels", 3), "image_size": config["inputs"][0]["shape"][1],
        "patch_size": patch if isinstance(patch, int) else patch[0],
        "hidden_act": hf_activation_name(image.get("act", "gelu")), "layer_norm_eps": image.get("ln_eps", 1e-6),
        "vision_use_head": True}
    text_config = {
        "model_type": "siglip_text_model", "vocab_size": text["vocab_size"], "hidden_size": text["width"],
        "intermediate_size": text.get("mlp_dim") or 4 * text["width"], "num_hidden_layers": text["depth"],
        "num_attention_heads": text["num_heads"], "max_position_embeddings": text["context_length"],
        "hidden_act": hf_activation_name(text.get("act", "gelu")), "layer_norm_eps": text.get("ln_eps", 1e-5),
        "projection_size": fields["embed_dim"]}
    return HF_SIGLIP_TABLE, {"architectures": ["SiglipModel"], "model_type": "siglip",
                             "text_config": text_config, "vision_config": vision_config}


def clip_hf_export(config: dict) -> tuple[Table, dict]:
    """A CLIP model directory's transformers export: SiglipModel for a SigLIP, else CLIPModel."""
    return (hf_export if is_siglip(config["fields"]) else clip.hf_export)(config)


# ---------------------------------------------------------------------------------------------
# timm image towers
# ---------------------------------------------------------------------------------------------

TIMM_NAME = re.compile(r"vit_(?P<size>[a-z0-9]+)_patch(?P<patch>\d+)_siglip(?P<gap>_gap)?_(?P<res>\d+)")
# size: (width, depth, heads, mlp_dim), as timm's vision_transformer.py builds them
TIMM_SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096), "so400m": (1152, 27, 16, 4304),
              "giantopt": (1536, 40, 16, 6144)}
# timm's SigLIP towers (MAP pooling; "_gap" names pool by mean), and those built with
# act_layer='gelu_tanh' (the others use exact GELU).
TIMM_MODELS = {
    *(f"vit_base_patch16_siglip{g}_{r}" for g in ("", "_gap") for r in (224, 256, 384, 512)),
    *(f"vit_large_patch16_siglip{g}_{r}" for g in ("", "_gap") for r in (256, 384, 512)),
    *(f"vit_so400m_patch14_siglip{g}_{r}" for g in ("", "_gap") for r in (224, 378, 384)),
    *(f"vit_so400m_patch16_siglip{g}_{r}" for g in ("", "_gap") for r in (256, 384, 512)),
    *(f"vit_giantopt_patch16_siglip{g}_{r}" for g in ("", "_gap") for r in (256, 384)),
    "vit_base_patch32_siglip_256", "vit_base_patch32_siglip_gap_256", "vit_so400m_patch14_siglip_gap_448",
    "vit_so400m_patch14_siglip_gap_896"}
TIMM_GELU_TANH = {
    *(f"vit_{n}{g}_{r}" for n, rs in (("base_patch32_siglip", (256,)), ("large_patch16_siglip", (512,)),
                                      ("so400m_patch16_siglip", (256, 384, 512)),
                                      ("giantopt_patch16_siglip", (256, 384)))
      for g in ("", "_gap") for r in rs)}


def is_timm_name(name: str) -> bool:
    return "_siglip" in name.split(".")[0]


def timm_architecture(name: str) -> tuple[dict, int]:
    """(ViT fields, image size) of a timm SigLIP tower name such as vit_base_patch16_siglip_224."""
    m = TIMM_NAME.fullmatch(name.split(".")[0])
    base = name.split(".")[0]
    if m is None or base not in TIMM_MODELS:
        raise ConversionError(f"Unknown or unsupported timm SigLIP model {name!r}. Supported: {sorted(TIMM_MODELS)}")
    width, depth, heads, mlp_dim = TIMM_SIZES[m["size"]]
    fields = {"width": width, "depth": depth, "num_heads": heads, "mlp_dim": mlp_dim, "patch_size": int(m["patch"]),
              "pool": "gap" if m["gap"] else "map", "class_token": False, "posemb": "learn", "pre_norm": False,
              "patch_bias": True, "fc_norm": False, "ln_eps": 1e-6,
              "act": "gelu_tanh" if base in TIMM_GELU_TANH else "gelu"}
    return fields, int(m["res"])


def from_timm(name: str, state: dict[str, np.ndarray], model_args: dict | None = None) -> Plan:
    fields, size = timm_architecture(name)
    args = {"global_pool": "avg" if fields["pool"] == "gap" else "map", "fc_norm": False, "class_token": False,
            **(model_args or {})}
    pooling = timm_pooling(name, state, args)
    if pooling["pool"] != fields["pool"]:
        raise ConversionError(f"timm {name}: global_pool={args['global_pool']!r} is not this SigLIP tower's "
                              f"pooling ({'avg' if fields['pool'] == 'gap' else 'map'})")
    fields.update(pooling)
    head = state.get("head.weight")
    fields["num_classes"] = int(head.shape[0]) if head is not None else None
    source = {"library": "timm", "model": name}
    if model_args:
        source["model_args"] = dict(model_args)
    return Plan(VIT, fields, [input_spec((1, size, size, 3))], TIMM_TABLE, source)



def is_timm_tower(fields: dict) -> bool:
    """A ViT pooled like timm's SigLIP towers (no class token; attention probe or mean; no registers)."""
    no_prefix = fields.get("class_token") is False and not fields.get("num_registers")
    return no_prefix and fields.get("pool") in ("map", "gap")


def timm_export(config: dict) -> tuple[Table, None]:
    """The table that writes a SigLIP tower (a ViT that a timm vit_*_siglip_* name builds) for timm."""
    fields = config["fields"]
    require(fields, "timm SigLIP tower", posemb="learn", pre_norm=False, patch_bias=True, fc_norm=False,
            qkv_bias=True, layer_scale=None, representation_size=None, conv_stem=[], block=None)
    timm_config(config)             # refuses a tower that no timm name builds
    return TIMM_TABLE, None


def vit_timm_export(config: dict) -> tuple[Table, None]:
    """A ViT model directory's timm export: a SigLIP tower by its timm name, else a plain timm ViT."""
    return (timm_export if is_timm_tower(config["fields"]) else vit_timm_table_export)(config)


def timm_config(model_config: dict) -> dict | None:
    """timm.create_model arguments for a ViT (library_configs' for a plain one): a SigLIP tower's name."""
    fields = model_config["fields"]
    if model_config["class"] != VIT or not is_timm_tower(fields):
        return library_configs.timm_vit_config(model_config)
    name = _timm_name_of(fields, model_config["inputs"][0]["shape"][1])
    return {"architecture": name, "model_args": {"num_classes": fields.get("num_classes") or 0}}


# ---------------------------------------------------------------------------------------------
# open_clip ViT-*-SigLIP* (CustomTextCLIP: a timm trunk and open_clip's text tower)
# ---------------------------------------------------------------------------------------------

OPEN_CLIP_TABLE = Table((
    *(Rule(f"visual.trunk.{r.torch_key}", tuple(f"visual/{p}" for p in r.mmjax_paths), r.transform, r.export)
      for r in TIMM_TABLE.rules),
    rule("text.token_embedding.weight", "textual/token_embedding/embedding"),
    rule("text.positional_embedding", "textual/pos_embedding"),
    *open_clip_layer("text.transformer.resblocks.{i}", "textual/encoder/layer_{i}"),
    *norm("text.ln_final", "textual/ln_final"),
    *linear("text.text_projection", "text_proj"),
    rule("logit_scale", "logit_scale"),
    rule("logit_bias", "logit_bias"),
))
# The open_clip config options a SigLIP may carry: value None = any value, else the values allowed.
OPEN_CLIP_OPTIONS = {
    "": {"embed_dim": None, "init_logit_bias": None, "custom_text": (True,), "quick_gelu": (False,),
         "vision_cfg": None, "text_cfg": None},
    "vision_cfg": {"image_size": None, "timm_model_name": None, "timm_model_pretrained": None,
                   "timm_pool": ("map", "avg"), "timm_proj": ("none",), "timm_drop": None, "timm_drop_path": None},
    "text_cfg": {"context_length": None, "vocab_size": None, "hf_tokenizer_name": None, "tokenizer_kwargs": None,
                 "width": None, "heads": None, "layers": None, "mlp_ratio": None, "no_causal_mask": (True,),
                 "proj_bias": (True,), "proj_type": ("linear",), "pool_type": ("last",), "norm_kwargs": None,
                 "act_kwargs": None},
}


def is_open_clip(config: dict) -> bool:
    """An open_clip config whose image tower is a timm SigLIP ViT (the ViT-*-SigLIP* models)."""
    return is_timm_name(str((config.get("vision_cfg") or {}).get("timm_model_name", "")))


def open_clip_fields(config: dict, name: str = "") -> tuple[dict, int]:
    """(CLIP fields, image size) of an open_clip SigLIP config; options mmjax cannot express are refused."""
    bad = [f"{section + '.' if section else ''}{k}={v!r}" for section, allowed in OPEN_CLIP_OPTIONS.items()
           for k, v in (config.get(section, {}) if section else config).items()
           if k not in allowed or (allowed[k] is not None and v not in allowed[k])]
    text_cfg, vision = config["text_cfg"], config["vision_cfg"]
    eps = (text_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)
    approximate = (text_cfg.get("act_kwargs") or {}).get("approximate", "none")
    if set(text_cfg.get("norm_kwargs") or {}) - {"eps"} or set(text_cfg.get("act_kwargs") or {}) - {"approximate"} \
            or approximate not in ("none", "tanh"):
        bad.append(f"text_cfg.norm_kwargs={text_cfg.get('norm_kwargs')} act_kwargs={text_cfg.get('act_kwargs')}")
    if bad:
        raise ConversionError(f"open_clip SigLIP model {name!r} uses options this converter does not support: {bad}")
    image, _ = timm_architecture(vision["timm_model_name"])
    if (vision.get("timm_pool") or "map") != {"map": "map", "gap": "avg"}[image["pool"]]:
        raise ConversionError(f"open_clip SigLIP model {name!r}: timm_pool={vision.get('timm_pool')!r} is not "
                              f"the pooling of {vision['timm_model_name']}")
    if config["embed_dim"] != image["width"]:
        raise ConversionError(f"open_clip SigLIP model {name!r}: embed_dim {config['embed_dim']} differs from the "
                              f"image width {image['width']} (timm_proj='none' has no projection)")
    width = text_cfg.get("width", 512)
    text = {"vocab_size": text_cfg.get("vocab_size", 49408), "context_length": text_cfg.get("context_length", 77),
            "width": width, "depth": text_cfg.get("layers", 12), "num_heads": text_cfg.get("heads", 8),
            "mlp_dim": int(width * text_cfg.get("mlp_ratio", 4.0)), "causal": False, "pool": "last",
            "act": "gelu_tanh" if approximate == "tanh" else "gelu", "ln_eps": eps}
    fields = {"embed_dim": config["embed_dim"], "image": image, "text": text,
              "logit_bias_init": float(config.get("init_logit_bias", -10.0)), **SIGLIP_CLIP_FIELDS}
    size = vision.get("image_size", 224)
    return fields, size


def from_open_clip(name: str, state: dict[str, np.ndarray]) -> Plan:
    config = clip.open_clip_config(name)
    fields, size = open_clip_fields(config, name)
    size = (size, size) if isinstance(size, int) else tuple(size)
    inputs = [input_spec((1, *size, 3)), input_spec((1, fields["text"]["context_length"]), "int32")]
    return Plan(CLIP, fields, inputs, OPEN_CLIP_TABLE, {"library": "open_clip", "model": name, "config": config})


def _timm_name_of(image: dict, size: int) -> str:
    """The timm SigLIP name whose tower is this image tower (for an open_clip config)."""
    keys = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "pool", "act", "ln_eps")
    for name in sorted(TIMM_MODELS):
        fields, res = timm_architecture(name)
        if res == size and all(fields[k] == image.get(k) for k in keys):
            return name
    raise ConversionError("This model cannot be written for open_clip / timm as a SigLIP: no timm SigLIP tower "
                          f"(vit_*_siglip_*) has its image tower's {', '.join(keys)} at image size {size}")


def open_clip_export(config: dict) -> tuple[Table, None]:
    """The table that writes this SigLIP model directory for open_clip (a CustomTextCLIP)."""
    fields = config["fields"]
    require(fields, "open_clip SigLIP", **SIGLIP_CLIP_FIELDS)
    require(fields["image"], "open_clip SigLIP (image tower)", class_token=False, posemb="learn", pre_norm=False,
            patch_bias=True, fc_norm=False, qkv_bias=True, layer_scale=None, representation_size=None,
            conv_stem=[], block=None, num_classes=None)
    require(fields["text"], "open_clip SigLIP (text tower)", causal=False, pool="last", block=None)
    if fields["text"].get("act", "gelu") not in ("gelu", "gelu_tanh"):
        raise ConversionError("This model cannot be written as an open_clip SigLIP: text act "
                              f"{fields['text']['act']!r} (open_clip: gelu or gelu_tanh)")
    open_clip_config(config)        # refuses an image tower that no timm name builds
    return OPEN_CLIP_TABLE, None


def clip_open_clip_export(config: dict) -> tuple[Table, None]:
    """A CLIP model directory's open_clip export: a CustomTextCLIP for a SigLIP, else a CLIP."""
    return (open_clip_export if is_siglip(config["fields"]) else clip.open_clip_export)(config)


def open_clip_config(model_config: dict) -> dict:
    """open_clip's JSON model config for this CLIP model directory (library_configs' for a CLIP)."""
    fields = model_config["fields"]
    if not is_siglip(fields):
        return library_configs.open_clip_config(model_config)
    source = model_config.get("source") or {}
    if source.get("library") == "open_clip" and is_open_clip(source.get("config") or {}):
        return source["config"]
    image, text = fields["image"], fields["text"]
    size = model_config["inputs"][0]["shape"][1]
    width = text["width"]
    text_cfg = {"context_length": text["context_length"], "vocab_size": text["vocab_size"], "width": width,
                "heads": text["num_heads"], "layers": text["depth"],
                "mlp_ratio": (text.get("mlp_dim") or 4 * width) / width, "no_causal_mask": True, "proj_bias": True,
                "pool_type": "last", "norm_kwargs": {"eps": text.get("ln_eps", 1e-5)}}
    if text.get("act", "gelu") == "gelu_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    return {"embed_dim": fields["embed_dim"], "init_logit_bias": fields["logit_bias_init"], "custom_text": True,
            "vision_cfg": {"image_size": size, "timm_model_name": _timm_name_of(image, size),
                           "timm_model_pretrained": False, "timm_pool": "avg" if image["pool"] == "gap" else "map",
                           "timm_proj": "none"},
            "text_cfg": text_cfg}
