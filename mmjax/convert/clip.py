"""CLIP tables: open_clip / OpenAI `CLIP` and Hugging Face `CLIPModel`.

open_clip names give the architecture (the standard ViT CLIPs are built in, so no torch or
open_clip is needed; other names are read from an installed open_clip's JSON configs, and a
path to such a JSON file works too). Hugging Face folders give it in config.json.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

from mmjax.convert.engine import (
    CONV,
    LINEAR,
    ConversionError,
    Plan,
    Table,
    attention,
    drop_leading,
    fused_qkv,
    heads_out,
    linear,
    norm,
    require,
    rule,
)
from mmjax.convert.vit import hf_activation, hf_activation_name
from mmjax.pretrained import input_spec

CLIP = "mmjax.models.clip.CLIP"

# ---------------------------------------------------------------------------------------------
# open_clip (and OpenAI's original files, which use the same keys)
# ---------------------------------------------------------------------------------------------

# name: (embed_dim, image_size, patch, width, layers, head_width, mlp_ratio, text width, heads, layers)
OPEN_CLIP_MODELS = {
    "ViT-S-16": (384, 224, 16, 384, 12, 64, 4.0, 384, 6, 12),
    "ViT-S-32": (384, 224, 32, 384, 12, 64, 4.0, 384, 6, 12),
    "ViT-M-16": (512, 224, 16, 512, 12, 64, 4.0, 512, 8, 12),
    "ViT-M-32": (512, 224, 32, 512, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-32": (512, 224, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-32-256": (512, 256, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-16": (512, 224, 16, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-16-plus-240": (640, 240, 16, 896, 12, 64, 4.0, 640, 10, 12),
    "ViT-L-14": (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-H-14": (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 16, 24),
    "ViT-g-14": (1024, 224, 14, 1408, 40, 88, 4.3637, 1024, 16, 24),
    "ViT-bigG-14": (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 20, 32),
}
QUICKGELU = "-quickgelu"
# Keys of open_clip's JSON configs that this converter understands (others are refused).
OPEN_CLIP_KEYS = {
    "": {"embed_dim", "quick_gelu", "init_logit_bias", "vision_cfg", "text_cfg"},
    "vision_cfg": {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type"},
}
# OpenAI's original files carry these scalars; open_clip drops them too.
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def _open_clip_block(src: str, dst: str) -> list:
    return [*norm(f"{src}.ln_1", f"{dst}/ln1"),
            *fused_qkv(f"{src}.attn.in_proj_weight", f"{src}.attn.in_proj_bias", f"{dst}/attn"),
            *heads_out(f"{src}.attn.out_proj", f"{dst}/attn/out"),
            *norm(f"{src}.ln_2", f"{dst}/ln2"),
            *linear(f"{src}.mlp.c_fc", f"{dst}/mlp/fc1"),
            *linear(f"{src}.mlp.c_proj", f"{dst}/mlp/fc2")]


OPEN_CLIP_TABLE = Table((
    rule("visual.conv1.weight", "visual/embedding/conv/kernel", CONV),
    rule("visual.class_embedding", "visual/cls", drop_leading(2)),
    rule("visual.positional_embedding", "visual/posemb/pos_embedding", drop_leading(1)),
    *norm("visual.ln_pre", "visual/ln_pre"),
    *_open_clip_block("visual.transformer.resblocks.{i}", "visual/encoder/layer_{i}"),
    *norm("visual.ln_post", "visual/norm"),
    rule("visual.proj", "image_proj/kernel"),                 # (width, embed): x @ proj
    rule("token_embedding.weight", "textual/token_embedding/embedding"),
    rule("positional_embedding", "textual/pos_embedding"),
    *_open_clip_block("transformer.resblocks.{i}", "textual/encoder/layer_{i}"),
    *norm("ln_final", "textual/ln_final"),
    rule("text_projection", "text_proj/kernel"),              # (width, embed): x @ text_projection
    rule("logit_scale", "logit_scale"),
    rule("logit_bias", "logit_bias"),
), ignore=(*OPENAI_METADATA, r"attn_mask"))


def open_clip_config(name: str) -> dict:
    """open_clip's JSON config for `name` (built-in table, installed open_clip, or a .json path)."""
    if name.endswith(".json") and os.path.isfile(name):
        with open(name) as f:
            config = json.load(f)
        return config.get("model_cfg", config)      # a Hub repository's open_clip_config.json nests it
    base = name.removesuffix(QUICKGELU)
    if base in OPEN_CLIP_MODELS:
        embed, size, patch, width, layers, head_width, ratio, t_width, t_heads, t_layers = OPEN_CLIP_MODELS[base]
        vision = {"image_size": size, "layers": layers, "width": width, "patch_size": patch}
        if head_width != 64:
            vision["head_width"] = head_width
        if ratio != 4.0:
            vision["mlp_ratio"] = ratio
        config = {"embed_dim": embed, "vision_cfg": vision, "text_cfg": {
            "context_length": 77, "vocab_size": 49408, "width": t_width, "heads": t_heads, "layers": t_layers}}
        if base != name:
            config["quick_gelu"] = True
        return config
    spec = importlib.util.find_spec("open_clip")     # locates the package without importing torch
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "model_configs", f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise ConversionError(
        f"Unknown open_clip model {name!r}. Built in: {sorted(OPEN_CLIP_MODELS)} (each also with "
        f"{QUICKGELU!r}); other names are read from an installed open_clip, or pass a config .json path")


