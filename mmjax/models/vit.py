"""Vision Transformer (Dosovitskiy et al. 2021) with big_vision's variants table.

`ViT(variant="B/16")` expands to width/depth/mlp/heads/patch; any field can be overridden.
`__call__` returns a dict (mmjax.models.outputs): "tokens" (the encoded sequence: [CLS], register
tokens, patches), "pooled" (the pre-logits, never from the registers; not with `pool="none"`) and
"logits" when `num_classes` is set.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers
from mmjax.models import conv_stem

# name: (width, depth, mlp_dim, num_heads)
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}
POOLS = ("cls", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d")
# Which prefix tokens a learned position embedding covers besides the patches: "all" (class token
# and registers: timm's default), "cls" (the class token, not the registers: DINOv2 and transformers'
# Dinov2WithRegisters) or "none" (patches only: timm's no_embed_class, DeiT-3, timm's register ViTs).
PREFIX_POSEMBS = ("all", "cls", "none")


def parse_variant(variant: str) -> dict:
    """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or (patch and not patch.isdigit()):
        raise ValueError(f"Unknown ViT variant {variant!r}; use NAME[/PATCH] with NAME in {list(VARIANTS)}")
    width, depth, mlp_dim, num_heads = VARIANTS[name]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if patch:
        out["patch_size"] = int(patch)
    return out


ARCH_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


