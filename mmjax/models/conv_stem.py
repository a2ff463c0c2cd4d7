"""Convolutional stem for ViTs (Xiao et al. 2021, "Early Convolutions Help Transformers See Better").

A few stride-2 3×3 convolutions replace most of the patchify step; a last k×k stride-k
convolution reaches the patch size. Same token grid and width as `layers.PatchEmbed`, but the
network learns local shape features much sooner, which matters most for small models and
short schedules. LayerNorm stands in for the paper's BatchNorm so the stem keeps no state.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers


class ConvStem(nn.Module):
    """NHWC images -> (B, H/patch, W/patch, width) through `len(channels)` stride-2 convolutions.

    `depth` convolutions per stage: the stage's stride-2 one, then `depth - 1` of stride 1 that see
    the halved map again (more local shape capacity for few FLOPs on small images)."""

    width: int
    patch_size: tuple[int, int]
    channels: tuple[int, ...]
    depth: int = 1
    dtype: layers.Dtype = jnp.float32

    def last_kernel(self) -> tuple[int, int]:
        """Kernel (= stride) of the projection that takes the halved maps to the patch grid."""
        reduction = 2 ** len(self.channels)
        if self.patch_size[0] % reduction or self.patch_size[1] % reduction:
            raise ValueError(f"A conv stem of {len(self.channels)} stride-2 layers needs a patch size "
                             f"divisible by {reduction}, got {self.patch_size}")
        return self.patch_size[0] // reduction, self.patch_size[1] // reduction

    def conv_layers(self) -> list[tuple[int, int]]:
        """(channels, stride) of each 3×3 convolution, in order: per stage one stride-2, then stride 1."""
        if self.depth < 1:
            raise ValueError(f"A conv stem needs depth >= 1 convolutions per stage, got {self.depth}")
        return [(c, 2 if j == 0 else 1) for c in self.channels for j in range(self.depth)]

    def count_flops(self, image_hw: tuple[int, int], in_channels: int) -> float:
        """Forward FLOPs per image: the 3×3 convolutions (SAME padding) and the projection."""
        hw, count = tuple(image_hw), 0.0
        for c, stride in self.conv_layers():
            count += flops.conv(hw, (3, 3), in_channels, c, stride=stride)
            hw, in_channels = (-(-hw[0] // stride), -(-hw[1] // stride)), c
        return count + flops.patch_embed(hw, self.last_kernel(), in_channels, self.width)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        last = self.last_kernel()
        x = images
        for i, (c, stride) in enumerate(self.conv_layers()):
            x = nn.Conv(c, (3, 3), strides=(stride, stride), padding="SAME", use_bias=False, dtype=self.dtype,
                        name=f"conv{i}",
                        kernel_init=layers.dense_init((None, None, None, None), nn.initializers.he_normal()))(x)
            x = nn.gelu(nn.LayerNorm(1e-6, dtype=jnp.float32, name=f"norm{i}")(x)).astype(self.dtype)
        return nn.Conv(self.width, last, strides=last, padding="VALID", dtype=self.dtype, name="proj",
                       kernel_init=layers.dense_init((None, None, None, "embed"), nn.initializers.lecun_normal()),
                       bias_init=layers.dense_init(("embed",), nn.initializers.zeros))(x)
