"""The convolutional ViT stem: same token grid as patchify, clear errors for bad patch sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import conv_stem, vit


def test_stem_gives_the_patch_grid_and_width():
    stem = conv_stem.ConvStem(width=48, patch_size=(8, 8), channels=(16, 32))
    images = jnp.ones((2, 32, 24, 3))
    variables = nn.unbox(stem.init(jax.random.key(0), images))
    out = stem.apply(variables, images)
    assert out.shape == (2, 4, 3, 48)
    # two stride-2 3x3 convs, then a 2x2 stride-2 projection to the width
    assert variables["params"]["conv0"]["kernel"].shape == (3, 3, 3, 16)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 16, 32)
    assert variables["params"]["proj"]["kernel"].shape == (2, 2, 32, 48)


def test_deeper_stages_add_stride_1_convs_and_their_flops():
    """depth=2: each stage is a stride-2 conv then a stride-1 one on the halved map; the analytic
    count the trainer logs matches XLA's for the whole stem."""
    stem = conv_stem.ConvStem(width=48, patch_size=(8, 8), channels=(16, 32), depth=2)
    images = jnp.ones((1, 32, 32, 3))
    variables = nn.unbox(stem.init(jax.random.key(0), images))
    assert stem.apply(variables, images).shape == (1, 4, 4, 48)
    kernels = [variables["params"][f"conv{i}"]["kernel"].shape for i in range(4)]
    assert kernels == [(3, 3, 3, 16), (3, 3, 16, 16), (3, 3, 16, 32), (3, 3, 32, 32)]
    model = vit.ViT(width=48, depth=1, mlp_dim=64, num_heads=2, patch_size=8, conv_stem=(16, 32), conv_stem_depth=2)
    xla = jax.jit(stem.apply).lower(variables, images).compile().cost_analysis()["flops"]
    convs = vit.patch_embed_flops(model, (32, 32))
    assert convs == pytest.approx(xla, rel=0.1)     # XLA also counts the norms and activations (6%)


def test_stem_output_is_local():
    """A pixel change moves only the tokens whose receptive field covers it."""
    stem = conv_stem.ConvStem(width=8, patch_size=(8, 8), channels=(4, 4, 4))
    images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    variables = stem.init(jax.random.key(0), images)
    changed = images.at[0, 60, 60].add(5.0)
    diff = np.abs(np.asarray(stem.apply(variables, changed) - stem.apply(variables, images))).sum(-1)[0]
    assert diff[7, 7] > 0
    assert np.all(diff[:6] == 0) and np.all(diff[:, :6] == 0)


def test_vit_with_conv_stem_classifies():
    model = vit.ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, conv_stem=(8, 16), num_classes=5)
    images = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    assert "stem" in variables["params"] and "embedding" not in variables["params"]
    assert model.apply(variables, images)["logits"].shape == (2, 5)


def test_stem_depth_below_one_is_an_error():
    with pytest.raises(ValueError, match="depth >= 1"):
        conv_stem.ConvStem(width=8, patch_size=(4, 4), channels=(4,), depth=0).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_patch_not_divisible_by_stem_reduction_is_an_error():
    model = vit.ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=6, conv_stem=(8, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3)))
