"""MAE tables: Hugging Face `ViTMAEForPreTraining` <-> mmjax `MAE` (encoder, decoder, pixel head),
and MAE's encoder -> timm's `VisionTransformer` (the `vit_base_patch16_224.mae` layout).

The fixed sin-cos position tables (`vit.embeddings.position_embeddings`,
`decoder.decoder_pos_embed`, timm's `pos_embed`) are not mmjax parameters: importing checks
and drops them (mmjax recomputes the same table), exporting writes that table back. A timm
MAE-pretrained encoder (`vit_base_patch16_224.mae`) is a plain timm ViT checkpoint and imports
through the ViT table (see vit.py). timm has no MAE decoder, so `--to timm` writes the encoder
and leaves the decoder out, saying so in a note.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from mmjax import layers, pretrained, warm_start
from mmjax.convert.engine import (
    ConversionError,
    Plan,
    Rule,
    Table,
    attention,
    heads_in,
    heads_out,
    linear,
    norm,
    rule,
)
from mmjax.convert.engine import conv as conv_rules
from mmjax.convert.export import Export
from mmjax.convert.vit import TIMM_TABLE, hf_activation, hf_activation_name
from mmjax.pretrained import input_spec

MAE = "mmjax.models.mae.MAE"
ENCODER_POSEMB, DECODER_POSEMB = "vit.embeddings.position_embeddings", "decoder.decoder_pos_embed"


def _legacy_block(old: str, dst: str) -> list[Rule]:
    """transformers 4.x names of one layer (what Hub checkpoints hold and what transformers 5
    still writes with save_pretrained): read only."""
    kw = {"export": False}
    return [
        *norm(f"{old}.layernorm_before", f"{dst}/ln1", **kw),
        *heads_in(f"{old}.attention.attention.query", f"{dst}/attn/query", **kw),
        *heads_in(f"{old}.attention.attention.key", f"{dst}/attn/key", **kw),
        *heads_in(f"{old}.attention.attention.value", f"{dst}/attn/value", **kw),
        *heads_out(f"{old}.attention.output.dense", f"{dst}/attn/out", **kw),
        *norm(f"{old}.layernorm_after", f"{dst}/ln2", **kw),
        *linear(f"{old}.intermediate.dense", f"{dst}/mlp/fc1", **kw),
        *linear(f"{old}.output.dense", f"{dst}/mlp/fc2", **kw),
    ]


def hf_block(new: str, olds: tuple[str, ...], dst: str) -> list[Rule]:
    """One ViT-style layer: transformers 5 names under `new`, older spellings under `olds`."""
    return [
        *norm(f"{new}.layernorm_before", f"{dst}/ln1"),
        *attention(*(f"{new}.attention.{n}_proj" for n in "qkvo"), f"{dst}/attn"),
        *norm(f"{new}.layernorm_after", f"{dst}/ln2"),
        *linear(f"{new}.mlp.fc1", f"{dst}/mlp/fc1"),
        *linear(f"{new}.mlp.fc2", f"{dst}/mlp/fc2"),
        *(r for old in olds for r in _legacy_block(old, dst)),
    ]


HF_TABLE = Table((
    *conv_rules("vit.embeddings.patch_embeddings.projection", "embedding/conv"),
    rule("vit.embeddings.cls_token", "cls"),
    *hf_block("vit.layers.{i}", ("vit.encoder.layer.{i}",), "encoder/layer_{i}"),
    *norm("vit.layernorm", "norm"),
    *linear("decoder.decoder_embed", "decoder_embed"),
    rule("decoder.mask_token", "mask_token"),
    # transformers 5's save_pretrained spells the decoder layers `decoder_encoder.layer.{i}`
    *hf_block("decoder.decoder_layers.{i}", ("decoder.decoder_layers.{i}", "decoder.decoder_encoder.layer.{i}"),
              "decoder/layer_{i}"),
    *norm("decoder.decoder_norm", "decoder_norm"),
    *linear("decoder.decoder_pred", "decoder_pred"),
), ignore=(re.escape(ENCODER_POSEMB), re.escape(DECODER_POSEMB), r".*position_ids"))


def fixed_posemb(grid: tuple[int, int], width: int) -> np.ndarray:
    """MAE's fixed table as PyTorch MAE stores it: (1, 1 + h*w, width), a zero row for [CLS] first."""
    table = np.asarray(layers.sincos_2d(grid, width), np.float32)
    return np.concatenate([np.zeros((1, 1, width), np.float32), table], axis=1)


