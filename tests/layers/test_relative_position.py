"""BEiT's relative position table resizing against timm, and against BEiT's own cubic interpolation."""

import numpy as np
import pytest
import torch

from mmjax import layers


class CubicInterp2d:
    """What BEiT's fine-tuning code calls, `scipy.interpolate.interp2d(x, y, z, kind='cubic')` on a
    rectangular grid (scipy removed it in 1.14): the interpolating tensor-product cubic spline with
    not-a-knot ends, which FITPACK's s=0 fit is, built here with `make_interp_spline` instead of
    FITPACK; `z` is indexed (y, x), calls take (x, y), and points outside the grid take the nearest
    edge value (interp2d's default extrapolation)."""

    def __init__(self, x, y, z, kind="cubic"):
        assert kind == "cubic"
        self.x, self.y, self.z = np.asarray(x, float), np.asarray(y, float), np.asarray(z, float)

    def __call__(self, x, y):
        from scipy.interpolate import make_interp_spline

        x = np.clip(np.asarray(x, float), self.x[0], self.x[-1])
        y = np.clip(np.asarray(y, float), self.y[0], self.y[-1])
        along_y = make_interp_spline(self.y, self.z, k=3, axis=0)(y)
        return make_interp_spline(self.x, along_y, k=3, axis=1)(x)


@pytest.mark.parametrize("old, new", [(14, 24), (7, 12), (14, 10), (14, 14)])
def test_relative_position_table_resize_matches_timm(old, new):
    """BEiT's geometric resampling of a relative position table to another window: the linear
    variant equals timm's resize_rel_pos_bias_table (what timm does without scipy's interp2d);
    the default bicubic one keeps the three [CLS] rows and works on leading (layer) axes."""
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
    np.testing.assert_allclose(cubic[0], linear[0], atol=2e-2)       # smooth tables: close to linear
    np.testing.assert_array_equal(cubic[0, -3:], table[-3:])
    with pytest.raises(ValueError, match="relative position table"):
        layers.resize_relative_position_table(table[:-1], (new, new))


@pytest.mark.parametrize("old, new", [(14, 24), (7, 12), (14, 10)])
def test_cubic_resize_is_beits_interp2d(old, new, monkeypatch):
    """The default ("cubic") resize equals BEiT's fine-tuning code path, run as timm ports it with
    scipy (geometric source offsets, interp2d(x, y, z, kind='cubic'), evaluated at (dx, dy)), with the
    removed interp2d supplied by CubicInterp2d. On random tables any difference in the offsets, the
    spline or the extrapolation shows (measured: equal in float32; linear is off by 0.9-4.8)."""
    import timm.layers.pos_embed_rel as timm_rel
    from scipy import interpolate

    monkeypatch.setattr(timm_rel, "_USE_SCIPY", True)
    monkeypatch.setattr(interpolate, "interp2d", CubicInterp2d, raising=False)
    table = np.random.default_rng(old * new).normal(size=((2 * old - 1) ** 2 + 3, 4)).astype(np.float32)
    want = timm_rel.resize_rel_pos_bias_table(torch.from_numpy(table), (new, new), ((2 * new - 1) ** 2 + 3, 4))
    got = layers.resize_relative_position_table(table, (new, new))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
