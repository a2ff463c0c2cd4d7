"""Position-embedding helpers against formulas, open_clip's MAE-style sin-cos table and torch's
bilinear interpolation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax import layers


def test_sincos_2d_formula_at_known_positions():
    h, w, width = 3, 5, 16
    pe = layers.sincos_2d((h, w), width)
    assert pe.shape == (1, h * w, width)
    quarter = width // 4
    omega = 1.0 / 10_000.0 ** (np.arange(quarter) / quarter)
    # Position 0 is (row 0, col 0): sin(0)=0 and cos(0)=1 in each quarter.
    np.testing.assert_allclose(pe[0, 0], np.tile(np.r_[np.zeros(quarter), np.ones(quarter)], 2),
                               atol=1e-7)
    for row, col in [(0, 1), (1, 0), (2, 4), (1, 3)]:
        want = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                               np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(pe[0, row * w + col], want, atol=1e-6)
    # Unique rows; bounded values.
    assert len(np.unique(np.round(pe[0], 5), axis=0)) == h * w
    assert np.abs(pe).max() <= 1.0
    with pytest.raises(ValueError, match="divisible by 4"):
        layers.sincos_2d((2, 2), 6)


def test_sincos_2d_matches_open_clip_mae_table():
    """open_clip ships MAE's get_2d_sincos_pos_embed; for a square grid the tables agree."""
    from open_clip.pos_embed import get_2d_sincos_pos_embed
    for grid, width in [(4, 32), (7, 64)]:
        ref = get_2d_sincos_pos_embed(width, grid)
        np.testing.assert_allclose(layers.sincos_2d((grid, grid), width)[0], ref, atol=1e-6)


def test_resample_posemb_identity_and_prefix():
    rng = np.random.default_rng(9)
    posemb = jnp.asarray(rng.normal(size=(1, 1 + 16, 8)).astype(np.float32))
    same = layers.resample_posemb(posemb, (4, 4), num_prefix=1)
    np.testing.assert_allclose(np.asarray(same), np.asarray(posemb), atol=1e-6)

    bigger = layers.resample_posemb(posemb, (6, 6), num_prefix=1)
    assert bigger.shape == (1, 1 + 36, 8) and bigger.dtype == posemb.dtype
    np.testing.assert_array_equal(np.asarray(bigger[:, :1]), np.asarray(posemb[:, :1]))

    rect = layers.resample_posemb(posemb[:, 1:], (2, 6), num_prefix=0)
    assert rect.shape == (1, 12, 8)
    # A constant grid stays constant under interpolation.
    const = jnp.ones((1, 9, 4)) * 3.0
    np.testing.assert_allclose(np.asarray(layers.resample_posemb(const, (5, 7))), 3.0, atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        layers.resample_posemb(posemb, (4, 4), num_prefix=0)   # 17 grid tokens: not square


def test_resample_posemb_upsample_matches_torch_bilinear():
    rng = np.random.default_rng(10)
    old, new, width, prefix = 7, (12, 10), 16, 1
    posemb = rng.normal(size=(1, prefix + old * old, width)).astype(np.float32)
    got = np.asarray(layers.resample_posemb(jnp.asarray(posemb), new, num_prefix=prefix))

    grid = torch.from_numpy(posemb[0, prefix:]).reshape(old, old, width).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(grid, size=new, mode="bilinear", align_corners=False,
                                          antialias=False)
    ref = ref[0].permute(1, 2, 0).reshape(1, new[0] * new[1], width).numpy()
    diff = np.abs(got[:, prefix:] - ref).max()
    print(f"resample_posemb vs torch bilinear (7x7 -> 12x10) max abs diff: {diff:.3g}")
    assert diff <= 1e-5
    np.testing.assert_array_equal(got[:, :prefix], posemb[:, :prefix])


def test_learned_posemb_length_check():
    module = layers.LearnedPosEmb()
    x = jnp.zeros((2, 5, 8))
    variables = module.init(jax.random.key(0), x)
    pe = np.asarray(nn.meta.unbox(variables["params"]["pos_embedding"]))
    assert pe.shape == (1, 5, 8)
    out = module.apply(variables, x + 1.0)
    np.testing.assert_allclose(np.asarray(out), 1.0 + pe.repeat(2, axis=0), atol=1e-7)
    with pytest.raises(ValueError, match="resample"):
        module.apply(variables, jnp.zeros((2, 6, 8)))
