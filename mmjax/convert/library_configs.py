"""The config a PyTorch library needs to build an exported model, written next to the weights.

A state dict alone does not say which architecture to build: transformers gets its config.json
in the written folder; open_clip and timm get a JSON file beside the .safetensors / .pth:
  open_clip  NAME.json, an open_clip model config:
               open_clip.add_model_config("NAME.json")
               model = open_clip.create_model("NAME", pretrained="NAME.safetensors")
  timm       NAME.json, {"architecture": ..., "model_args": {...}}:
               model = timm.create_model(cfg["architecture"], **cfg["model_args"])
               model.load_state_dict(safetensors.torch.load_file("NAME.safetensors"), strict=True)
"""

from __future__ import annotations

import math
import os

from mmjax.models import vit


def sidecar_path(output: str) -> str:
    """clip.safetensors -> clip.json (open_clip names a registered config after the file)."""
    return os.path.splitext(output)[0] + ".json"


def _vit_arch(fields: dict) -> dict:
    return vit.ViT(**{k: v for k, v in fields.items() if k in ("variant", *vit.ARCH_FIELDS)}).arch()


def _side(patch) -> int:
    return patch if isinstance(patch, int) else int(patch[0])


def open_clip_config(model_config: dict) -> dict:
    """open_clip's JSON model config for a CLIP (the export table has checked the towers)."""
    fields = model_config["fields"]
    image, text = dict(fields["image"] or {}), dict(fields["text"] or {})
    arch = _vit_arch(image)
    size = model_config["inputs"][0]["shape"][1:3]
    text_width = text.get("width", 512)
    acts = {image.get("act", "gelu"), text.get("act", "gelu")}
    vision_cfg = {"image_size": size[0] if size[0] == size[1] else list(size), "layers": arch["depth"],
                  "width": arch["width"], "head_width": arch["width"] // arch["num_heads"],
                  "mlp_ratio": arch["mlp_dim"] / arch["width"], "patch_size": _side(arch["patch_size"])}
    text_cfg = {"context_length": text.get("context_length", 77), "vocab_size": text.get("vocab_size", 49408),
                "width": text_width, "heads": text.get("num_heads", 8), "layers": text.get("depth", 12),
                "mlp_ratio": (text.get("mlp_dim") or 4 * text_width) / text_width}
    if text.get("pool", "argmax") != "argmax":
        text_cfg["pool_type"] = text["pool"]
    config = {"embed_dim": fields.get("embed_dim", 512), "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if acts == {"quick_gelu"}:
        config["quick_gelu"] = True
    if fields.get("logit_bias_init") is not None:
        config["init_logit_bias"] = fields["logit_bias_init"]
    return config


def _timm_prefix_args(fields: dict) -> dict:
    """timm arguments for layer scale, register tokens, their position embedding and mean pooling."""
    args = {}
    if fields.get("layer_scale") is not None:
        args["init_values"] = fields["layer_scale"]
    if fields.get("num_registers"):
        args["reg_tokens"] = fields["num_registers"]
    if fields.get("prefix_posemb", "all") == "none":
        args["no_embed_class"] = True
    if fields.get("pool") == "gap":
        args.update(global_pool="avg", class_token=bool(fields.get("class_token")), fc_norm=bool(fields.get("fc_norm")))
    return args


def timm_vit_config(model_config: dict) -> dict | None:
    """timm.create_model arguments for a plain, DINOv2 or register ViT; None when the model needs more
    than JSON arguments can say (another norm eps or activation, CLIP-style pre-norm)."""
    fields = model_config["fields"]
    if (model_config["class"] != "mmjax.models.vit.ViT" or not math.isclose(fields.get("ln_eps", 1e-6), 1e-6)
            or fields.get("act", "gelu") != "gelu" or fields.get("pre_norm") or not fields.get("patch_bias", True)):
        return None
    arch = _vit_arch(fields)
    size = model_config["inputs"][0]["shape"][1:3]
    args = {"img_size": size[0] if size[0] == size[1] else list(size), "patch_size": _side(arch["patch_size"]),
            "embed_dim": arch["width"], "depth": arch["depth"], "num_heads": arch["num_heads"],
            "mlp_ratio": arch["mlp_dim"] / arch["width"], "num_classes": fields.get("num_classes") or 0,
            "qkv_bias": fields.get("qkv_bias", True), "in_chans": fields.get("in_channels", 3)}
    args.update(_timm_prefix_args(fields))
    if fields.get("qkv_bias") == "qv":       # timm's Eva: its qkv_bias means q and v biases
        return {"architecture": "eva_giant_patch14_clip_224", "model_args": {**args, "qkv_bias": True}}
    return {"architecture": "vit_base_patch16_224", "model_args": args}

