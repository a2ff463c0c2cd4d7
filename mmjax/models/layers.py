"""Shared building blocks: attention, MLP, norms, patch and position embeddings.

Every parameter is created with logical axis names (see `mmjax.sharding.LOGICAL_AXES`) so the
same module shards as data-parallel, FSDP or tensor-parallel by changing rules only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import attention_core

Dtype = Any
ATTENTION_IMPLS = ("xla", "cudnn")


def _gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU in PyTorch's erf form, as timm / open_clip compute it. Same values as
    jax.nn.gelu(approximate=False) (within 1e-6), whose erfc form is 2x slower on XLA:CPU."""
    return x * 0.5 * (1 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_erf,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # big_vision's default
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Annotates an activation with logical axes (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, names)


_XAVIER = nn.initializers.xavier_uniform()


def dense_init(names: tuple[str | None, ...], init=_XAVIER):
    return nn.with_logical_partitioning(init, names)


def LayerNorm(epsilon: float = 1e-6, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with logically partitioned scale and bias (computed in float32)."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def causal_mask(length: int) -> jax.Array:
    """(1, 1, L, L) boolean mask: True where a query may attend to a key."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def padding_mask(valid: jax.Array) -> jax.Array:
    """Key-padding mask (B, 1, 1, K) from a (B, K) boolean array of valid keys."""
    return valid.astype(bool)[:, None, None, :]


def attention_heads_leading(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
                            mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(d) + bias) v on (batch, len, heads, head_dim) arrays.

    Same math as `jax.nn.dot_product_attention`'s XLA path (float32 logits and softmax, masked
    logits at the float32 minimum), but the attention matmuls run with (batch, heads) as
    leading batch dimensions, which XLA:CPU runs much faster than the (batch, len, heads)
    layout (ViT-B/16 attention block, batch 8, 2 cores: 54 -> 39 ms), and the core has a
    flash-style backward (see `attention_core`).
    """
    if causal:
        keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))   # query i sees keys 0..i
        mask = keep if mask is None else jnp.logical_and(mask, keep)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))      # (B, H, L, D)
    return attention_core.attend(q, k, v, bias, mask).transpose(0, 2, 1, 3)


class HeadsDense(nn.Module):
    """x (..., embed) → (..., heads, head_dim), kernel shaped (embed, heads, head_dim)."""

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        kernel = self.param("kernel", dense_init(("embed", "heads", "kv"), init),
                            (x.shape[-1], self.num_heads, self.head_dim))
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", dense_init(("heads", "kv"), nn.initializers.zeros),
                              (self.num_heads, self.head_dim))
            y = y + bias.astype(self.dtype)
        return y


