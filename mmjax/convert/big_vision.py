"""ViT tables for Google's JAX `.npz` checkpoints: google-research/vision_transformer and big_vision.

Both are flattened Flax parameter trees ("/"-joined names) already in mmjax's layouts (HWIO patch
kernel; q/k/v kernels (width, heads, head_dim); out kernel (heads, head_dim, width)), so every rule
copies, and the architecture (width, depth, heads, MLP size, patch, image size, class token, MAP
head, pre-logits, classes) is read from the shapes: no model name is needed. Two layouts, told
apart as timm's `_load_weights` (the reference for both) tells them apart:

- vision_transformer (AugReg, i21k): blocks `Transformer/encoderblock_{i}/` with the Flax
  sub-module indices LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3, and
  `Transformer/posembed_input/pos_embedding`; early files nest it all under `opt/target/`.
- big_vision: under `params/` (a training checkpoint's `opt/` optimizer state is skipped with a
  note), LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0, a top-level
  `pos_embedding`, an optional `MAPHead_0`, and blocks unrolled (`encoderblock_{i}`) or scanned
  (`encoderblock`, with a leading layer axis; unrolled on read by `unroll_scanned`).

Pooling follows from the keys: a class token pools by it ("tok"), a MAP head by attention ("map"),
neither by the mean of the patch tokens ("gap"; big_vision's rarer "0" and "none" poolings leave the
same keys and are not told apart). Exports write the vision_transformer layout, which timm and
the original code both read.
"""

from __future__ import annotations

import re

import numpy as np

from mmjax.convert.engine import ConversionError, Plan, Table, require, rule
from mmjax.convert.vit import VIT, timm_architecture
from mmjax.models import vit
from mmjax.pretrained import input_spec

PREFIXES = ("", "opt/target/", "params/")    # where `embedding/kernel` sits, as timm checks
TWO_TOWER_PREFIX = "params/img/"             # SigLIP / LiT image towers
SCANNED = "Transformer/encoderblock/"
BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/")

# The Flax names of one encoder block's parts, and of the position embedding, in each layout.
LAYOUTS = {
    "vision_transformer": {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_1", "ln2": "LayerNorm_2",
                           "mlp": "MlpBlock_3", "posemb": "Transformer/posembed_input/pos_embedding"},
    "big_vision": {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0", "ln2": "LayerNorm_1",
                   "mlp": "MlpBlock_0", "posemb": "pos_embedding"},
}
GELU_NOTE = ("run with tanh-approximated GELU, as the original Flax code (nn.gelu's default) ran it; timm and "
             "transformers run these weights with exact GELU (act='gelu' for that)")


def _dense(src: str, dst: str) -> list:
    return [rule(f"{src}/kernel", f"{dst}/kernel"), rule(f"{src}/bias", f"{dst}/bias")]


def _norm(src: str, dst: str) -> list:
    return [rule(f"{src}/scale", f"{dst}/scale"), rule(f"{src}/bias", f"{dst}/bias")]


def _attention(src: str, dst: str) -> list:
    return [r for n in ("query", "key", "value", "out") for r in _dense(f"{src}/{n}", f"{dst}/{n}")]


def table(layout: str, prefix: str = "") -> Table:
    """The rules of one layout with its key prefix; other `opt/` keys (optimizer state) are skipped."""
    names, p = LAYOUTS[layout], prefix
    block, layer = f"{p}Transformer/encoderblock_{{i}}", "encoder/layer_{i}"
    return Table((
        *_dense(f"{p}embedding", "embedding/conv"),
        rule(f"{p}cls", "cls"),
        rule(f"{p}{names['posemb']}", "posemb/pos_embedding"),
        *_norm(f"{block}/{names['ln1']}", f"{layer}/ln1"),
        *_attention(f"{block}/{names['attn']}", f"{layer}/attn"),
        *_norm(f"{block}/{names['ln2']}", f"{layer}/ln2"),
        *_dense(f"{block}/{names['mlp']}/Dense_0", f"{layer}/mlp/fc1"),
        *_dense(f"{block}/{names['mlp']}/Dense_1", f"{layer}/mlp/fc2"),
        *_norm(f"{p}Transformer/encoder_norm", "norm"),
        rule(f"{p}MAPHead_0/probe", "map/probe"),
        *_attention(f"{p}MAPHead_0/MultiHeadDotProductAttention_0", "map/attn"),
        *_norm(f"{p}MAPHead_0/LayerNorm_0", "map/ln"),
        *_dense(f"{p}MAPHead_0/MlpBlock_0/Dense_0", "map/mlp/fc1"),
        *_dense(f"{p}MAPHead_0/MlpBlock_0/Dense_1", "map/mlp/fc2"),
        *_dense(f"{p}pre_logits", "pre_logits"),
        *_dense(f"{p}head", "head"),
    ), ignore=(_optimizer_state(p),))


