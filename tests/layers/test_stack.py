"""The block stack: scanned == unrolled for a mix of variants (cross-attention every 2nd layer or
from layer k on, post-LN, RMSNorm, SwiGLU, GQA, rotary, experts, drop path), remat == no remat,
and decoding token by token through the key/value cache == the full causal forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import layers

B, L, WIDTH, CONTEXT = 2, 6, 16, 5
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, L, WIDTH)).astype(np.float32)
CTX = RNG.normal(size=(B, CONTEXT, 12)).astype(np.float32)
VALID = np.array([[1] * L, [1, 1, 1, 1, 0, 0]], bool)
CTX_VALID = np.array([[1] * CONTEXT, [1, 1, 0, 0, 0]], bool)
TYPES = np.array([[0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 0]])
MIX = layers.BlockConfig(num_heads=4, num_kv_heads=2, mlp_dim=32, norm="post", norm_kind="rmsnorm", mlp="swiglu",
                         causal=True, cross_attention=True, rotary=dict(base=100.0), layer_scale=0.5,
                         experts=("text", "image"))
INPUTS = dict(mask=VALID, context=CTX, context_mask=CTX_VALID, token_types=TYPES)


def _stack(block=MIX, **kw):
    return layers.Stack(block, depth=4, **kw)


@pytest.fixture(scope="module")
def unrolled_params():
    return {every_from: nn.meta.unbox(_stack(cross_attention_every=every_from[0], cross_attention_from=every_from[1])
                                      .init(jax.random.key(1), X, **INPUTS))["params"]
            for every_from in ((2, 0), (1, 2))}


@pytest.mark.parametrize("every, start, names", [(2, 0, {"layers"}), (1, 2, {"layers", "layers_from_2"})],
                         ids=["qformer_every_2nd", "albef_from_2"])
def test_scanned_equals_unrolled(unrolled_params, every, start, names):
    params = unrolled_params[(every, start)]
    placement = dict(cross_attention_every=every, cross_attention_from=start)
    unrolled = _stack(**placement, drop_path=0.5)
    has_cross = ["cross_attn" in params[f"layer_{i}"] for i in range(4)]
    assert has_cross == [unrolled.has_cross_attention(i) for i in range(4)]
    assert has_cross == ([True, False, True, False] if every == 2 else [False, False, True, True])
    scanned = _stack(**placement, drop_path=0.5, scan=True)
    stacked = layers.to_scanned(params, scanned)
    assert set(stacked) == names
    shapes = nn.meta.unbox(jax.eval_shape(lambda: scanned.init(jax.random.key(1), X, **INPUTS)))["params"]
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes)
    rngs = {"dropout": jax.random.key(2)}
    for deterministic in (True, False):      # training: drop path drops the same examples in both
        want = unrolled.apply({"params": params}, X, **INPUTS, deterministic=deterministic, rngs=rngs)
        got = scanned.apply({"params": stacked}, X, **INPUTS, deterministic=deterministic, rngs=rngs)
        diff = float(jnp.abs(got - want).max())
        print(f"\nscanned vs unrolled ({every=}, {start=}, {deterministic=}): max abs diff {diff:.1e}")
        assert diff < 1e-5
    round_trip = layers.to_unrolled(stacked, scanned)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(round_trip), jax.tree.leaves(params)))


def test_scanned_groups_need_whole_groups():
    with pytest.raises(ValueError, match="whole groups"):
        layers.Stack(MIX, depth=5, scan=True, cross_attention_every=2).init(jax.random.key(0), X, **INPUTS)


def test_remat_equals_no_remat(unrolled_params):
    scanned = _stack(cross_attention_every=2, scan=True)
    params = layers.to_scanned(unrolled_params[(2, 0)], scanned)

    def loss(p, module):
        return (module.apply({"params": p}, X, **INPUTS) ** 2).mean()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    want, want_grads = grad(params, scanned)
    got, grads = grad(params, _stack(cross_attention_every=2, scan=True, remat_policy="dots"))
    assert abs(float(got) - float(want)) < 1e-6
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    assert diff < 1e-5
    assert all(np.any(g) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_decoding_token_by_token_equals_full_forward(scan):
    """Pre-LN causal stack with GQA, rotary and cross-attention every 2nd layer. Keys of invalid
    (padded) positions stay masked; the context's keys/values are projected on the first step
    only; every step after the first runs the same compiled function."""
    block = MIX.replace(norm="pre", experts=(), layer_scale=None)
    stack = layers.Stack(block, depth=2, scan=scan, cross_attention_every=2)
    inputs = dict(context=CTX, context_mask=CTX_VALID)
    variables = stack.init(jax.random.key(3), X, **inputs, mask=VALID, decode=True)   # params and cache
    full = np.asarray(stack.apply({"params": variables["params"]}, X, mask=VALID, **inputs))
    cache = variables["cache"]
    flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(cache)}
    assert all(not np.any(v) for k, v in flat.items() if "cross" not in k)   # sized by init, empty
    traces = []

    @jax.jit
    def step(cache, token, context):
        traces.append(context is None)
        return stack.apply({"params": variables["params"], "cache": cache}, token, mask=VALID, context=context,
                           context_mask=CTX_VALID, decode=True, mutable=["cache"])

    outputs = []
    for t in range(L):
        out, state = step(cache, X[:, t:t + 1], CTX if t == 0 else None)
        cache = state["cache"]
        outputs.append(np.asarray(out))
    got = np.concatenate(outputs, axis=1)
    diff = np.abs(got - full)[VALID].max()
    print(f"\ndecode token by token vs full forward ({'scanned' if scan else 'unrolled'}): max abs diff {diff:.1e}")
    assert diff < 1e-5
    assert traces == [False, True]                   # one compilation with the context, one without