def open_clip_fields(config: dict, name: str = "") -> tuple[dict, int]:
    """(CLIP fields, image size) for an open_clip JSON config; unsupported options are refused."""
    unknown = [f"{section + '.' if section else ''}{k}" for section, allowed in OPEN_CLIP_KEYS.items()
               for k in (config.get(section, {}) if section else config) if k not in allowed]
    text_cfg, vision = config.get("text_cfg", {}), config.get("vision_cfg", {})
    if unknown or text_cfg.get("pool_type", "argmax") not in ("argmax", "first", "last"):
        raise ConversionError(f"open_clip model {name!r} uses options this converter does not support: "
                              f"{unknown or ['text_cfg.pool_type=' + text_cfg['pool_type']]} "
                              "(supported: standard ViT CLIPs with learned position embeddings)")
    if not isinstance(vision.get("layers"), int) or not vision.get("patch_size"):
        raise ConversionError(f"open_clip model {name!r} has no ViT image tower (ResNet towers are not supported)")
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    width = vision["width"]
    size = vision["image_size"]
    image = {"width": width, "depth": vision["layers"], "num_heads": width // vision.get("head_width", 64),
             "mlp_dim": int(width * vision.get("mlp_ratio", 4.0)), "patch_size": vision["patch_size"],
             "pool": "cls", "posemb": "learn", "pre_norm": True, "patch_bias": False, "ln_eps": 1e-5, "act": act}
    t_width = text_cfg.get("width", 512)
    text = {"vocab_size": text_cfg.get("vocab_size", 49408), "context_length": text_cfg.get("context_length", 77),
            "width": t_width, "depth": text_cfg.get("layers", 12), "num_heads": text_cfg.get("heads", 8),
            "mlp_dim": int(t_width * text_cfg.get("mlp_ratio", 4.0)), "causal": True,
            "pool": text_cfg.get("pool_type", "argmax"), "act": act, "ln_eps": 1e-5}
    fields = {"embed_dim": config["embed_dim"], "image": image, "text": text}
    if "init_logit_bias" in config:                     # SigLIP-style sigmoid loss bias
        fields["logit_bias_init"] = float(config["init_logit_bias"])
    return fields, size


def from_open_clip(name: str, state: dict[str, np.ndarray]) -> Plan:
    config = open_clip_config(name)
    notes = []
    if "input_resolution" in state and not config.get("quick_gelu"):
        # An original OpenAI file: those models use QuickGELU whatever the name (as in open_clip).
        config = dict(config, quick_gelu=True)
        notes.append(f"OpenAI checkpoint: using QuickGELU activations (open_clip name {name}{QUICKGELU})")
    fields, size = open_clip_fields(config, name)
    size = (size, size) if isinstance(size, int) else tuple(size)
    inputs = [input_spec((1, *size, 3)), input_spec((1, fields["text"]["context_length"]), "int32")]
    return Plan(CLIP, fields, inputs, OPEN_CLIP_TABLE, {"library": "open_clip", "model": name, "config": config},
                notes)


def _require_clip(fields: dict, target: str, text_pools: tuple[str, ...]) -> None:
    require(fields, target, image_projection=True, text_proj_bias=False)   # SigLIP: see convert/siglip.py
    require(fields["image"], f"{target} (image tower)", pool="cls", posemb="learn", fc_norm=False,
            representation_size=None, layer_scale=None, qkv_bias=True, conv_stem=[])
    require(fields["text"], f"{target} (text tower)", causal=True)
    if fields["text"].get("pool", "argmax") not in text_pools:
        raise ConversionError(f"This model cannot be written as a {target} checkpoint: "
                              f"text pool {fields['text']['pool']!r} (needs one of {text_pools})")


def open_clip_export(config: dict) -> tuple[Table, None]:
    """The table that writes this model directory (model_config.json as `config`) for open_clip."""
    _require_clip(config["fields"], "open_clip", ("argmax", "first", "last"))
    return OPEN_CLIP_TABLE, None


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------

def _hf_block(src: str, dst: str) -> list:
    return [*norm(f"{src}.layer_norm1", f"{dst}/ln1"),
            *attention(*(f"{src}.self_attn.{n}_proj" for n in ("q", "k", "v", "out")), f"{dst}/attn"),
            *norm(f"{src}.layer_norm2", f"{dst}/ln2"),
            *linear(f"{src}.mlp.fc1", f"{dst}/mlp/fc1"),
            *linear(f"{src}.mlp.fc2", f"{dst}/mlp/fc2")]