def _optimizer_state(prefix: str) -> str:
    """The keys of optimizer state beside the parameters: `opt/...`, except the parameters' own prefix."""
    return f"(?!{re.escape(prefix)})opt/.*" if prefix else "opt/.*"


EXPORT_TABLE = table("vision_transformer")


def unroll_scanned(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned blocks (`.../encoderblock/X` of shape (depth, ...)) as the unrolled
    `.../encoderblock_{i}/X` keys the tables name; other keys are kept as they are."""
    out = {}
    for key, value in state.items():
        head, found, tail = key.partition(SCANNED)
        if not found:
            out[key] = value
            continue
        for i, layer in enumerate(value):
            out[f"{head}Transformer/encoderblock_{i}/{tail}"] = layer
    return out


def _prefix(state: dict[str, np.ndarray]) -> str:
    """Where the parameters sit; raises for what is not a ViT of either layout."""
    if f"{TWO_TOWER_PREFIX}embedding/kernel" in state:
        raise ConversionError("This is a two-tower big_vision checkpoint (SigLIP / LiT: params/img/, params/txt/), "
                              "which mmjax does not read from .npz yet; convert its Hugging Face or open_clip "
                              "release instead (--source hf / open_clip)")
    for prefix in PREFIXES:
        if f"{prefix}embedding/kernel" in state:
            return prefix
    if any("conv_root" in k or "block1/unit1" in k for k in state):
        raise ConversionError("This .npz holds a hybrid ResNet+ViT (conv_root, block*/unit*), which mmjax does not "
                              "implement; plain ViTs (patchify stem) only")
    raise ConversionError(f"Not a ViT .npz checkpoint: no embedding/kernel under any of {list(PREFIXES)}; "
                          f"first keys: {sorted(state)[:5]}")


def layout(state: dict[str, np.ndarray], prefix: str) -> str:
    """big_vision when under params/ or with a top-level pos_embedding (timm's test), else vision_transformer."""
    return "big_vision" if prefix == "params/" or f"{prefix}pos_embedding" in state else "vision_transformer"


def _get(state: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"Cannot read the architecture: the checkpoint has no {key!r}")
    return state[key]


def architecture(state: dict[str, np.ndarray], prefix: str, names: dict) -> tuple[dict, int]:
    """(ViT fields, image size), read from the shapes of an unrolled checkpoint."""
    p = prefix
    depth = 1 + max((int(m[1]) for k in state if k.startswith(p) and (m := BLOCK.match(k[len(p):]))), default=-1)
    if depth == 0:
        raise ConversionError(f"Cannot read the architecture: no {p}Transformer/encoderblock_{{i}}/ keys")
    patch_h, patch_w, channels, width = _get(state, f"{p}embedding/kernel").shape
    block = f"{p}Transformer/encoderblock_0"
    _, heads, _ = _get(state, f"{block}/{names['attn']}/query/kernel").shape
    mlp_dim = _get(state, f"{block}/{names['mlp']}/Dense_0/kernel").shape[1]
    has_cls, has_map = f"{p}cls" in state, f"{p}MAPHead_0/probe" in state
    tokens = _get(state, f"{p}{names['posemb']}").shape[-2] - int(has_cls)
    grid = round(tokens ** 0.5)
    if grid * grid != tokens:
        raise ConversionError(f"{tokens} position embeddings (without the class token) are not a square grid; "
                              "mmjax reads square images only from .npz")
    fields = {"width": int(width), "depth": depth, "num_heads": int(heads), "mlp_dim": int(mlp_dim),
              "patch_size": int(patch_h) if patch_h == patch_w else [int(patch_h), int(patch_w)],
              "in_channels": int(channels), "pool": "map" if has_map else "cls" if has_cls else "gap",
              "class_token": has_cls, "posemb": "learn", "act": "gelu_tanh", "ln_eps": 1e-6}
    if f"{p}pre_logits/kernel" in state:
        fields["representation_size"] = int(state[f"{p}pre_logits/kernel"].shape[1])
    head = state.get(f"{p}head/kernel")
    fields["num_classes"] = int(head.shape[1]) if head is not None else None
    return fields, grid * int(patch_h)


def check_name(model: str, fields: dict, size: int) -> None:
    """`--model` is optional: a timm name (vit_base_patch16_224) or an mmjax variant (B/16) is checked
    against the shapes, so that a wrong file is caught by name too."""
    if model.startswith("vit_"):
        named, named_size = timm_architecture(model)
    else:
        try:
            named, named_size = vit.parse_variant(model), size
        except ValueError as e:
            raise ConversionError(f"--model {model!r}: expected a timm ViT name (vit_base_patch16_224) or an "
                                  f"mmjax variant (B/16), or nothing (the shapes give the architecture): {e}") from e
    named, found = {**named, "image_size": named_size}, {**fields, "image_size": size}
    wrong = [f"{k}={named[k]} (the file has {found[k]})" for k in (*vit.ARCH_FIELDS, "image_size")
             if k in named and named[k] != found[k]]
    if wrong:
        raise ConversionError(f"The checkpoint is not a {model}: {', '.join(wrong)}")


def from_npz(state: dict[str, np.ndarray], model: str | None = None) -> Plan:
    """The plan of an unrolled `.npz` state (see `unroll_scanned`); `model` is an optional check."""
    prefix = _prefix(state)
    kind = layout(state, prefix)
    fields, size = architecture(state, prefix, LAYOUTS[kind])
    if model:
        check_name(model, fields, size)
    plan = Plan(VIT, fields, [input_spec((1, size, size, fields["in_channels"]))], table(kind, prefix),
                {"library": "big_vision", "layout": kind, **({"model": model} if model else {})})
    skipped = [k for k in state if re.fullmatch(_optimizer_state(prefix), k)]
    if skipped:
        plan.notes.append(f"skipped {len(skipped)} optimizer-state arrays (opt/...): not model parameters")
    if fields["pool"] == "gap":
        plan.notes.append("no class token and no MAP head: pooled by the mean of the patch tokens "
                          "(big_vision pool_type='gap', vision_transformer classifier='gap')")
    plan.notes.append(GELU_NOTE)
    return plan


def npz_export(config: dict) -> tuple[Table, None]:
    """The vision_transformer (AugReg) layout of a plain ViT; what it cannot express is refused."""
    fields = config["fields"]
    require(fields, "vision_transformer .npz", posemb="learn", pre_norm=False, fc_norm=False, patch_bias=True,
            qkv_bias=True, layer_scale=None, conv_stem=[], block=None, ln_eps=1e-6)
    if fields.get("pool", "cls") not in ("cls", "gap"):
        raise ConversionError(f"This model cannot be written as a vision_transformer .npz checkpoint: "
                              f"pool={fields['pool']!r} (needs 'cls' or 'gap'; the layout has no MAP head)")
    has_cls = fields.get("pool", "cls") == "cls" if fields.get("class_token") is None else fields["class_token"]
    if has_cls != (fields.get("pool", "cls") == "cls"):
        raise ConversionError("This model cannot be written as a vision_transformer .npz checkpoint: "
                              f"pool={fields.get('pool')!r} with class_token={has_cls} (the layout reads a class "
                              "token as token pooling and its absence as mean pooling)")
    if fields.get("act", "gelu") not in ("gelu", "gelu_tanh"):
        raise ConversionError(f"This model cannot be written as a vision_transformer .npz checkpoint: "
                              f"act={fields['act']!r} (the layout's models use GELU)")
    return EXPORT_TABLE, None