def resolve_arch(module) -> dict:
    """The architecture of a ViT-like module (ViT, BEiT, MAE encoder): its `variant`'s values with
    explicit `ARCH_FIELDS` overriding them; the patch size as an (h, w) tuple."""
    arch = parse_variant(module.variant) if module.variant else {}
    for key in ARCH_FIELDS:
        if getattr(module, key) is not None:
            arch[key] = getattr(module, key)
    missing = [k for k in ARCH_FIELDS if k not in arch]
    if missing:
        raise ValueError(f"{type(module).__name__} needs a variant or explicit {missing}")
    patch = arch["patch_size"]
    arch["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return arch


def check_images(images: jax.Array, channels: int, patch: tuple[int, int]) -> None:
    """Raises a clear error for inputs that are not NHWC float images divisible into patches."""
    if images.ndim != 4 or images.shape[-1] != channels:
        raise ValueError(f"ViT expects NHWC images with {channels} channels, got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"ViT expects floating-point images (normalised), got dtype {images.dtype}")
    if images.shape[1] % patch[0] or images.shape[2] % patch[1]:
        raise ValueError(f"Image size {images.shape[1:3]} is not divisible by the patch size {patch}")


def kept_patches(num_patches: int, drop_ratio: float) -> int:
    """Patches that FLIP-style patch dropping keeps (at least one)."""
    return max(1, int(num_patches * (1.0 - drop_ratio)))


def drop_patches(rng: jax.Array, x: jax.Array, num_prefix: int, drop_ratio: float) -> jax.Array:
    """Keeps a random subset of each example's patch tokens (FLIP, Li et al. 2023).

    x is (B, prefix + patches, D) with position embeddings already added; the prefix ([CLS])
    is always kept. Each example draws its own subset, so the encoder's cost drops with it.
    """
    b, n, _ = x.shape
    keep = kept_patches(n - num_prefix, drop_ratio)
    _, ids = jax.lax.top_k(jax.random.uniform(rng, (b, n - num_prefix)), keep)
    kept = jnp.take_along_axis(x[:, num_prefix:], ids[..., None], axis=1)
    return jnp.concatenate([x[:, :num_prefix], kept], axis=1)


def without_registers(x: jax.Array, num_cls: int, num_registers: int) -> jax.Array:
    """The class token (if any) and patch tokens of [class token, registers, patches]: registers
    only carry computation (Darcet et al. 2024) and, as in timm, no pooling sees them."""
    if not num_registers:
        return x
    return jnp.concatenate([x[:, :num_cls], x[:, num_cls + num_registers:]], axis=1)


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned probe attends over the tokens."""

    num_heads: int
    mlp_dim: int
    ln_eps: float = 1e-6
    dtype: layers.Dtype = jnp.float32
    act: str = "gelu"               # the tower's activation, as timm, transformers and big_vision use

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        probe = self.param("probe", nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, x.shape[-1]))
        probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = layers.Attention(self.num_heads, dtype=self.dtype, name="attn")(probe, x)
        y = layers.LayerNorm(self.ln_eps, name="ln")(x)
        x = x + layers.Mlp(self.mlp_dim, act=self.act, dtype=self.dtype, name="mlp")(y)
        return x[:, 0]


class ViT(nn.Module):
    """ViT image encoder / classifier."""

    variant: str | None = None
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    pool: str = "cls"
    class_token: bool | None = None  # default: only with pool="cls"; "gap" then averages patches only (MAE FT)
    num_registers: int = 0          # learned register tokens after the class token (Darcet et al. 2024)
    posemb: str = "learn"
    prefix_posemb: str = "all"      # learned posemb of the prefix tokens too: PREFIX_POSEMBS
    pre_norm: bool = False          # CLIP's ln_pre before the blocks
    fc_norm: bool = False           # norm the pooled vector instead of all tokens
    patch_bias: bool = True
    conv_stem: tuple[int, ...] = ()  # channels of stride-2 3x3 convs before patchify; () = plain patchify
    conv_stem_depth: int = 1        # 3x3 convs per stem stage (the first strided)
    num_classes: int | None = None
    representation_size: int | None = None
    head_zero_init: bool = True
    head_bias_init: float = 0.0
    dropout: float = 0.0
    drop_path: float = 0.0          # stochastic depth of the last block; 0 → 1st block (timm rule)
    patch_drop_ratio: float = 0.0   # FLIP: drop this share of patch tokens in training only
    act: str = "gelu"
    ln_eps: float = 1e-6
    layer_scale: float | None = None
    qkv_bias: bool | str = True     # "qv": q and v biases, no k bias (EVA; softmax cancels a k bias)
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    block: dict | layers.BlockConfig | None = None   # BlockConfig overrides, e.g. dict(norm="post")

    def arch(self) -> dict:
        return resolve_arch(self)

    def block_config(self) -> layers.BlockConfig:
        """The encoder's block: this model's fields, then the `block` overrides."""
        arch = self.arch()
        if self.qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias must be True, False or 'qv' (no key bias), got {self.qkv_bias!r}")
        bias = bool(self.qkv_bias)
        return layers.block_config(
            self.block, num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"], mlp=self.act, norm_eps=self.ln_eps,
            q_bias=bias, k_bias=self.qkv_bias is True, v_bias=bias, out_bias=bias,
            layer_scale=self.layer_scale, dropout=self.dropout, dtype=self.dtype,
            attention_impl=self.attention_impl)

    def _prefix_tokens(self, name: str, count: int, batch: int, width: int, dtype) -> list[jax.Array]:
        """A learned (B, count, D) prefix ([CLS]: zeros; registers: timm's normal(1e-6)); [] if count is 0."""
        if not count:
            return []
        init = nn.initializers.zeros if name == "cls" else nn.initializers.normal(1e-6)
        tokens = self.param(name, nn.with_logical_partitioning(init, (None, None, "embed")), (1, count, width))
        return [jnp.broadcast_to(tokens.astype(dtype), (batch, count, width))]

    def _embed_positions(self, x: jax.Array, grid: tuple[int, int], use_cls: bool) -> jax.Array:
        """(B, h*w, D) patches -> [class token, registers, patches] with the position embedding added
        to the tokens `posemb` and `prefix_posemb` say (the order and rules of timm's `_pos_embed`)."""
        b, _, width = x.shape
        cls = self._prefix_tokens("cls", int(use_cls), b, width, x.dtype)
        registers = self._prefix_tokens("registers", self.num_registers, b, width, x.dtype)
        if self.posemb == "sincos2d":
            return jnp.concatenate([*cls, *registers, x + layers.sincos_2d(grid, width).astype(x.dtype)], axis=1)
        posemb = layers.LearnedPosEmb(name="posemb")
        if self.prefix_posemb == "none":
            return jnp.concatenate([*cls, *registers, posemb(x)], axis=1)
        if self.prefix_posemb == "cls":
            x = posemb(jnp.concatenate([*cls, x], axis=1))
            return jnp.concatenate([x[:, :len(cls)], *registers, x[:, len(cls):]], axis=1)
        return posemb(jnp.concatenate([*cls, *registers, x], axis=1))

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        if self.pool not in POOLS:
            raise ValueError(f"Unknown pool {self.pool!r}; known: {POOLS}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"Unknown posemb {self.posemb!r}; known: {POSEMBS}")
        if self.prefix_posemb not in PREFIX_POSEMBS:
            raise ValueError(f"Unknown prefix_posemb {self.prefix_posemb!r}; known: {PREFIX_POSEMBS}")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
        if not 0.0 <= self.patch_drop_ratio < 1.0:
            raise ValueError(f"patch_drop_ratio must be in [0, 1), got {self.patch_drop_ratio}")
        use_cls = self.pool == "cls" if self.class_token is None else self.class_token
        if self.pool == "cls" and not use_cls:
            raise ValueError("pool='cls' needs class_token=True (or None)")
        arch = self.arch()
        check_images(images, self.in_channels, arch["patch_size"])
        width = arch["width"]

        if self.conv_stem:
            x = conv_stem.ConvStem(width, arch["patch_size"], tuple(self.conv_stem),
                                   self.conv_stem_depth, dtype=self.dtype, name="stem")(images.astype(self.dtype))
        else:
            x = layers.PatchEmbed(width, arch["patch_size"], use_bias=self.patch_bias, dtype=self.dtype,
                                  name="embedding")(images.astype(self.dtype))
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, width)
        x = self._embed_positions(x, (h, w), use_cls)
        if train and self.patch_drop_ratio > 0:   # uses the "dropout" rng stream, as FLIP does
            x = drop_patches(self.make_rng("dropout"), x, int(use_cls) + self.num_registers, self.patch_drop_ratio)
        if self.pre_norm:
            x = layers.LayerNorm(self.ln_eps, name="ln_pre")(x)
        x = layers.constrain(x, ("act_batch", "act_len", "act_emb"))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        x = layers.Stack(self.block_config(), arch["depth"], scan=self.scan, remat_policy=self.remat_policy,
                         drop_path=self.drop_path, name="encoder")(x, deterministic=not train)
        if not self.fc_norm:
            x = layers.LayerNorm(self.ln_eps, name="norm")(x)
        out = {"tokens": x.astype(jnp.float32)}

        if self.pool == "none":
            return out
        x = without_registers(x, int(use_cls), self.num_registers)
        if self.pool == "cls":
            x = x[:, 0]
        elif self.pool == "gap":
            x = x[:, int(use_cls):].mean(axis=1)
        else:
            x = MAPHead(arch["num_heads"], arch["mlp_dim"], self.ln_eps, self.dtype, self.act, name="map")(x)
        if self.fc_norm:
            x = layers.LayerNorm(self.ln_eps, name="norm")(x)
        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits",
                                 kernel_init=layers.dense_init(("embed", "mlp")),
                                 bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))(x))
        out["pooled"] = x.astype(jnp.float32)
        if self.num_classes is None:
            return out
        kernel_init = nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                          kernel_init=layers.dense_init(("embed", "classes"), kernel_init),
                          bias_init=layers.dense_init(("classes",), nn.initializers.constant(self.head_bias_init)))(x)
        out["logits"] = logits.astype(jnp.float32)
        return out


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs (mmjax.flops): checked against XLA's count in tests/test_flops.py
# ---------------------------------------------------------------------------------------------

