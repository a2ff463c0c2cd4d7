"""mmjax.layers.attention against a float64 NumPy attention that pulls the module's own kernels
out of its (random) params, and the attention core (late normalisation, hand-written backward)
against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import as_float64, random_params

from mmjax import layers

ATOL = 2e-5


def ref_attention(p, xq, xkv, allowed=None):
    """softmax(q k^T / sqrt(d)) v with explicit per-head einsums, float64.

    `allowed` is a boolean array broadcastable to (B, heads, Lq, Lk): True = may attend.
    """
    p = as_float64(p)
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
    params = random_params(module, x, seed=1)
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
    params = random_params(module, xq, xkv, seed=3)
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