class MergeHeadsDense(nn.Module):
    """x (..., heads, head_dim) → (..., features), kernel shaped (heads, head_dim, features)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        kernel = self.param("kernel", dense_init(("heads", "kv", "embed"), init),
                            (*x.shape[-2:], self.features))
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", dense_init(("embed",), nn.initializers.zeros), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    """Multi-head attention: self, cross (pass `inputs_kv`), causal, with boolean masks.

    Separate q/k/v kernels shaped (embed, heads, head_dim) keep conversion from fused PyTorch
    qkv weights a one-time split. `attention_impl`: "xla" (runs everywhere; see
    `attention_heads_leading`) or "cudnn" (the fused GPU kernel of `jax.nn.dot_product_attention`).
    """

    num_heads: int
    head_dim: int | None = None
    out_dim: int | None = None
    use_bias: bool = True
    key_bias: bool = True           # BEiT has q and v biases but none on k
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask: jax.Array | None = None, bias: jax.Array | None = None,
                 causal: bool = False) -> jax.Array:
        """`bias` (broadcastable to (batch, heads, q_len, kv_len)) is added to the attention
        logits, e.g. a relative position bias."""
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; known: {ATTENTION_IMPLS}")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        width = inputs_q.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.head_dim or width // self.num_heads

        def proj(name: str, use_bias: bool = self.use_bias) -> HeadsDense:
            return HeadsDense(self.num_heads, head_dim, use_bias, self.dtype, name=name)

        q = proj("query")(inputs_q)
        k = proj("key", self.use_bias and self.key_bias)(inputs_kv)
        v = proj("value")(inputs_kv)
        names = ("act_batch", "act_len", "act_heads", "act_kv")
        q, k, v = (constrain(t, names) for t in (q, k, v))
        if self.attention_impl == "xla":
            x = attention_heads_leading(q, k, v, bias=bias, mask=mask, causal=causal)
        else:
            bias = None if bias is None else bias.astype(q.dtype)
            x = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                             implementation=self.attention_impl)
        x = constrain(x, names)
        out = MergeHeadsDense(self.out_dim or width, self.use_bias, self.dtype, name="out")(x)
        return constrain(out, ("act_batch", "act_len", "act_emb"))


class Mlp(nn.Module):
    """Two-layer feed-forward block: Dense → activation → dropout → Dense."""

    mlp_dim: int
    out_dim: int | None = None
    act: str = "gelu"
    dropout: float = 0.0
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        width = self.out_dim or x.shape[-1]
        x = nn.Dense(self.mlp_dim, use_bias=self.use_bias, dtype=self.dtype, name="fc1",
                     kernel_init=dense_init(("embed", "mlp")),
                     bias_init=dense_init(("mlp",), nn.initializers.normal(1e-6)))(x)
        x = constrain(activation(self.act)(x), ("act_batch", "act_len", "act_mlp"))
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype, name="fc2",
                     kernel_init=dense_init(("mlp", "embed")),
                     bias_init=dense_init(("embed",), nn.initializers.normal(1e-6)))(x)
        return constrain(x, ("act_batch", "act_len", "act_emb"))


class PatchEmbed(nn.Module):
    """Splits NHWC images into non-overlapping patches and projects them: (B, h, w, width)."""

    width: int
    patch_size: tuple[int, int]
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        return nn.Conv(
            self.width, self.patch_size, strides=self.patch_size, padding="VALID",
            use_bias=self.use_bias, dtype=self.dtype, name="conv",
            kernel_init=dense_init((None, None, None, "embed"), nn.initializers.lecun_normal()),
            bias_init=dense_init(("embed",), nn.initializers.zeros))(images)


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (MoCo v3 / MAE style), shape (1, h*w, width)."""
    if width % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {width}")
    h, w = grid
    y, x = np.mgrid[:h, :w].astype(np.float32)
    omega = 1.0 / temperature ** (np.arange(width // 4, dtype=np.float32) / (width // 4))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def resample_posemb(posemb: jax.Array, new_grid: tuple[int, int], num_prefix: int = 0,
                    method: str = "bilinear") -> jax.Array:
    """Resizes a (1, prefix + h*w, width) learned position embedding to a new square/rect grid.

    Prefix tokens (e.g. [CLS]) keep their embeddings; the grid part is interpolated.
    """
    prefix, grid_part = posemb[:, :num_prefix], posemb[:, num_prefix:]
    old = int(round(np.sqrt(grid_part.shape[1])))
    if old * old != grid_part.shape[1]:
        raise ValueError(f"Cannot infer a square grid from {grid_part.shape[1]} position embeddings")
    width = grid_part.shape[-1]
    grid_part = grid_part.reshape(1, old, old, width)
    grid_part = jax.image.resize(grid_part, (1, *new_grid, width), method=method)
    grid_part = grid_part.reshape(1, new_grid[0] * new_grid[1], width)
    return jnp.concatenate([prefix, grid_part.astype(posemb.dtype)], axis=1)


class LearnedPosEmb(nn.Module):
    """A learned (1, length, width) position embedding added to the input."""

    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, length, width = x.shape
        if self.has_variable("params", "pos_embedding"):
            stored = jnp.shape(nn.meta.unbox(self.get_variable("params", "pos_embedding")))
            if stored[1] != length:
                raise ValueError(
                    f"Position embedding has {stored[1]} positions but the input has {length} "
                    "tokens (another image size?); resample it with layers.resample_posemb")
        pe = self.param("pos_embedding",
                        nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                     (None, None, "embed")),
                        (1, length, width))
        return x + pe.astype(x.dtype)


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