def tokens_seen(model: ViT, image_hw: tuple[int, int], train: bool = False) -> int:
    """Tokens the encoder sees: kept patches (patch dropping in training) plus [CLS] and registers."""
    patch = model.arch()["patch_size"]
    patches = (image_hw[0] // patch[0]) * (image_hw[1] // patch[1])
    if train:
        patches = kept_patches(patches, model.patch_drop_ratio)
    class_token = model.class_token
    return patches + int(model.pool == "cls" if class_token is None else class_token) + model.num_registers


def patch_embed_flops(model: ViT, image_hw: tuple[int, int]) -> float:
    """The patchify convolution, or the conv stem (its own count). Also used for ViLT's image side."""
    patch, width = model.arch()["patch_size"], model.arch()["width"]
    if model.conv_stem:
        stem = conv_stem.ConvStem(width, patch, tuple(model.conv_stem), model.conv_stem_depth)
        return stem.count_flops(tuple(image_hw), model.in_channels)
    return flops.patch_embed(tuple(image_hw), patch, model.in_channels, width)


def forward_flops(model: ViT, image_hw: tuple[int, int], train: bool = False) -> dict[str, float]:
    """Forward FLOPs per image, by part. `train` applies patch dropping."""
    arch = model.arch()
    width, mlp_dim = arch["width"], arch["mlp_dim"]
    tokens = tokens_seen(model, image_hw, train)
    out = {"patch_embed": patch_embed_flops(model, image_hw),
           **flops.transformer_blocks(tokens, width, arch["depth"], mlp_dim)}
    head = 0.0
    if model.pool == "map":   # one query attending over all tokens, then an MLP
        head += 2 * flops.dense(1, width, width) + 2 * flops.dense(tokens, width, width)
        head += flops.attention(1, tokens, width) + 2 * flops.dense(1, width, mlp_dim)
    features = width
    if model.representation_size is not None:
        head += flops.dense(1, width, model.representation_size)
        features = model.representation_size
    if model.num_classes is not None:
        head += flops.dense(1, features, model.num_classes)
    out["head"] = head
    return out
