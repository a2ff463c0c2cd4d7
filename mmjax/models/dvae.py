"""The DALL-E discrete VAE (Ramesh et al. 2021) that BEiT uses as its image tokenizer.

`DVAEEncoder`: image → logits over an 8192-token codebook on a 1/8 grid (three 2× max-pools);
`tokenize` takes their argmax (no Gumbel noise), as BEiT does. `DVAEDecoder`: tokens → the
six-channel logit-Laplace statistics, `reconstruct` → an image in [0, 1]. Images are NHWC in
[0, 1]; `map_pixels` squeezes them into [ε, 1 - ε] (ε = 0.1) before encoding, as DALL-E.

Parameter names follow DALL-E's modules (`input`, `group_G_block_B/{id_path,conv_1..conv_4}`,
`output`), conv kernels HWIO, so OpenAI's and FLAVA's checkpoints map one to one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers

LOGIT_LAPLACE_EPS = 0.1
GROUPS = 4
# Channel multipliers of n_hid per group: the encoder widens, the decoder narrows.
ENCODER_WIDTHS = (1, 2, 4, 8)
DECODER_WIDTHS = (8, 4, 2, 1)


def map_pixels(x: jax.Array) -> jax.Array:
    """[0, 1] → [ε, 1 - ε], the range the logit-Laplace likelihood is defined on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: jax.Array) -> jax.Array:
    return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def conv(features: int, kernel: int, name: str, dtype: layers.Dtype, in_axis: str | None = "embed",
         out_axis: str | None = "mlp") -> nn.Conv:
    """A 'same'-padded conv with DALL-E's init: normal(0, 1/sqrt(fan_in)), zero bias."""
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    return nn.Conv(features, (kernel, kernel), padding="SAME", dtype=dtype, name=name,
                   kernel_init=layers.dense_init((None, None, in_axis, out_axis), init),
                   bias_init=layers.dense_init((out_axis,), nn.initializers.zeros))


class Block(nn.Module):
    """id_path(x) + (1 / n_layers²) · res_path(x); res_path = 4 × (ReLU, conv) with width/4 inside."""

    features: int
    num_layers: int
    kernels: tuple[int, int, int, int]       # encoder (3, 3, 3, 1), decoder (1, 3, 3, 3)
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.features // 4
        identity = x if x.shape[-1] == self.features else conv(self.features, 1, "id_path", self.dtype)(x)
        widths = (hidden, hidden, hidden, self.features)
        for i, (width, kernel) in enumerate(zip(widths, self.kernels)):
            x = conv(width, kernel, f"conv_{i + 1}", self.dtype)(nn.relu(x))
        return identity + x / self.num_layers ** 2


def _check_config(n_hid: int, blocks_per_group: int) -> None:
    if n_hid % 4 or n_hid < 4:
        raise ValueError(f"dVAE n_hid must be a positive multiple of 4, got {n_hid}")
    if blocks_per_group < 1:
        raise ValueError(f"dVAE blocks_per_group must be >= 1, got {blocks_per_group}")


class DVAEEncoder(nn.Module):
    """DALL-E encoder: [0, 1] images (B, H, W, C) → logits (B, H/8, W/8, vocab) in float32."""

    n_hid: int = 256
    blocks_per_group: int = 2
    vocab_size: int = 8192
    in_channels: int = 3
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _check_config(self.n_hid, self.blocks_per_group)
        if images.ndim != 4 or images.shape[-1] != self.in_channels or images.shape[1] % 8 or images.shape[2] % 8:
            raise ValueError(f"The dVAE encoder expects NHWC images with {self.in_channels} channels and "
                             f"sides divisible by 8, got shape {images.shape}")
        num_layers = GROUPS * self.blocks_per_group
        x = conv(self.n_hid, 7, "input", self.dtype, in_axis=None)(
            map_pixels(images.astype(jnp.float32)).astype(self.dtype))
        for g, mult in enumerate(ENCODER_WIDTHS):
            for b in range(self.blocks_per_group):
                x = Block(mult * self.n_hid, num_layers, (3, 3, 3, 1), self.dtype,
                          name=f"group_{g + 1}_block_{b + 1}")(x)
            if g < GROUPS - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        logits = conv(self.vocab_size, 1, "output", jnp.float32, out_axis="vocab")(
            nn.relu(x).astype(jnp.float32))
        return logits

    def tokenize(self, images: jax.Array) -> jax.Array:
        """Token ids (B, H/8, W/8) int32: the argmax of the logits."""
        return jnp.argmax(self(images), axis=-1).astype(jnp.int32)


