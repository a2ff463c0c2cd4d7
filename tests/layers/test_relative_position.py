"""BEiT's relative position table resizing against timm."""

import numpy as np
import pytest
import torch

from mmjax import layers


@pytest.mark.parametrize("old, new", [(14, 24), (7, 12), (14, 10), (14, 14)])
def test_relative_position_table_resize_matches_timm(old, new):
    """BEiT's geometric resampling of a relative position table to another window: the linear
    variant equals timm's resize_rel_pos_bias_table (what timm does without scipy's interp2d);
    the default bicubic one reproduces smooth tables closely and keeps the three [CLS] rows."""
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    rng = np.random.default_rng(old + new)
    table = rng.normal(size=((2 * old - 1) ** 2 + 3, 4)).astype(np.float32)
    want = resize_rel_pos_bias_table(torch.from_numpy(table), (new, new), ((2 * new - 1) ** 2 + 3, 4)).numpy()
    got = layers.resize_relative_position_table(table, (new, new), method="linear")
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)

    offsets = np.arange(-(old - 1), old)
    smooth = np.sin(offsets[:, None, None] / 4 + np.arange(4)) * np.cos(offsets[None, :, None] / 6)
    smooth = np.concatenate([smooth.reshape(-1, 4), table[-3:]]).astype(np.float32)
    cubic, linear = (layers.resize_relative_position_table(np.stack([smooth, 2 * smooth]), (new, new), method=m)
                     for m in ("cubic", "linear"))
    np.testing.assert_allclose(cubic[1], 2 * cubic[0], atol=1e-5)       # leading (layer) axes
    np.testing.assert_allclose(cubic[0], linear[0], atol=2e-2)
    np.testing.assert_array_equal(cubic[0, -3:], table[-3:])
    with pytest.raises(ValueError, match="relative position table"):
        layers.resize_relative_position_table(table[:-1], (new, new))
