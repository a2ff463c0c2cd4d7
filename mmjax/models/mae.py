"""Masked autoencoder (He et al. 2022): a ViT encoder over the visible patches, a light decoder.

`MAE(variant="B/16")` is the paper's `mae_vit_base_patch16_dec512d8b`. Random masking keeps
the patches with the smallest `noise` (argsort, as the reference), so passing the same noise
gives the same mask as `transformers`' ViTMAE. The encoder's parameters (`embedding`, `cls`,
`encoder`, `norm`) carry the same names as `vit.ViT(pool="cls", posemb="sincos2d")`, so a
pretrained MAE encoder is a ViT checkpoint (drop the `decoder*` / `mask_token` entries).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers
from mmjax.models import vit

# Decoder shape shared by every paper variant: 512 wide, 8 blocks, 16 heads, MLP ratio 4.
DECODER = dict(decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) → (B, h*w, patch*patch*C), pixels ordered (row, column, channel) as MAE."""
    b, height, width, c = images.shape
    if height % patch or width % patch:
        raise ValueError(f"Image size {(height, width)} is not divisible by the patch size {patch}")
    h, w = height // patch, width // patch
    x = images.reshape(b, h, patch, w, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
    """Inverse of `patchify`: (B, h*w, patch*patch*C) → (B, h*patch, w*patch, C)."""
    b, n, d = patches.shape
    h, w = grid
    c = d // (patch * patch)
    if n != h * w or c * patch * patch != d:
        raise ValueError(f"Cannot unpatchify {patches.shape} into a {grid} grid of {patch}-px patches")
    x = patches.reshape(b, h, w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, c)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: int(N * (1 - ratio)), the reference's rounding."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(x: jax.Array, noise: jax.Array, mask_ratio: float):
    """Keeps, per example, the tokens with the smallest noise.

    Returns (visible tokens (B, keep, D), mask (B, N) with 1 = masked, ids_restore (B, N)).
    """
    b, n, _ = x.shape
    if noise.shape != (b, n):
        raise ValueError(f"noise must be shaped (batch, num_patches) = {(b, n)}, got {noise.shape}")
    keep = num_visible(n, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    visible = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)
    mask = (ids_restore >= keep).astype(jnp.float32)
    return visible, mask, ids_restore


class MAE(nn.Module):
    """MAE encoder + decoder. `__call__` returns {"pred", "mask", "ids_restore", "tokens"}."""

    variant: str | None = None
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    decoder_width: int = DECODER["decoder_width"]
    decoder_depth: int = DECODER["decoder_depth"]
    decoder_heads: int = DECODER["decoder_heads"]
    decoder_mlp_dim: int = DECODER["decoder_mlp_dim"]
    mask_ratio: float = 0.75
    drop_path: float = 0.0          # encoder stochastic depth (MAE pretraining uses none)
    in_channels: int = 3
    ln_eps: float = 1e-6
    act: str = "gelu"
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    block: dict | layers.BlockConfig | None = None   # BlockConfig overrides of encoder and decoder blocks

    def arch(self) -> dict:
        return vit.resolve_arch(self)

    def block_config(self, decoder: bool = False) -> layers.BlockConfig:
        """The encoder's (or decoder's) block: this model's fields, then the `block` overrides."""
        arch = self.arch()
        heads, mlp_dim = ((self.decoder_heads, self.decoder_mlp_dim) if decoder
                          else (arch["num_heads"], arch["mlp_dim"]))
        return layers.block_config(self.block, num_heads=heads, mlp_dim=mlp_dim, mlp=self.act,
                                   norm_eps=self.ln_eps, dtype=self.dtype, attention_impl=self.attention_impl)

    def setup(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        arch = self.arch()
        if arch["patch_size"][0] != arch["patch_size"][1]:
            raise ValueError(f"MAE needs square patches, got {arch['patch_size']}")
        self.patch = arch["patch_size"][0]
        self.embedding = layers.PatchEmbed(arch["width"], arch["patch_size"], dtype=self.dtype)
        self.cls = self.param("cls", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, arch["width"]))
        stack = dict(scan=self.scan, remat_policy=self.remat_policy)
        self.encoder = layers.Stack(self.block_config(), arch["depth"], drop_path=self.drop_path, **stack)
        self.norm = layers.LayerNorm(self.ln_eps)
        self.decoder_embed = nn.Dense(
            self.decoder_width, dtype=self.dtype, kernel_init=layers.dense_init(("embed", "mlp")),
            bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))
        self.mask_token = self.param("mask_token", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, self.decoder_width))
        self.decoder = layers.Stack(self.block_config(decoder=True), self.decoder_depth, **stack)
        self.decoder_norm = layers.LayerNorm(self.ln_eps)
        self.decoder_pred = nn.Dense(
            self.patch * self.patch * self.in_channels, dtype=self.dtype,
            kernel_init=layers.dense_init(("embed", None)),
            bias_init=layers.dense_init((None,), nn.initializers.zeros))

    def _patch_tokens(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        vit.check_images(images, self.in_channels, (self.patch, self.patch))
        x = self.embedding(images.astype(self.dtype))
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d) + layers.sincos_2d((h, w), d).astype(x.dtype)
        return x, (h, w)

    def _encode_tokens(self, x: jax.Array, train: bool) -> jax.Array:
        cls = jnp.broadcast_to(self.cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        x = layers.constrain(x, ("act_batch", "act_len", "act_emb"))
        return self.norm(self.encoder(x, deterministic=not train))

    def features(self, images: jax.Array) -> jax.Array:
        """The encoder on all patches, no masking: (B, 1 + N, width) normed tokens ([CLS] first)."""
        x, _ = self._patch_tokens(images)
        return self._encode_tokens(x, train=False).astype(jnp.float32)

    def encode(self, images: jax.Array, noise: jax.Array | None = None, *, train: bool = False):
        """Encodes the visible patches: (latent (B, 1 + keep, width), mask, ids_restore).

        `noise` (B, N) decides the mask (smallest values are kept); without it, uniform noise
        is drawn from the "masking" rng stream.
        """
        x, _ = self._patch_tokens(images)
        if noise is None:
            if not self.has_rng("masking"):
                raise ValueError("MAE needs `noise` (batch, num_patches) or a 'masking' rng")
            noise = jax.random.uniform(self.make_rng("masking"), x.shape[:2])
        x, mask, ids_restore = random_masking(x, noise, self.mask_ratio)
        return self._encode_tokens(x, train), mask, ids_restore

    def decode(self, latent: jax.Array, ids_restore: jax.Array, grid: tuple[int, int] | None = None, *,
               train: bool = False) -> jax.Array:
        """Decoder over visible latents + mask tokens in original order: (B, N, patch²·C).

        `grid` is the (h, w) patch grid; None means square."""
        x = self.decoder_embed(latent.astype(self.dtype))
        b, n = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, n + 1 - x.shape[1], x.shape[-1]))
        patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
        grid = grid or (round(n ** 0.5),) * 2
        if grid[0] * grid[1] != n:
            raise ValueError(f"{n} patches do not form a {grid[0]}x{grid[1]} grid; pass the grid to decode")
        pos = jnp.concatenate([jnp.zeros((1, 1, x.shape[-1])), layers.sincos_2d(tuple(grid), x.shape[-1])], 1)
        x = jnp.concatenate([x[:, :1], patches], axis=1) + pos.astype(x.dtype)
        x = layers.constrain(x, ("act_batch", "act_len", "act_emb"))
        x = self.decoder_norm(self.decoder(x, deterministic=not train))
        return self.decoder_pred(x.astype(self.dtype))[:, 1:].astype(jnp.float32)

    def __call__(self, images: jax.Array, noise: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        """A dict (mmjax.models.outputs): "pred" (B, N, patch²·C), "mask" (B, N) 1 = masked,
        "ids_restore" (B, N), "tokens" the encoded [CLS] + visible patches (B, 1 + keep, width)."""
        latent, mask, ids_restore = self.encode(images, noise, train=train)
        grid = (images.shape[1] // self.patch, images.shape[2] // self.patch)
        pred = self.decode(latent, ids_restore, grid, train=train)
        return {"pred": pred, "mask": mask, "ids_restore": ids_restore, "tokens": latent.astype(jnp.float32)}


def forward_flops(model: MAE, image_hw: tuple[int, int]) -> dict[str, float]:
    """Analytic forward FLOPs per image (mmjax.flops), by part: every patch is embedded, the
    encoder sees [CLS] + the visible patches, the decoder [CLS] + all patches (masked ones as
    mask tokens), and the pixel head runs on all of its tokens. The same in training and
    evaluation: MAE always masks."""
    arch = model.arch()
    patch, width = arch["patch_size"], arch["width"]
    grid = (image_hw[0] // patch[0], image_hw[1] // patch[1])
    patches = grid[0] * grid[1]
    visible = 1 + num_visible(patches, model.mask_ratio)
    return {"patch_embed": flops.patch_embed(image_hw, patch, model.in_channels, width),
            **flops.transformer_blocks(visible, width, arch["depth"], arch["mlp_dim"]),
            "decoder_embed": flops.dense(visible, width, model.decoder_width),
            **flops.transformer_blocks(1 + patches, model.decoder_width, model.decoder_depth,
                                       model.decoder_mlp_dim, name="decoder_blocks"),
            "decoder_pred": flops.dense(1 + patches, model.decoder_width, patch[0] * patch[1] * model.in_channels)}
