"""BEiT's relative position bias: the index of each patch pair's (dy, dx) offset into a learned
per-head table (plus [CLS] terms), the table as a module, and its resizing to another window."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """(1 + h*w, 1 + h*w) indices into BEiT's relative position bias table.

    Patch pairs index their (dy, dx) offset, row-major over (2h-1) x (2w-1) offsets; the last
    three table rows are [CLS]→patch, patch→[CLS] and [CLS]→[CLS].
    """
    h, w = window
    num_offsets = (2 * h - 1) * (2 * w - 1)
    y, x = (c.reshape(-1) for c in np.mgrid[:h, :w])
    dy = y[:, None] - y[None, :] + h - 1
    dx = x[:, None] - x[None, :] + w - 1
    index = np.empty((h * w + 1,) * 2, np.int32)
    index[1:, 1:] = dy * (2 * w - 1) + dx
    index[0, :] = num_offsets
    index[:, 0] = num_offsets + 1
    index[0, 0] = num_offsets + 2
    return index


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
    """BEiT's source coordinates for resizing a relative-offset axis of `src` entries to `dst`:
    offsets spaced by a geometric progression so that the near ones keep unit spacing and the far
    ones stretch to cover the new range (q found by bisection, as in BEiT's fine-tuning code)."""
    half, target = src // 2, dst // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q ** half) / (1 - q) > target:
            hi = q
        else:
            lo = q
    distances = np.cumsum([1.0] + [q ** (i + 1) for i in range(half - 1)]) if half else np.zeros(0)
    return np.concatenate([-distances[::-1], [0.0], distances])


def resize_relative_position_table(table: np.ndarray, new_window: tuple[int, int],
                                   method: str = "cubic") -> np.ndarray:
    """A BEiT relative position bias table (..., (2h-1)(2w-1) + 3, heads) for another window.

    Used when fine-tuning at another resolution (BEiT: 224 → 384). The offset grid is resampled
    per head on BEiT's geometric source coordinates; the three [CLS] rows are kept. "cubic" is
    BEiT's interpolating bicubic spline, "linear" what timm does without scipy's interp2d. The
    source window is assumed square (as every released BEiT).
    """
    from scipy import interpolate

    table = np.asarray(table)
    src_side = math.isqrt(table.shape[-2] - 3)
    if src_side % 2 == 0 or src_side * src_side != table.shape[-2] - 3:
        raise ValueError(f"{table.shape}: not a (square window) relative position table")
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if (src_side, src_side) == dst:
        return table
    ys, xs = _geometric_offsets(src_side, dst[0]), _geometric_offsets(src_side, dst[1])
    # the progression stops just short of the outermost offsets: clamp them onto it (as timm)
    dy, dx = (np.clip(np.arange(-(n // 2), n // 2 + 1, dtype=np.float64), src[0], src[-1])
              for n, src in zip(dst, (ys, xs)))
    grids = table[..., :-3, :].reshape(*table.shape[:-2], src_side, src_side, table.shape[-1])
    out = np.empty((*table.shape[:-2], *dst, table.shape[-1]))
    for index in np.ndindex(*grids.shape[:-3], grids.shape[-1]):
        *lead, head = index
        z = grids[(*lead, slice(None), slice(None), head)].astype(np.float64)
        if method == "cubic":
            values = interpolate.RectBivariateSpline(ys, xs, z, kx=3, ky=3, s=0)(dy, dx)
        elif method == "linear":
            points = np.stack(np.meshgrid(dy, dx, indexing="ij"), -1)
            values = interpolate.RegularGridInterpolator((ys, xs), z)(points)
        else:
            raise ValueError(f"Unknown method {method!r}; known: 'cubic', 'linear'")
        out[(*lead, slice(None), slice(None), head)] = values
    out = out.reshape(*table.shape[:-2], dst[0] * dst[1], table.shape[-1])
    return np.concatenate([out, table[..., -3:, :]], axis=-2).astype(table.dtype)


class RelativePositionBias(nn.Module):
    """BEiT's learned per-head attention bias for each relative patch offset (plus [CLS] terms).

    Returns a (1, heads, 1 + h*w, 1 + h*w) bias for a [CLS] + h×w patch sequence; the table
    (zeros at init, as in BEiT) is shaped (offsets + 3, heads).
    """

    num_heads: int
    window: tuple[int, int]

    @nn.compact
    def __call__(self) -> jax.Array:
        h, w = self.window
        table = self.param("table", nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads")),
                           ((2 * h - 1) * (2 * w - 1) + 3, self.num_heads))
        bias = table[relative_position_index(self.window)]          # (L, L, heads)
        return jnp.transpose(bias, (2, 0, 1))[None]