HF_CLIP_TABLE = Table((
    rule("vision_model.embeddings.class_embedding", "visual/cls", drop_leading(2)),
    rule("vision_model.embeddings.patch_embedding.weight", "visual/embedding/conv/kernel", CONV),
    rule("vision_model.embeddings.position_embedding.weight", "visual/posemb/pos_embedding", drop_leading(1)),
    *norm("vision_model.pre_layrnorm", "visual/ln_pre"),          # sic: transformers' name
    *_hf_block("vision_model.encoder.layers.{i}", "visual/encoder/layer_{i}"),
    *norm("vision_model.post_layernorm", "visual/norm"),
    rule("visual_projection.weight", "image_proj/kernel", LINEAR),
    rule("text_model.embeddings.token_embedding.weight", "textual/token_embedding/embedding"),
    rule("text_model.embeddings.position_embedding.weight", "textual/pos_embedding"),
    *_hf_block("text_model.encoder.layers.{i}", "textual/encoder/layer_{i}"),
    *norm("text_model.final_layer_norm", "textual/ln_final"),
    rule("text_projection.weight", "text_proj/kernel", LINEAR),
    rule("logit_scale", "logit_scale"),
), ignore=(r".*position_ids",))

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for keys a config.json may omit.
HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5, "eos_token_id": 49407}
HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    t = {**HF_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    v = {**HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    # transformers pools text at the first eos_token_id (argmax of the ids for the legacy id 2):
    # the same position as mmjax's argmax pooling when EOT is the largest id, as in CLIP's BPE.
    if t["eos_token_id"] not in (2, t["vocab_size"] - 1):
        raise ConversionError(f"CLIP text eos_token_id {t['eos_token_id']} is not the largest id "
                              f"({t['vocab_size'] - 1}); mmjax pools text at the largest id")
    image = {"width": v["hidden_size"], "depth": v["num_hidden_layers"], "num_heads": v["num_attention_heads"],
             "mlp_dim": v["intermediate_size"], "patch_size": v["patch_size"], "in_channels": v["num_channels"],
             "pool": "cls", "posemb": "learn", "pre_norm": True, "patch_bias": False,
             "ln_eps": v["layer_norm_eps"], "act": hf_activation(v["hidden_act"])}
    text = {"vocab_size": t["vocab_size"], "context_length": t["max_position_embeddings"], "width": t["hidden_size"],
            "depth": t["num_hidden_layers"], "num_heads": t["num_attention_heads"], "mlp_dim": t["intermediate_size"],
            "causal": True, "pool": "argmax", "act": hf_activation(t["hidden_act"]), "ln_eps": t["layer_norm_eps"]}
    fields = {"embed_dim": config.get("projection_dim", 512), "image": image, "text": text}
    size = v["image_size"]
    inputs = [input_spec((1, size, size, v["num_channels"])), input_spec((1, text["context_length"]), "int32")]
    return Plan(CLIP, fields, inputs, HF_CLIP_TABLE, {"library": "hf", "architecture": "CLIPModel", "config": config})


def hf_export(config: dict) -> tuple[Table, dict]:
    """The table and config.json that write this model directory for transformers' CLIPModel."""
    fields, source = config["fields"], config["source"]
    _require_clip(fields, "Hugging Face CLIPModel", ("argmax",))
    require(fields["image"], "Hugging Face CLIPModel (image tower)", pre_norm=True, patch_bias=False)
    if source.get("library") == "hf":
        return HF_CLIP_TABLE, source["config"]
    image, text = fields["image"], fields["text"]
    patch = image["patch_size"]
    vision_config = {
        "model_type": "clip_vision_model", "hidden_size": image["width"], "intermediate_size": image["mlp_dim"],
        "num_hidden_layers": image["depth"], "num_attention_heads": image["num_heads"],
        "num_channels": image.get("in_channels", 3), "image_size": config["inputs"][0]["shape"][1],
        "patch_size": patch if isinstance(patch, int) else patch[0],
        "hidden_act": hf_activation_name(image.get("act", "gelu")),
        "layer_norm_eps": image.get("ln_eps", 1e-5), "projection_dim": fields["embed_dim"]}
    text_config = {
        "model_type": "clip_text_model", "vocab_size": text["vocab_size"], "hidden_size": text["width"],
        "intermediate_size": text.get("mlp_dim") or 4 * text["width"], "num_hidden_layers": text["depth"],
        "num_attention_heads": text["num_heads"], "max_position_embeddings": text["context_length"],
        "hidden_act": hf_activation_name(text.get("act", "gelu")), "layer_norm_eps": text.get("ln_eps", 1e-5),
        "eos_token_id": text["vocab_size"] - 1, "projection_dim": fields["embed_dim"]}
    return HF_CLIP_TABLE, {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": fields["embed_dim"],
                           "text_config": text_config, "vision_config": vision_config}
