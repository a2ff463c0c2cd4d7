"""ViLT (Kim et al. 2021): one transformer over words and image patches, no region features.

Composition: BERT's text embeddings (mmjax.models.bert.TextEmbeddings), ViT's patch embedding
with a [CLS] token and learned position embeddings, a modality-type embedding added to each side
(text 0, image 1), one pre-LN encoder of ViT-B blocks (LayerNorm eps 1e-12) over the
concatenation with the joint padding mask, a final LayerNorm and BERT's pooler (dense + tanh
on the first token). Heads, as transformers' ViltFor* classes: "mlm" (BERT's transform and a
decoder tied to the word embeddings, on the text tokens), "retrieval" (one linear score on the
pooled vector) and "vqa" (dense to 2x width, LayerNorm, GELU, dense to `num_answers`); "itm" is
the paper's pretraining ITM head (a linear to 2 classes, match = 1), which transformers lacks;
"pretrain" has both the "mlm" and the "itm" heads (same parameter names), as ViLT's pretraining.

Images: `ViLT` takes one batch of NHWC images of one size, every pixel valid. The stored
position grid (`image_size // patch`) is resampled bilinearly with aligned corners to the
image's patch grid, as transformers' `visual_embed` does, and every patch is kept (its
max_image_length=-1). Not supported: padded image batches with a pixel_mask, and patch sampling
(max_image_length >= 0, a training augmentation); ViLT's third modality type for the second
image of NLVR2 pairs is left out (image tokens always take type 1). `conv_stem` (not ViLT's; off
by default) puts the convolutional stem of Xiao et al. 2021 in place of the patch embedding, for
small models trained from scratch.

Returns a dict (mmjax.models.outputs): "tokens" (B, text + 1 + patches, D) normed, text first;
"pooled" (B, D) the pooler's output; "logits" with a head: (B, text, vocab) for "mlm",
(B, 2) for "itm", (B, 1) for "retrieval", (B, num_answers) for "vqa"; "pretrain" gives the MLM
"logits" and the ITM "itm_logits" of the same forward pass (under jit, an output a loss does not
use is not computed: ViLT's separate MLM and ITM passes each pay only for their own head).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import flops, layers
from mmjax.models import bert, conv_stem, vit

HEADS = ("none", "mlm", "itm", "retrieval", "vqa", "pretrain")
_NORMAL = nn.initializers.normal(0.02)      # ViLT's initializer_range


def _dense(features: int, name: str, dtype: layers.Dtype, axes=("embed", "mlp")) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name, kernel_init=layers.dense_init(axes, _NORMAL),
                    bias_init=layers.dense_init(axes[-1:], nn.initializers.zeros))


def align_corners_matrix(size_out: int, size_in: int) -> np.ndarray:
    """(size_out, size_in) weights of 1-D linear interpolation with aligned corners (torch's
    `interpolate(..., mode="bilinear", align_corners=True)` along one axis)."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    coord = np.arange(size_out) * scale
    low = np.clip(np.floor(coord).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = coord - low
    weights = np.zeros((size_out, size_in), np.float64)
    weights[np.arange(size_out), low] += 1.0 - frac
    weights[np.arange(size_out), high] += frac
    return weights.astype(np.float32)


def resample_grid(posemb: jax.Array, stored: tuple[int, int], grid: tuple[int, int]) -> jax.Array:
    """(1, stored_h*stored_w, D) grid position embeddings at another (h, w) grid, bilinear with
    aligned corners; the identity when the grids agree."""
    if tuple(stored) == tuple(grid):
        return posemb
    table = posemb.reshape(stored[0], stored[1], -1)
    rows, cols = align_corners_matrix(grid[0], stored[0]), align_corners_matrix(grid[1], stored[1])
    table = jnp.einsum("hH,wW,HWd->hwd", rows, cols, table.astype(jnp.float32), precision="highest")
    return table.reshape(1, grid[0] * grid[1], -1).astype(posemb.dtype)


class VqaHead(nn.Module):
    """ViLT's VQA classifier on the pooled vector: dense to 2x width, LayerNorm, GELU, dense."""

    num_answers: int
    ln_eps: float = 1e-5          # transformers' nn.LayerNorm default: the head ignores layer_norm_eps
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(2 * x.shape[-1], "fc1", self.dtype)(x)
        x = layers.activation("gelu")(layers.LayerNorm(self.ln_eps, name="ln")(x)).astype(self.dtype)
        return _dense(self.num_answers, "fc2", self.dtype, axes=("mlp", "classes"))(x)


class ViLT(nn.Module):
    """ViLT vision-and-language transformer (see the module docstring); `variant` is ViT's
    ("B/32": ViLT-B/32), any architecture field can be overridden."""

    variant: str | None = "B/32"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | tuple[int, int] | None = None
    image_size: int | tuple[int, int] = 384     # the stored position grid is image_size // patch
    in_channels: int = 3
    conv_stem: tuple[int, ...] = ()   # not ViLT's: stride-2 3x3 convs before patchify (mmjax.models.conv_stem)
    conv_stem_depth: int = 1          # 3x3 convs per stem stage (the first strided)
    vocab_size: int = 30522
    max_len: int = 40
    type_vocab_size: int = 2
    modality_types: int = 2
    ln_eps: float = 1e-12
    act: str = "gelu"
    dropout: float = 0.0
    head: str = "none"
    num_answers: int = 3129
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    block: dict | layers.BlockConfig | None = None   # BlockConfig overrides

    @nn.nowrap
    def arch(self) -> dict:
        return vit.resolve_arch(self)

    @nn.nowrap
    def stored_grid(self) -> tuple[int, int]:
        size = (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
        patch = self.arch()["patch_size"]
        return size[0] // patch[0], size[1] // patch[1]

    @nn.nowrap
    def block_config(self) -> layers.BlockConfig:
        arch = self.arch()
        return layers.block_config(self.block, num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"], norm="pre",
                                   norm_eps=self.ln_eps, mlp=self.act, dropout=self.dropout, dtype=self.dtype,
                                   attention_impl=self.attention_impl)

    @nn.compact
    def __call__(self, tokens: jax.Array, images: jax.Array, mask: jax.Array | None = None, *,
                 token_types: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
        """tokens (B, L) int ids; images (B, H, W, C) float, normalised; mask (B, L) True/1 at real
        tokens (the tokenizer's attention mask); token_types (B, L) BERT's segment ids (0)."""
        if self.head not in HEADS:
            raise ValueError(f"Unknown ViLT head {self.head!r}; known: {HEADS}")
        arch, width = self.arch(), self.arch()["width"]
        self._check(tokens, images, mask)
        text_embeddings = bert.TextEmbeddings(self.vocab_size, width, self.max_len, self.type_vocab_size,
                                              self.ln_eps, self.dropout, self.dtype, name="text_embeddings")
        modality = nn.Embed(self.modality_types, width, name="modality_embedding",
                            embedding_init=nn.with_logical_partitioning(_NORMAL, (None, "embed")))
        text = text_embeddings(tokens, token_types, jnp.arange(tokens.shape[1])[None], deterministic=not train)
        text = text + modality(jnp.zeros((), jnp.int32)).astype(text.dtype)
        image = self._image_tokens(images, width, train)
        image = image + modality(jnp.ones((), jnp.int32)).astype(image.dtype)
        x = jnp.concatenate([text, image.astype(text.dtype)], axis=1)
        text_valid = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        valid = jnp.concatenate([text_valid, jnp.ones(image.shape[:2], bool)], axis=1)

        x = layers.Stack(self.block_config(), arch["depth"], scan=self.scan, remat_policy=self.remat_policy,
                         name="encoder")(x, valid, deterministic=not train)
        x = layers.LayerNorm(self.ln_eps, name="ln_final")(x)
        pooled = jnp.tanh(_dense(width, "pooler", self.dtype)(x[:, 0]))
        out = {"tokens": x.astype(jnp.float32), "pooled": pooled.astype(jnp.float32)}
        if self.head in ("mlm", "pretrain"):
            head = bert.LMHead(self.act, self.ln_eps, self.dtype, name="lm_head")
            out["logits"] = head(x[:, :tokens.shape[1]], text_embeddings).astype(jnp.float32)
        if self.head in ("itm", "pretrain"):
            itm = _dense(2, "itm_head", self.dtype, ("embed", "classes"))(pooled).astype(jnp.float32)
            out["itm_logits" if self.head == "pretrain" else "logits"] = itm
        if self.head == "retrieval":
            out["logits"] = _dense(1, "retrieval_head", self.dtype, ("embed", "classes"))(pooled).astype(jnp.float32)
        elif self.head == "vqa":
            out["logits"] = VqaHead(self.num_answers, dtype=self.dtype, name="vqa_head")(pooled).astype(jnp.float32)
        return out

    def _image_tokens(self, images: jax.Array, width: int, train: bool) -> jax.Array:
        """[CLS] + patch embeddings with (resampled) position embeddings: (B, 1 + h*w, D)."""
        if self.conv_stem:
            patches = conv_stem.ConvStem(width, self.arch()["patch_size"], tuple(self.conv_stem),
                                         self.conv_stem_depth, dtype=self.dtype, name="stem")(images.astype(self.dtype))
        else:
            patches = layers.PatchEmbed(width, self.arch()["patch_size"], dtype=self.dtype,
                                        name="patch_embed")(images.astype(self.dtype))
        b, h, w, _ = patches.shape
        stored = self.stored_grid()
        cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                         (1, 1, width))
        posemb = self.param("pos_embedding", nn.with_logical_partitioning(_NORMAL, (None, None, "embed")),
                            (1, 1 + stored[0] * stored[1], width))
        grid_pos = resample_grid(posemb[:, 1:], stored, (h, w))
        x = jnp.concatenate([jnp.broadcast_to(cls + posemb[:, :1], (b, 1, width)).astype(patches.dtype),
                             patches.reshape(b, h * w, width) + grid_pos.astype(patches.dtype)], axis=1)
        x = layers.constrain(x, layers.TOKENS)
        return nn.Dropout(self.dropout)(x, deterministic=not train)

    def _check(self, tokens: jax.Array, images: jax.Array, mask: jax.Array | None) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"ViLT expects integer token ids of shape (batch, length), got {tokens.dtype} "
                             f"{tokens.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed ViLT's {self.max_len} text positions (max_len)")
        vit.check_images(images, self.in_channels, self.arch()["patch_size"])
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"ViLT needs one image per text: {images.shape[0]} images for {tokens.shape[0]} texts")
        if mask is not None and mask.shape != tokens.shape:
            raise ValueError(f"The text mask has shape {mask.shape}; the tokens have {tokens.shape}")


def forward_flops(model: ViLT, text_len: int, image_hw: tuple[int, int]) -> dict[str, float]:
    """Analytic forward FLOPs per image-text pair (mmjax.flops), by part: the patch embedding, the
    blocks over text + [CLS] + patches, the pooler and the head."""
    arch = model.arch()
    width, patch = arch["width"], arch["patch_size"]
    tokens = text_len + 1 + (image_hw[0] // patch[0]) * (image_hw[1] // patch[1])
    parts = {"patch_embed": vit.patch_embed_flops(model, image_hw),
             **flops.transformer_blocks(tokens, width, arch["depth"], arch["mlp_dim"]),
             "pooler": flops.dense(1, width, width)}
    head = {"none": 0.0, "itm": flops.dense(1, width, 2), "retrieval": flops.dense(1, width, 1),
            "mlm": flops.dense(text_len, width, width) + flops.dense(text_len, width, model.vocab_size),
            "vqa": flops.dense(1, width, 2 * width) + flops.dense(1, 2 * width, model.num_answers)}
    head["pretrain"] = head["mlm"] + head["itm"]
    parts["head"] = head[model.head]
    return parts
