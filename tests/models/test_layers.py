"""mmjax.models.layers against independent NumPy / PyTorch / open_clip computations.

Attention and Mlp are checked with a float64 NumPy implementation that pulls the module's own
kernels out of the params (which are first replaced by random values, so zero-initialised
biases cannot hide bugs). Position-embedding helpers are checked against formulas, against
open_clip's MAE-style sin-cos table and against torch's bilinear interpolation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.special import erf

from mmjax.models import layers

ATOL = 2e-5


def _random_params(module, *args, seed: int, scale: float = 0.3):
    """Random normal params with the module's own tree (traced with eval_shape, never initialised),
    so zero-initialised biases cannot hide bugs."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), shapes)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def ref_attention(p, xq, xkv, allowed=None):
    """softmax(q k^T / sqrt(d)) v with explicit per-head einsums, float64.

    `allowed` is a boolean array broadcastable to (B, heads, Lq, Lk): True = may attend.
    """
    p = _np(p)
    xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)
    q = np.einsum("bld,dhk->bhlk", xq, p["query"]["kernel"]) + p["query"]["bias"][None, :, None, :]
    k = np.einsum("bld,dhk->bhlk", xkv, p["key"]["kernel"]) + p["key"]["bias"][None, :, None, :]
    v = np.einsum("bld,dhk->bhlk", xkv, p["value"]["kernel"]) + p["value"]["bias"][None, :, None, :]
    logits = np.einsum("bhqk,bhsk->bhqs", q, k) / np.sqrt(q.shape[-1])
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(axis=-1, keepdims=True)
    ctx = np.einsum("bhqs,bhsk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", ctx, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.fixture(scope="module")
def attn_setup():
    """An 4-head attention on width 32 with random params (self-attention shapes)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 32)).astype(np.float32)
    module = layers.Attention(num_heads=4)
    params = _random_params(module, x, seed=1)
    apply = jax.jit(lambda p, xq, xkv=None, mask=None, causal=False: module.apply(
        {"params": p}, xq, xkv, mask=mask, causal=causal), static_argnames="causal")
    return module, params, x, apply


def test_attention_param_shapes(attn_setup):
    _, params, _, _ = attn_setup
    assert params["query"]["kernel"].shape == (32, 4, 8)
    assert params["key"]["bias"].shape == (4, 8)
    assert params["out"]["kernel"].shape == (4, 8, 32)
    assert params["out"]["bias"].shape == (32,)


def test_self_attention_matches_numpy(attn_setup):
    _, params, x, apply = attn_setup
    got = np.asarray(apply(params, x))
    want = ref_attention(params, x, x)
    assert got.shape == (2, 7, 32)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_cross_attention_matches_numpy():
    """Different kv length *and* width: the k/v kernels take the kv width."""
    rng = np.random.default_rng(2)
    xq = rng.normal(size=(3, 5, 32)).astype(np.float32)
    xkv = rng.normal(size=(3, 11, 24)).astype(np.float32)
    module = layers.Attention(num_heads=4)
    params = _random_params(module, xq, xkv, seed=3)
    assert params["key"]["kernel"].shape == (24, 4, 8)
    got = np.asarray(jax.jit(module.apply)({"params": params}, xq, xkv))
    assert got.shape == (3, 5, 32)
    np.testing.assert_allclose(got, ref_attention(params, xq, xkv), atol=ATOL, rtol=1e-5)


def test_causal_attention(attn_setup):
    _, params, x, apply = attn_setup
    length = x.shape[1]
    causal = np.asarray(apply(params, x, causal=True))
    explicit = np.asarray(apply(params, x, mask=layers.causal_mask(length)))
    np.testing.assert_allclose(causal, explicit, atol=1e-6)
    tril = np.tril(np.ones((length, length), bool))[None, None]
    np.testing.assert_allclose(causal, ref_attention(params, x, x, tril), atol=ATOL, rtol=1e-5)
    # Not the same as unmasked attention (the mask does something).
    assert np.abs(causal - np.asarray(apply(params, x))).max() > 1e-3

    # Future tokens do not influence earlier outputs.
    cut = 4
    x2 = x.copy()
    x2[:, cut:] = np.random.default_rng(5).normal(size=x2[:, cut:].shape)
    causal2 = np.asarray(apply(params, x2, causal=True))
    np.testing.assert_allclose(causal2[:, :cut], causal[:, :cut], atol=1e-6)
    assert np.abs(causal2[:, cut:] - causal[:, cut:]).max() > 1e-3


def test_causal_mask_and_padding_mask_shapes():
    m = np.asarray(layers.causal_mask(4))
    assert m.shape == (1, 1, 4, 4) and m.dtype == bool
    np.testing.assert_array_equal(m[0, 0], np.tril(np.ones((4, 4), bool)))
    valid = np.array([[1, 1, 0], [1, 0, 0]])
    pm = np.asarray(layers.padding_mask(jnp.asarray(valid)))
    assert pm.shape == (2, 1, 1, 3) and pm.dtype == bool
    np.testing.assert_array_equal(pm[:, 0, 0], valid.astype(bool))


def test_key_padding_mask(attn_setup):
    _, params, x, apply = attn_setup
    rng = np.random.default_rng(6)
    xkv = rng.normal(size=(2, 9, 32)).astype(np.float32)
    valid = np.ones((2, 9), bool)
    valid[0, 6:] = False
    valid[1, 2:] = False
    mask = layers.padding_mask(jnp.asarray(valid))
    got = np.asarray(apply(params, x, xkv, mask=mask))
    np.testing.assert_allclose(got, ref_attention(params, x, xkv, valid[:, None, None, :]),
                               atol=ATOL, rtol=1e-5)
    # Equivalent to attending over only the valid keys (checked per example).
    for b in range(2):
        short = xkv[b:b + 1, valid[b]]
        np.testing.assert_allclose(got[b:b + 1], np.asarray(apply(params, x[b:b + 1], short)),
                                   atol=1e-5)
    # Changing the padded keys/values does not change anything.
    xkv2 = xkv.copy()
    xkv2[~valid] = 100.0 * rng.normal(size=xkv2[~valid].shape)
    np.testing.assert_allclose(np.asarray(apply(params, x, xkv2, mask=mask)), got, atol=1e-6)


def test_key_padding_mask_self_attention(attn_setup):
    """Self-attention with padding: outputs at valid positions ignore the padded positions."""
    _, params, x, apply = attn_setup
    valid = np.ones((2, 7), bool)
    valid[1, 4:] = False
    mask = layers.padding_mask(jnp.asarray(valid))
    got = np.asarray(apply(params, x, mask=mask))
    x2 = x.copy()
    x2[1, 4:] += 3.0
    got2 = np.asarray(apply(params, x2, mask=mask))
    np.testing.assert_allclose(got2[valid], got[valid], atol=1e-6)
    np.testing.assert_allclose(got, ref_attention(params, x, x, valid[:, None, None, :]),
                               atol=ATOL, rtol=1e-5)


def test_attention_bad_config():
    x = jnp.zeros((1, 3, 10))
    with pytest.raises(ValueError, match="divisible"):
        layers.Attention(num_heads=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="attention_impl"):
        layers.Attention(num_heads=2, attention_impl="flash").init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# Mlp
# ---------------------------------------------------------------------------------------------

def test_mlp_matches_numpy_exact_gelu():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    module = layers.Mlp(mlp_dim=48)
    params = _random_params(module, x, seed=8)
    got = np.asarray(module.apply({"params": params}, x))
    p = _np(params)
    h = x.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
    # The tanh approximation is measurably different at these magnitudes: "gelu" is exact.
    approx = layers.Mlp(mlp_dim=48, act="gelu_tanh").apply({"params": params}, x)
    assert np.abs(np.asarray(approx) - want).max() > 1e-5

    with pytest.raises(ValueError, match="Unknown activation"):
        layers.activation("gelu2")


# ---------------------------------------------------------------------------------------------
# sincos_2d
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# resample_posemb
# ---------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["plain", "padding", "empty_row", "causal", "causal_cross", "bias",
                                  "bias_and_mask"])
def test_heads_leading_attention_matches_jax(case, dtype):
    """The CPU-friendly attention core (late normalisation, hand-written backward) computes what
    jax.nn.dot_product_attention does, with gradients for q, k, v and the bias, for every
    mask/bias combination the models use (incl. a query row with no allowed key)."""
    rng = np.random.default_rng(0)
    b, t, s, h, d = 2, 5, 7 if case == "causal_cross" else 5, 3, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, s, h, d)), dtype) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(1, h, t, s)), dtype)
    d_out = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    kwargs = {}
    if case in ("padding", "bias_and_mask"):
        kwargs["mask"] = layers.padding_mask(jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    if case == "empty_row":
        kwargs["mask"] = jnp.asarray(rng.random((b, 1, t, s)) > 0.4).at[0, 0, 2].set(False)
    if case.startswith("causal"):
        kwargs["causal"] = True
    with_bias = case.startswith("bias")

    def ours(q, k, v, bias):
        return layers.attention_heads_leading(q, k, v, bias=bias if with_bias else None, **kwargs)

    def reference(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias if with_bias else None,
                                            mask=kwargs.get("mask"), is_causal=kwargs.get("causal", False))

    out, ref = ours(q, k, v, bias), reference(q, k, v, bias)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
    loss = lambda fn: lambda *a: (fn(*a).astype(jnp.float32) * d_out).sum()
    grads = jax.grad(loss(ours), (0, 1, 2, 3))(q, k, v, bias)
    ref_grads = jax.grad(loss(reference), (0, 1, 2, 3))(q, k, v, bias)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == r.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=5 * tol,
                                   rtol=5 * tol, err_msg=f"d{name}")
    if with_bias:
        np.testing.assert_allclose(np.asarray(grads[3], np.float32), np.asarray(ref_grads[3], np.float32),
                                   atol=5 * tol, rtol=5 * tol, err_msg="dbias")


def test_attention_core_under_remat_and_vmap():
    """The hand-written backward composes with jax.checkpoint (the models' remat) and vmap, and
    a bias broadcast over batch and heads gets its gradient summed back to its own shape."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 2, 4, 6, 8)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)   # (q_len, k_len), shared

    def loss(attend, q, k, v, bias):
        out = jax.vmap(lambda q, k, v: attend(q, k, v, bias))(q, k, v)
        return jnp.sin(out).sum()

    ours = jax.checkpoint(lambda q, k, v, b: layers.attention_heads_leading(q, k, v, bias=b))
    ref = lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=b)
    grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), (0, 1, 2, 3)))(q, k, v, bias)
    ref_grads = jax.grad(lambda *a: loss(ref, *a), (0, 1, 2, 3))(q, k, v, bias)
    assert grads[3].shape == bias.shape
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-5)


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