def _check_fixed_posemb(table: np.ndarray | None, key: str, grid: tuple[int, int], width: int) -> list[str]:
    """The dropped table must be the sin-cos table that mmjax recomputes (or all zero: transformers
    leaves it zero in a model built from a config); anything else would be silently lost."""
    if table is None or not np.any(table):
        return [f"{key} is absent or zero in the checkpoint; mmjax uses the fixed sin-cos table"]
    want = fixed_posemb(grid, width)
    if table.shape != want.shape or not np.allclose(table, want, atol=1e-4):
        raise ConversionError(f"{key} {table.shape} is not the fixed 2-D sin-cos table (with a zero [CLS] row) "
                              f"that mmjax MAE uses for a {grid[0]}x{grid[1]} grid; learned MAE position "
                              "embeddings are not supported")
    return []


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    get = config.get
    if not get("qkv_bias", True):
        raise ConversionError("ViTMAE with qkv_bias=False is not supported (mmjax MAE biases q/k/v)")
    fields = {"width": get("hidden_size", 768), "depth": get("num_hidden_layers", 12),
              "num_heads": get("num_attention_heads", 12), "mlp_dim": get("intermediate_size", 3072),
              "patch_size": get("patch_size", 16), "in_channels": get("num_channels", 3),
              "decoder_width": get("decoder_hidden_size", 512), "decoder_depth": get("decoder_num_hidden_layers", 8),
              "decoder_heads": get("decoder_num_attention_heads", 16),
              "decoder_mlp_dim": get("decoder_intermediate_size", 2048), "mask_ratio": get("mask_ratio", 0.75),
              "ln_eps": get("layer_norm_eps", 1e-12), "act": hf_activation(get("hidden_act", "gelu"))}
    size = get("image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    patches = (size[0] // fields["patch_size"]) * (size[1] // fields["patch_size"])
    notes = [f"norm_pix_loss={get('norm_pix_loss', False)} in the source config: pass it to the MIM loss"]
    grid = (size[0] // fields["patch_size"], size[1] // fields["patch_size"])
    for key, width in ((ENCODER_POSEMB, fields["width"]), (DECODER_POSEMB, fields["decoder_width"])):
        notes += _check_fixed_posemb(state.get(key), key, grid, width)
    return Plan(MAE, fields, [input_spec((1, *size, fields["in_channels"])), input_spec((1, patches))],
                HF_TABLE, {"library": "hf", "architecture": "ViTMAEForPreTraining", "config": config}, notes)


def _arch(config: dict) -> tuple[dict, tuple[int, int], tuple[int, int]]:
    """(encoder architecture, image (h, w), patch grid (h, w)) of an MAE model directory's config."""
    arch = pretrained.build(config["class"], config["fields"]).arch()
    image = tuple(config["inputs"][0]["shape"][1:3])
    patch = arch["patch_size"]
    return arch, image, (image[0] // patch[0], image[1] // patch[1])


def hf_export(config: dict) -> Export:
    """ViTMAEForPreTraining: the table, a config.json and the two fixed position tables."""
    fields, source = config["fields"], config["source"]
    arch, image, grid = _arch(config)
    if image[0] != image[1]:
        raise ConversionError(f"This MAE cannot be written as a Hugging Face ViTMAE checkpoint: its images are "
                              f"{image[0]}x{image[1]}, and transformers' ViTMAE takes square images only")
    decoder_width = fields.get("decoder_width", 512)
    generated = {
        "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
        "hidden_size": arch["width"], "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
        "intermediate_size": arch["mlp_dim"], "hidden_act": hf_activation_name(fields.get("act", "gelu")),
        "layer_norm_eps": fields.get("ln_eps", 1e-6), "image_size": image[0], "patch_size": arch["patch_size"][0],
        "num_channels": fields.get("in_channels", 3), "qkv_bias": True,
        "decoder_hidden_size": decoder_width, "decoder_num_hidden_layers": fields.get("decoder_depth", 8),
        "decoder_num_attention_heads": fields.get("decoder_heads", 16),
        "decoder_intermediate_size": fields.get("decoder_mlp_dim", 2048), "mask_ratio": fields.get("mask_ratio", 0.75)}
    # A transformers source keeps its other settings (norm_pix_loss, dropout, ...); the architecture is the model's.
    hf_config = {**(source.get("config", {}) if source.get("library") == "hf" else {}), **generated}
    hf_config.setdefault("norm_pix_loss", False)
    note = (f"norm_pix_loss={hf_config['norm_pix_loss']} in config.json is a loss setting that the model "
             "directory does not record: set it to the value used in training")
    fixed = {ENCODER_POSEMB: fixed_posemb(grid, arch["width"]), DECODER_POSEMB: fixed_posemb(grid, decoder_width)}
    return Export(HF_TABLE, hf_config, fixed=fixed, notes=(note,))


DECODER_PATHS = (r"decoder.*", r"mask_token")       # decoder_embed, decoder/..., decoder_norm, decoder_pred


def timm_export(config: dict) -> Export:
    """MAE's encoder as a timm VisionTransformer without a head; the decoder is left out."""
    fields = config["fields"]
    arch, image, grid = _arch(config)
    timm_model = (f"VisionTransformer(img_size={image if image[0] != image[1] else image[0]}, "
                  f"patch_size={arch['patch_size'][0]}, embed_dim={arch['width']}, depth={arch['depth']}, "
                  f"num_heads={arch['num_heads']}, mlp_ratio={arch['mlp_dim'] / arch['width']:g}, num_classes=0)")
    notes = [(f"timm holds MAE's encoder only: the decoder (decoder_embed, mask_token, decoder, decoder_norm, "
              f"decoder_pred) is not written. Load the file into timm's {timm_model}, e.g. "
              "timm.create_model('vit_base_patch16_224', num_classes=0) for MAE ViT-B/16")]
    if fields.get("act", "gelu") != "gelu":
        notes.append(f"the model uses {fields['act']}; build the timm model with the same act_layer")
    if fields.get("ln_eps", 1e-6) != 1e-6:
        notes.append(f"the model's LayerNorm eps is {fields['ln_eps']:g}, timm's ViT uses 1e-6 (pass norm_layer "
                     "to match exactly; the difference is tiny)")
    return Export(TIMM_TABLE, None, drop=DECODER_PATHS, fixed={"pos_embed": fixed_posemb(grid, arch["width"])},
                  notes=tuple(notes))


# ---------------------------------------------------------------------------------------------
# Warm start (`config.init.preset`): an MAE run or model directory -> a ViT classifier
# ---------------------------------------------------------------------------------------------

def mae_to_vit(model: Mapping, source: Sequence[str]) -> warm_start.InitRules:
    """MAE pretraining → ViT classifier, as MAE's main_finetune.py: copy `embedding`, `cls` and
    `encoder`; a learned `posemb` starts from the fixed sin-cos table; the head (and with
    `fc_norm` the norm, which then acts on the pooled vector) start fresh; the decoder is dropped."""
    norm = ("norm/.*",) if model.get("fc_norm", False) else ()
    sincos = () if pretrained.POSEMB in source else (pretrained.POSEMB,)   # a timm-style MAE ViT has its own
    return warm_start.InitRules(fresh=("head/.*", "pre_logits/.*", *norm), drop=(*DECODER_PATHS, *norm),
                                sincos=sincos)


warm_start.register_preset("mae_to_vit", mae_to_vit)