class TokenInput(nn.Module):
    """DALL-E's input 1×1 conv over one-hot tokens, computed as a table lookup (ids) or a
    matmul (distributions); the kernel keeps the conv's (1, 1, vocab, n_init) shape."""

    features: int
    vocab_size: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        kernel = self.param("kernel", layers.dense_init((None, None, "vocab", "embed"), init),
                            (1, 1, self.vocab_size, self.features))[0, 0]
        bias = self.param("bias", layers.dense_init(("embed",), nn.initializers.zeros), (self.features,))
        if jnp.issubdtype(tokens.dtype, jnp.integer):
            if tokens.ndim != 3:
                raise ValueError(f"The dVAE decoder expects token ids shaped (B, h, w), got {tokens.shape}")
            return jnp.take(kernel, tokens, axis=0) + bias
        if tokens.ndim != 4 or tokens.shape[-1] != self.vocab_size:
            raise ValueError(f"The dVAE decoder expects token distributions shaped (B, h, w, "
                             f"{self.vocab_size}), got {tokens.shape}")
        return jnp.einsum("bhwv,vc->bhwc", tokens.astype(jnp.float32), kernel) + bias


class DVAEDecoder(nn.Module):
    """DALL-E decoder: token ids (B, h, w) or token distributions (B, h, w, vocab) → the
    (B, 8h, 8w, 2·C) logit-Laplace statistics (location logits first, then log-scales)."""

    n_init: int = 128
    n_hid: int = 256
    blocks_per_group: int = 2
    vocab_size: int = 8192
    out_channels: int = 3
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        _check_config(self.n_hid, self.blocks_per_group)
        num_layers = GROUPS * self.blocks_per_group
        x = TokenInput(self.n_init, self.vocab_size, name="input")(tokens).astype(self.dtype)
        for g, mult in enumerate(DECODER_WIDTHS):
            for b in range(self.blocks_per_group):
                x = Block(mult * self.n_hid, num_layers, (1, 3, 3, 3), self.dtype,
                          name=f"group_{g + 1}_block_{b + 1}")(x)
            if g < GROUPS - 1:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)      # nearest 2× upsampling
        stats = conv(2 * self.out_channels, 1, "output", jnp.float32, out_axis=None)(
            nn.relu(x).astype(jnp.float32))
        return stats

    def reconstruct(self, tokens: jax.Array) -> jax.Array:
        """Images (B, 8h, 8w, C) in [0, 1]: sigmoid of the location logits, unmapped."""
        return unmap_pixels(jax.nn.sigmoid(self(tokens)[..., :self.out_channels]))


def encoder_flops(model: DVAEEncoder, image_hw: tuple[int, int]) -> dict[str, float]:
    """Analytic forward FLOPs per image of the encoder (mmjax.flops), by part: the input 7×7
    conv, each group's blocks (an optional 1×1 identity projection, three 3×3 convs and a 1×1
    on width/4 channels inside) and the 1×1 codebook logits; max-pools and ReLUs are free."""
    hw = tuple(image_hw)
    out = {"input": flops.conv(hw, (7, 7), model.in_channels, model.n_hid)}
    channels = model.n_hid
    for g, mult in enumerate(ENCODER_WIDTHS):
        features = mult * model.n_hid
        hidden = features // 4
        count = 0.0
        for _ in range(model.blocks_per_group):
            if channels != features:
                count += flops.conv(hw, (1, 1), channels, features)
            count += flops.conv(hw, (3, 3), channels, hidden) + 2 * flops.conv(hw, (3, 3), hidden, hidden)
            count += flops.conv(hw, (1, 1), hidden, features)
            channels = features
        out[f"group_{g + 1}"] = count
        if g < GROUPS - 1:
            hw = (hw[0] // 2, hw[1] // 2)
    out["output"] = flops.conv(hw, (1, 1), channels, model.vocab_size)
    return out
