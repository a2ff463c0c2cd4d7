"""Analytic FLOP counts for mmjax's model families, peak accelerator throughput and MFU.

Counts are matmul FLOPs (2 per multiply-add), MaxText-style: projections, attention scores and
the attention-weighted sum, MLPs, patch embedding, heads. Norms, softmax and activations are
left out (a few % of the total); so are embedding look-ups. Attention is counted in full, also
when causal, because the "xla" backend computes the full score matrix.

Training costs 3× the forward pass (forward, plus two matmuls per matmul in the backward pass).
That is the *model* FLOP count that MFU uses; rematerialisation adds recomputed forward work
on top (`remat_recompute_flops`), which is hardware work but not model progress.
"""

from __future__ import annotations

from collections.abc import Mapping

from mmjax.models import clip as clip_lib
from mmjax.models import text as text_lib
from mmjax.models import vit as vit_lib

TRAIN_FACTOR = 3.0   # forward + backward (grad w.r.t. activations and w.r.t. weights)

# Dense bf16 peak, TFLOP/s per chip, matched as substrings of `jax.Device.device_kind`, most
# specific first. TPU v5e reports "TPU v5 lite", v6e (Trillium) "TPU v6 lite", v5p "TPU v5".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("H100 PCIe", 756.0),   # the PCIe card has fewer SMs and a lower clock than SXM
    ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s of one device of this kind, or None when unknown (e.g. CPUs)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def mfu(flops_per_sec_per_device: float, device_kind: str) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s per device ÷ the device's bf16 peak."""
    peak = peak_tflops(device_kind)
    return None if peak is None else flops_per_sec_per_device / (peak * 1e12)


def throughput(train_flops_per_example: float, examples_per_sec: float, num_devices: int,
               device_kind: str) -> dict[str, float]:
    """What the trainer logs: model TFLOP/s per device, and MFU where the peak is known."""
    per_device = train_flops_per_example * examples_per_sec / num_devices
    out = {"tflops_per_device": per_device / 1e12}
    utilisation = mfu(per_device, device_kind)
    if utilisation is not None:
        out["mfu"] = utilisation
    return out


def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> dict[str, float]:
    """Forward FLOPs of `depth` pre-LN blocks on one sequence of `tokens` tokens.

    "linear" grows with the token count (q/k/v/out projections and the MLP); "attention" is
    the quadratic part (scores q·kᵀ and the weighted sum of values).
    """
    linear = 2.0 * tokens * (4 * width * width + 2 * width * mlp_dim)
    attention = 4.0 * tokens * tokens * width
    return {"linear": depth * linear, "attention": depth * attention}


def vit_tokens(model: vit_lib.ViT, image_hw: tuple[int, int], train: bool = False) -> int:
    """Tokens the encoder sees: kept patches (patch dropping in training) plus [CLS]."""
    patch = model.arch()["patch_size"]
    patches = (image_hw[0] // patch[0]) * (image_hw[1] // patch[1])
    if train:
        patches = vit_lib.kept_patches(patches, model.patch_drop_ratio)
    class_token = getattr(model, "class_token", None)
    return patches + int(model.pool == "cls" if class_token is None else class_token)


def patch_embed_flops(model: vit_lib.ViT, image_hw: tuple[int, int]) -> float:
    """The patchify convolution, or the conv stem's 3×3 stride-2 layers plus its last conv."""
    arch = model.arch()
    patch, width = arch["patch_size"], arch["width"]
    h, w, channels = image_hw[0], image_hw[1], model.in_channels
    flops = 0.0
    for c in getattr(model, "conv_stem", ()) or ():   # SAME padding: each layer halves h and w
        h, w = -(-h // 2), -(-w // 2)
        flops += 2.0 * h * w * 9 * channels * c
        channels = c
    reduction = 2 ** len(getattr(model, "conv_stem", ()) or ())
    last = (patch[0] // reduction, patch[1] // reduction)
    grid = (image_hw[0] // patch[0]) * (image_hw[1] // patch[1])
    return flops + 2.0 * grid * last[0] * last[1] * channels * width


def vit_flops(model: vit_lib.ViT, image_hw: tuple[int, int], train: bool = False) -> dict[str, float]:
    """Forward FLOPs per image of a `mmjax.models.vit.ViT`, by part. `train` applies patch dropping."""
    arch = model.arch()
    width, mlp_dim = arch["width"], arch["mlp_dim"]
    tokens = vit_tokens(model, image_hw, train)
    out = {"patch_embed": patch_embed_flops(model, image_hw)}
    blocks = encoder_flops(tokens, width, arch["depth"], mlp_dim)
    out["blocks_linear"], out["blocks_attention"] = blocks["linear"], blocks["attention"]
    head = 0.0
    if model.pool == "map":   # one query attending over all tokens, then an MLP
        head += 2.0 * (2 * width * width + 2 * tokens * width * width) + 4.0 * tokens * width
        head += 4.0 * width * mlp_dim
    features = width
    if model.representation_size is not None:
        head += 2.0 * width * model.representation_size
        features = model.representation_size
    if model.num_classes is not None:
        head += 2.0 * features * model.num_classes
    out["head"] = head
    return out


def text_flops(model: text_lib.TextTransformer, length: int) -> dict[str, float]:
    """Forward FLOPs per sequence of a `mmjax.models.text.TextTransformer`, by part."""
    blocks = encoder_flops(length, model.width, model.depth, model.mlp_dim or 4 * model.width)
    return {"blocks_linear": blocks["linear"], "blocks_attention": blocks["attention"]}


def clip_towers(model: clip_lib.CLIP) -> tuple[vit_lib.ViT, text_lib.TextTransformer]:
    """The image and text towers exactly as `CLIP.setup` builds them (same defaults)."""
    image_cfg, text_cfg = clip_lib.tower_configs(model)
    return vit_lib.ViT(**image_cfg), text_lib.TextTransformer(**text_cfg)


def clip_flops(model: clip_lib.CLIP, image_hw: tuple[int, int], text_length: int,
               batch_size: int | None = None, train: bool = False) -> dict[str, float]:
    """Forward FLOPs per image-text pair of a `mmjax.models.clip.CLIP`, by part.

    With `batch_size` (the global batch), adds the pair's share of the contrastive logits:
    one row of the (B, B) similarity matrix.
    """
    image, txt = clip_towers(model)
    out = {f"image_{k}": v for k, v in vit_flops(image, image_hw, train).items()}
    out.update({f"text_{k}": v for k, v in text_flops(txt, text_length).items()})
    image_width = image.representation_size or image.arch()["width"]
    out["projections"] = 2.0 * model.embed_dim * (image_width + txt.width)
    out["logits"] = 2.0 * batch_size * model.embed_dim if batch_size else 0.0
    return out


def remat_recompute_flops(forward: Mapping[str, float], policy: str) -> float:
    """Extra forward FLOPs that rematerialisation recomputes in the backward pass.

    "full" recomputes every block; "dots_no_batch" saves weight matmuls but recomputes the
    attention matmuls (which have a batch dimension); "dots" and "none" recompute no matmuls.
    """
    blocks = sum(v for k, v in forward.items() if "blocks_" in k)
    attention = sum(v for k, v in forward.items() if "blocks_attention" in k)
    return {"none": 0.0, "dots": 0.0, "dots_no_batch": attention, "full": blocks}[policy]


def total(parts: Mapping[str, float]) -> float:
    return float(sum(parts.values()))
