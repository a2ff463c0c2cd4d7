"""BEiT (Bao et al. 2022): a ViT with layer scale and relative position bias, pretrained by
predicting the dVAE visual tokens of masked patches.

`BEiT(variant="B/16", vocab_size=8192)` is the pretraining model: masked patches (the
`bool_masked_pos` array, True = masked) are replaced by a learned mask token, and the head
maps every patch token to visual-token logits. `BEiT(variant="B/16", num_classes=1000)` is the
fine-tuning model: mean of the patch tokens → LayerNorm → linear head.

Parameter names: `embedding/conv`, `cls`, `mask_token`, `posemb` (optional absolute
embedding), `rel_pos_bias/table` (shared) or `encoder/layer_N/rel_pos_bias/table` (per layer),
`encoder/...` (a `layers.Stack`; its blocks' key projection has no bias, as BEiT), `norm`, `head`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers
from mmjax.models import vit

REL_POS = ("shared", "layer", "none")


class BEiT(nn.Module):
    """BEiT backbone with a visual-token head (`vocab_size`) or a classifier (`num_classes`)."""

    variant: str | None = None
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    layer_scale: float | None = 0.1          # 0.1 for B, 1e-5 for L (BEiT pretraining)
    rel_pos: str = "shared"                  # "shared" in pretraining, "layer" in fine-tuning
    abs_posemb: bool = False
    use_mask_token: bool | None = None       # default: when vocab_size is set
    vocab_size: int | None = None
    num_classes: int | None = None
    head_init_scale: float = 1.0             # BEiT fine-tuning scales the head init by 0.001
    rescale_init: bool = True                # BEiT's fix_init_weight: block l's attn-out and fc2
                                             # kernels ÷ sqrt(2l) at init (moot for loaded weights)
    dropout: float = 0.0
    drop_path: float = 0.0                   # stochastic depth of the last block (0.1 in BEiT-B)
    act: str = "gelu"
    ln_eps: float = 1e-6
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    block: dict | layers.BlockConfig | None = None   # BlockConfig overrides, e.g. dict(norm="post")

    def arch(self) -> dict:
        return vit.resolve_arch(self)

    def block_config(self, window: tuple[int, int] | None = None) -> layers.BlockConfig:
        """The encoder's block (no key bias, as BEiT), then the `block` overrides; `window` is the
        patch grid of a per-layer relative position bias."""
        arch = self.arch()
        return layers.block_config(
            self.block, num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"], mlp=self.act, norm_eps=self.ln_eps,
            k_bias=False, layer_scale=self.layer_scale, rel_pos_window=window, dropout=self.dropout,
            dtype=self.dtype, attention_impl=self.attention_impl)

    @nn.compact
    def __call__(self, images: jax.Array, bool_masked_pos: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        """A dict (mmjax.models.outputs): "tokens" (B, 1 + N, width), normed unless fine-tuning;
        "logits", visual-token (B, N, vocab) or class (B, classes) when a head is set; "pooled"
        (B, width) with the classifier."""
        if self.rel_pos not in REL_POS:
            raise ValueError(f"Unknown rel_pos {self.rel_pos!r}; known: {REL_POS}")
        if self.vocab_size is not None and self.num_classes is not None:
            raise ValueError("Set BEiT's vocab_size (pretraining) or num_classes (fine-tuning), not both")
        arch = self.arch()
        vit.check_images(images, self.in_channels, arch["patch_size"])
        width, heads = arch["width"], arch["num_heads"]

        x = layers.PatchEmbed(width, arch["patch_size"], dtype=self.dtype, name="embedding")(
            images.astype(self.dtype))
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, width)
        use_mask_token = self.vocab_size is not None if self.use_mask_token is None else self.use_mask_token
        if use_mask_token:
            token = self.param("mask_token", nn.with_logical_partitioning(
                nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, width))
            if bool_masked_pos is not None:
                if bool_masked_pos.shape != (b, h * w):
                    raise ValueError(f"bool_masked_pos must be shaped (batch, num_patches) = {(b, h * w)}, "
                                     f"got {bool_masked_pos.shape}")
                x = jnp.where(bool_masked_pos[..., None], token.astype(x.dtype), x)
        elif bool_masked_pos is not None:
            raise ValueError("bool_masked_pos needs a mask token: set vocab_size or use_mask_token=True")
        cls = self.param("cls", nn.with_logical_partitioning(
            nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, 1, width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, width)), x], axis=1)
        if self.abs_posemb:
            x = layers.LearnedPosEmb(name="posemb")(x)
        x = layers.constrain(x, ("act_batch", "act_len", "act_emb"))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        bias = None
        if self.rel_pos == "shared":
            bias = layers.RelativePositionBias(heads, (h, w), name="rel_pos_bias")()
        block = self.block_config((h, w) if self.rel_pos == "layer" else None)
        x = layers.Stack(block, arch["depth"], scan=self.scan, remat_policy=self.remat_policy,
                         drop_path=self.drop_path, rescale_init=self.rescale_init,
                         name="encoder")(x, None, bias, deterministic=not train)

        head_init = nn.initializers.truncated_normal(0.02 * self.head_init_scale)   # BEiT's init
        if self.num_classes is not None:           # fine-tuning: mean-pool patches, then norm
            pooled = layers.LayerNorm(self.ln_eps, name="norm")(x[:, 1:].mean(axis=1))
            logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                              kernel_init=layers.dense_init(("embed", "classes"), head_init),
                              bias_init=layers.dense_init(("classes",), nn.initializers.zeros))(pooled)
            return {"tokens": x.astype(jnp.float32), "pooled": pooled.astype(jnp.float32),
                    "logits": logits.astype(jnp.float32)}
        x = layers.LayerNorm(self.ln_eps, name="norm")(x)
        if self.vocab_size is None:
            return {"tokens": x.astype(jnp.float32)}
        logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="head",
                          kernel_init=layers.dense_init(("embed", "vocab"), head_init),
                          bias_init=layers.dense_init(("vocab",), nn.initializers.zeros))(x[:, 1:])
        logits = layers.constrain(logits, ("act_batch", "act_len", None)).astype(jnp.float32)
        return {"tokens": x.astype(jnp.float32), "logits": logits}


def forward_flops(model: BEiT, image_hw: tuple[int, int]) -> dict[str, float]:
    """Analytic forward FLOPs per image (mmjax.flops), by part: the ViT-style backbone, the
    relative position bias added to every layer's attention scores (one add per score; the
    table look-up itself is free), and the visual-token head on every patch or the classifier
    on the pooled vector."""
    arch = model.arch()
    patch, width, depth = arch["patch_size"], arch["width"], arch["depth"]
    grid = (image_hw[0] // patch[0], image_hw[1] // patch[1])
    patches = grid[0] * grid[1]
    tokens = 1 + patches
    out = {"patch_embed": flops.patch_embed(image_hw, patch, model.in_channels, width),
           **flops.transformer_blocks(tokens, width, depth, arch["mlp_dim"]),
           "rel_pos_bias": 0.0 if model.rel_pos == "none" else float(depth * arch["num_heads"] * tokens * tokens)}
    if model.vocab_size is not None:
        out["head"] = flops.dense(patches, width, model.vocab_size)
    elif model.num_classes is not None:
        out["head"] = flops.dense(1, width, model.num_classes)
    return out
