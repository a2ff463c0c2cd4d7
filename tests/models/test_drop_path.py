"""Stochastic depth (drop path) in mmjax.layers.stack: timm's rate rule, per-example
dropping with 1/(1-p) scaling, identity when deterministic, scanned == unrolled, remat, and the
`drop_path` field of ViT / BEiT / MAE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmjax import layers
from mmjax.convert import engine
from mmjax.models import beit, mae, vit

TINY = dict(num_heads=2, mlp_dim=32)


@pytest.mark.parametrize("depth,rate", [(12, 0.1), (24, 0.2), (32, 0.3), (1, 0.5)])
def test_rates_match_timm(depth, rate):
    from timm.models.vision_transformer import VisionTransformer
    ref = VisionTransformer(img_size=8, patch_size=8, embed_dim=8, depth=depth, num_heads=2, num_classes=0,
                            drop_path_rate=rate)
    expected = [getattr(b.drop_path1, "drop_prob", 0.0) for b in ref.blocks]   # Identity at rate 0
    assert [getattr(b.drop_path2, "drop_prob", 0.0) for b in ref.blocks] == expected
    got = layers.drop_path_rates(rate, depth)
    diff = np.abs(got - np.asarray(expected)).max()
    print(f"\ndrop-path rates vs timm (depth {depth}, rate {rate}): max-abs-diff {diff:.1e}")
    assert diff < 1e-7


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_bad_rate_raises(bad):
    with pytest.raises(ValueError, match="drop_path"):
        layers.drop_path_rates(bad, 4)


def test_drop_branch_keep_fraction_and_scale():
    n, rate = 40_000, 0.3
    y = jnp.ones((n, 3, 4))
    out = np.asarray(layers.drop_branch(jax.random.key(0), y, jnp.float32(rate)))
    per_example = out.reshape(n, -1)
    assert (per_example == per_example[:, :1]).all(), "one draw per example, not per element"
    kept = per_example[:, 0] != 0
    np.testing.assert_allclose(per_example[kept, 0], 1 / (1 - rate), rtol=1e-6)
    sigma = np.sqrt(rate * (1 - rate) / n)
    print(f"\nkeep fraction {kept.mean():.4f} (expected {1 - rate}, sigma {sigma:.4f}); mean {out.mean():.4f}")
    assert abs(kept.mean() - (1 - rate)) < 5 * sigma
    assert abs(out.mean() - 1.0) < 5 * sigma / (1 - rate)
    # Rate 0 (the first layer of a scanned stack) keeps every example unscaled.
    np.testing.assert_array_equal(layers.drop_branch(jax.random.key(1), y, jnp.float32(0.0)), y)


def _encoder(**kw):
    return layers.Stack(layers.BlockConfig(**TINY), depth=3, **kw)


@pytest.fixture(scope="module")
def unrolled():
    x = jax.random.normal(jax.random.key(0), (256, 5, 16))
    params = nn.meta.unbox(_encoder().init(jax.random.key(1), x)["params"])
    return x, params


def _stacked(params):
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    return traverse_util.unflatten_dict(engine.stack_layers(flat), sep="/")


def test_deterministic_is_identity_and_training_drops(unrolled):
    x, params = unrolled
    plain = _encoder().apply({"params": params}, x)
    with_dp = _encoder(drop_path=0.5).apply({"params": params}, x, deterministic=True)
    np.testing.assert_array_equal(with_dp, plain)
    trained = _encoder(drop_path=0.5).apply({"params": params}, x, deterministic=False,
                                            rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(trained, plain)


def test_per_layer_drop_fraction(unrolled):
    """A layer whose two branches are both dropped passes an example through unchanged; with
    rates (0, 0.4, 0.8) that happens with probability rate² per example and layer."""
    x, params = unrolled
    _, state = _encoder(drop_path=0.8).apply({"params": params}, x, deterministic=False,
                                             rngs={"dropout": jax.random.key(3)}, mutable=["intermediates"])
    encoded = [x] + [state["intermediates"][f"encoded_{i}"][0] for i in range(3)]
    n = x.shape[0]
    for i, rate in enumerate(layers.drop_path_rates(0.8, 3)):
        skipped = np.all(np.asarray(encoded[i + 1]) == np.asarray(encoded[i]), axis=(1, 2)).mean()
        sigma = max(np.sqrt(rate**2 * (1 - rate**2) / n), 1e-9)
        print(f"\nlayer {i}: rate {rate:.2f}, both branches dropped for {skipped:.3f} (expected {rate**2:.3f})")
        assert abs(skipped - rate**2) <= 5 * sigma


@pytest.mark.parametrize("remat", ["dots"])
def test_scanned_equals_unrolled_and_gradients_finite(unrolled, remat):
    x, params = unrolled
    rngs = {"dropout": jax.random.key(4)}
    ref = _encoder(drop_path=0.5).apply({"params": params}, x, deterministic=False, rngs=rngs)
    scanned = _encoder(drop_path=0.5, scan=True, remat_policy=remat)

    def loss(p):
        out = scanned.apply({"params": p}, x, deterministic=False, rngs=rngs)
        return (out ** 2).mean(), out

    (_, got), grads = jax.value_and_grad(loss, has_aux=True)(_stacked(params))
    diff = float(jnp.abs(got - ref).max())
    print(f"\ndrop path scanned ({remat} remat) vs unrolled: max-abs-diff {diff:.1e}")
    assert diff < 1e-5
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["layers"]["mlp"]["fc2"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("build", [
    lambda dp: vit.ViT(width=16, depth=2, patch_size=8, num_classes=3, drop_path=dp, **TINY),
    lambda dp: beit.BEiT(width=16, depth=2, patch_size=8, num_classes=3, drop_path=dp, **TINY),
    lambda dp: mae.MAE(width=16, depth=2, patch_size=8, decoder_width=16, decoder_depth=1, decoder_heads=2,
                       decoder_mlp_dim=32, drop_path=dp, **TINY),
], ids=["vit", "beit", "mae"])
def test_model_field_reaches_the_encoder(build):
    """ViT / BEiT / MAE pass `drop_path` to their encoder (MAE: not to its decoder); the
    Encoder's behaviour is tested above. Traced only (eval_shape), so it is cheap."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.Stack):
            seen[context.module.name] = context.module.drop_path
        return next_fun(*args, **kwargs)

    images = jnp.zeros((2, 16, 16, 3))
    extra = (jnp.zeros((2, 4)),) if isinstance(build(0.0), mae.MAE) else ()   # MAE's noise
    with nn.intercept_methods(record):
        jax.eval_shape(build(0.3).init, jax.random.key(1), images, *extra)
    assert seen == ({"encoder": 0.3, "decoder": 0.0} if extra else {"encoder": 0.3})
