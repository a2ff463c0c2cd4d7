"""MAE table: Hugging Face `ViTMAEForPreTraining` -> mmjax `MAE` (encoder, decoder, pixel head).

The fixed sin-cos position tables (`vit.embeddings.position_embeddings`,
`decoder.decoder_pos_embed`) are read and dropped: mmjax recomputes the same table. Import
only: writing a transformers folder would need those tables back (the engine writes parameters,
not recomputed buffers). A timm MAE-pretrained encoder (`vit_base_patch16_224.mae`) is a plain
timm ViT checkpoint and converts through the ViT table (see vit.py).
"""

from __future__ import annotations

import numpy as np

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
from mmjax.convert.vit import hf_activation
from mmjax.models import layers
from mmjax.pretrained import input_spec

MAE = "mmjax.models.mae.MAE"


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
), ignore=(r"vit\.embeddings\.position_embeddings", r"decoder\.decoder_pos_embed", r".*position_ids"))


def _check_fixed_posemb(table: np.ndarray | None, key: str, grid: tuple[int, int], width: int) -> list[str]:
    """The dropped table must be the sin-cos table that mmjax recomputes (or all zero: transformers
    leaves it zero in a model built from a config); anything else would be silently lost."""
    if table is None or not np.any(table):
        return [f"{key} is absent or zero in the checkpoint; mmjax uses the fixed sin-cos table"]
    want = np.asarray(layers.sincos_2d(grid, width))[0]
    if table.shape != (1, 1 + want.shape[0], width) or not np.allclose(table[0, 1:], want, atol=1e-4):
        raise ConversionError(f"{key} {table.shape} is not the fixed 2-D sin-cos table that mmjax MAE uses "
                              f"for a {grid[0]}x{grid[1]} grid; learned MAE position embeddings are not supported")
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
    for key, width in (("vit.embeddings.position_embeddings", fields["width"]),
                       ("decoder.decoder_pos_embed", fields["decoder_width"])):
        notes += _check_fixed_posemb(state.get(key), key, grid, width)
    return Plan(MAE, fields, [input_spec((1, *size, fields["in_channels"])), input_spec((1, patches))],
                HF_TABLE, {"library": "hf", "architecture": "ViTMAEForPreTraining", "config": config}, notes)
