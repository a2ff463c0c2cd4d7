"""Optimizer and schedule math checked against hand-computed numpy values."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import optim

ADAMW = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
             grad_clip_norm=None, freeze=(), wd_exclude=None, mu_dtype=None)
CONSTANT = dict(lr=0.1, warmup_steps=0, decay="constant", end_lr=0.0)


def tiny_params():
    return {
        "dense": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.1, -0.2])},
        "ln_final": {"scale": jnp.array([1.0, 1.5])},
        "pos_embedding": jnp.array([[[0.3, -0.4], [0.2, 0.7]]]),
        "logit_scale": jnp.array(2.0),
    }


def grads(scale):
    """Deterministic, non-uniform grads shaped like tiny_params()."""
    def leaf(i, x):
        return scale * (jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) - 0.7 * i + 0.3)
    leaves, treedef = jax.tree.flatten(tiny_params())
    return jax.tree.unflatten(treedef, [leaf(i, x) for i, x in enumerate(leaves)])


def run(tx, params, grad_list, jit=True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grad_list:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# ---------------------------------------------------------------- schedules

def expected_lr(decay, step, lr=1e-3, warmup=10, total=110, end=1e-4):
    if step < warmup:
        return lr * step / warmup
    frac = min((step - warmup) / (total - warmup), 1.0)
    if decay == "cosine":
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))
    if decay == "linear":
        return lr + (end - lr) * frac
    return lr


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("step", [0, 5, 10, 35, 60, 85, 110, 500])
def test_schedule_values(decay, step):
    sched = optim.make_schedule(
        dict(lr=1e-3, warmup_steps=10, decay=decay, end_lr=1e-4), total_steps=110)
    np.testing.assert_allclose(float(sched(step)), expected_lr(decay, step), rtol=1e-6, atol=1e-12)


def test_schedule_landmarks():
    cos = optim.make_schedule(dict(lr=1.0, warmup_steps=4, decay="cosine", end_lr=0.0), 12)
    assert float(cos(0)) == 0.0
    assert float(cos(2)) == pytest.approx(0.5)
    assert float(cos(4)) == pytest.approx(1.0)
    assert float(cos(8)) == pytest.approx(0.5, abs=1e-6)  # cos(pi/2) = 0.
    assert float(cos(12)) == pytest.approx(0.0, abs=1e-7)


def test_schedule_no_warmup_and_jit():
    sched = optim.make_schedule(dict(lr=2.0, warmup_steps=0, decay="linear"), 4)
    np.testing.assert_allclose(jax.jit(jax.vmap(sched))(jnp.arange(5)), [2.0, 1.5, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("cfg,match", [
    (dict(lr=1.0, warmup_steps=11), "warmup_steps"),
    (dict(lr=1.0, decay="exp"), "cosine"),
    (dict(lr=1.0, warmpu_steps=3), "warmpu_steps"),
    (dict(warmup_steps=3), "lr"),
])
def test_schedule_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        optim.make_schedule(cfg, 10)


# ---------------------------------------------------------------- masks

def test_path_strings_and_default_decay_mask():
    params = tiny_params()
    params["layers"] = [{"kernel": jnp.ones((2, 2))}]
    paths = optim.path_strings(params)
    assert paths["dense"]["kernel"] == "dense/kernel"
    assert paths["layers"][0]["kernel"] == "layers/0/kernel"
    mask = optim.decay_mask(params)
    assert mask == {
        "dense": {"kernel": True, "bias": False}, "ln_final": {"scale": False},
        "pos_embedding": False, "logit_scale": False, "layers": [{"kernel": True}]}


@pytest.mark.parametrize("path", [
    "image/posemb", "image/pos_embed", "text/pos_embedding", "logit_bias", "logit_scale",
    "enc/norm_1/w", "enc/ln_2/w", "enc/LayerNorm_0/w", "enc/block/scale", "dense/bias_2d", "cls"])
def test_default_exclude_rules_on_matrices(path):
    params = {path: jnp.ones((2, 2)), "enc/block/query/kernel": jnp.ones((2, 2))}
    mask = optim.decay_mask(params)
    assert mask == {path: False, "enc/block/query/kernel": True}


def test_custom_wd_exclude_replaces_defaults():
    params = {"pos_embedding": jnp.ones((2, 2)), "head": {"kernel": jnp.ones((2, 2))},
              "bias": jnp.ones(2)}
    mask = optim.decay_mask(params, exclude=["^head/"])
    assert mask == {"pos_embedding": True, "head": {"kernel": False}, "bias": False}


# ---------------------------------------------------------------- adamw math

def test_adamw_two_steps_by_hand():
    b1, b2, eps, wd, lr = 0.9, 0.98, 1e-6, 0.2, 0.1
    tx, sched = optim.build_optimizer(ADAMW, CONSTANT, total_steps=10, params=tiny_params())
    assert float(sched(3)) == pytest.approx(lr)
    gs = [grads(1.0), grads(-0.5)]
    got, _ = run(tx, tiny_params(), gs)

    decayed = {"dense/kernel"}
    theta = {k: np.asarray(v, np.float64) for k, v in _flat(tiny_params()).items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    for t, g in enumerate(gs, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in _flat(g).items()}
        for k in theta:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat = m[k] / (1 - b1 ** t)
            v_hat = v[k] / (1 - b2 ** t)
            update = m_hat / (np.sqrt(v_hat) + eps)
            if k in decayed:
                update = update + wd * theta[k]
            theta[k] = theta[k] - lr * update
    for k, val in _flat(got).items():
        np.testing.assert_allclose(val, theta[k], atol=1e-6, rtol=0, err_msg=k)


def test_adamw_decay_only_on_kernel():
    """Zero grads: only weight decay moves params, and only the kernel."""
    params = tiny_params()
    zero = jax.tree.map(jnp.zeros_like, params)
    got, _ = run(tx=optim.build_optimizer(ADAMW, CONSTANT, 10, params)[0],
                 params=params, grad_list=[zero])
    flat, start = _flat(got), _flat(params)
    np.testing.assert_allclose(flat["dense/kernel"], start["dense/kernel"] * (1 - 0.1 * 0.2),
                               atol=1e-7)
    for k in ("dense/bias", "ln_final/scale", "pos_embedding", "logit_scale"):
        np.testing.assert_array_equal(flat[k], start[k], err_msg=k)


def test_first_update_uses_schedule_at_step_0():
    """sgd updates are -lr(step) * g, so they trace the warmup exactly."""
    cfg = dict(name="sgd", momentum=None)
    sched_cfg = dict(lr=1.0, warmup_steps=4, decay="linear", end_lr=0.0)
    params = {"w": jnp.zeros(())}
    tx, sched = optim.build_optimizer(cfg, sched_cfg, 8, params)
    got, _ = run(tx, params, [{"w": jnp.ones(())}] * 6)
    assert float(got["w"]) == pytest.approx(-sum(float(sched(s)) for s in range(6)))
    assert float(got["w"]) == pytest.approx(-(0 + .25 + .5 + .75 + 1 + .75))


def test_sgd_momentum_by_hand():
    cfg = dict(name="sgd", momentum=0.5)
    params = {"w": jnp.array([1.0])}
    tx, _ = optim.build_optimizer(cfg, CONSTANT, 10, params)
    got, _ = run(tx, params, [{"w": jnp.array([2.0])}, {"w": jnp.array([4.0])}])
    # trace: t1 = 2, t2 = 0.5 * 2 + 4 = 5; w = 1 - 0.1 * (2 + 5).
    np.testing.assert_allclose(got["w"], [0.3], atol=1e-7)


def test_mu_dtype_and_configdict_input():
    cfg = ml_collections.ConfigDict(dict(ADAMW, mu_dtype="bfloat16"))
    tx, _ = optim.build_optimizer(cfg, ml_collections.ConfigDict(CONSTANT), 10, tiny_params())
    mu = tx.init(tiny_params())[0].mu
    assert mu["dense"]["kernel"].dtype == jnp.bfloat16


def test_adam_and_lamb_build_and_step():
    tx, _ = optim.build_optimizer(dict(ADAMW, name="adam", weight_decay=0.0), CONSTANT, 10,
                                  tiny_params())
    run(tx, tiny_params(), [grads(1.0)])
    tx, _ = optim.build_optimizer(dict(ADAMW, name="lamb", mu_dtype=None), CONSTANT, 10,
                                  tiny_params())
    got, _ = run(tx, tiny_params(), [grads(1.0)])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))


# ---------------------------------------------------------------- clipping

@pytest.mark.parametrize("clip,scale", [(1.0, 1 / 5), (2.5, 1 / 2), (10.0, 1.0), (None, 1.0)])
def test_clip_by_global_norm(clip, scale):
    params = {"a": jnp.zeros(2), "b": jnp.zeros((1, 2))}
    g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[0.0, 4.0]])}  # Global norm 5.
    cfg = dict(name="sgd", grad_clip_norm=clip)
    tx, _ = optim.build_optimizer(cfg, dict(lr=1.0), 10, params)
    updates, _ = tx.update(g, tx.init(params), params)
    for k in g:
        np.testing.assert_allclose(updates[k], -scale * np.asarray(g[k]), rtol=1e-6)


# ---------------------------------------------------------------- freezing

def test_freeze_leaves_frozen_params_unchanged():
    params = {"image": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "text": {"kernel": jnp.ones((2, 2))}}
    cfg = dict(ADAMW, freeze=["^image/"], grad_clip_norm=1.0)
    tx, _ = optim.build_optimizer(cfg, CONSTANT, 10, params)
    state = tx.init(params)
    mu_leaves = jax.tree.leaves(state)
    assert sum(x.size for x in mu_leaves if x.ndim) == 2 * 4  # mu and nu of text/kernel only.
    g = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
    got, _ = run(tx, params, [g, g, g])
    np.testing.assert_array_equal(got["image"]["kernel"], params["image"]["kernel"])
    np.testing.assert_array_equal(got["image"]["bias"], params["image"]["bias"])
    assert np.all(np.asarray(got["text"]["kernel"]) < 1.0)


def test_freeze_clip_sees_only_trainable_grads():
    params = {"frozen": jnp.zeros(1), "w": jnp.zeros(1)}
    g = {"frozen": jnp.array([1000.0]), "w": jnp.array([0.5])}
    cfg = dict(name="sgd", grad_clip_norm=1.0, freeze="^frozen$")
    tx, _ = optim.build_optimizer(cfg, dict(lr=1.0), 10, params)
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.5])
    np.testing.assert_array_equal(updates["frozen"], [0.0])


def test_trainable_partition_has_no_frozen_leaves_and_updates_like_the_full_tree():
    """The trainer's path: tx on the trainable partition (frozen leaves are MaskedNode holes, no
    gradient), with the opt_state of the full tree (so older checkpoints keep their layout), moves
    the trainable leaves exactly as tx on the full tree with any frozen gradient does."""
    params = {"image": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "text": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.zeros(2)}}
    cfg = dict(ADAMW, freeze=["^image/"], grad_clip_norm=1.0, layer_decay=None)
    tx, _ = optim.build_optimizer(cfg, CONSTANT, 10, params)
    mask = optim.trainable_mask(cfg, params)
    assert mask == {"image": {"kernel": False, "bias": False}, "text": {"kernel": True, "bias": True}}
    trainable, frozen = optim.split_frozen(params, mask)
    assert sorted(jax.tree.leaves(optim.path_strings(trainable))) == ["text/bias", "text/kernel"]
    assert sorted(jax.tree.leaves(optim.path_strings(frozen))) == ["image/bias", "image/kernel"]
    state = tx.init(params)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert not any("image" in p for p in opt_paths), f"frozen leaves hold optimizer state: {opt_paths}"
    full_state, part_state = state, state
    for scale in (3.0, -1.0, 0.5):
        g_full = jax.tree.map(lambda x, s=scale: s * (1.0 + jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape),
                              params)
        g_part, _ = optim.split_frozen(g_full, mask)
        u_full, full_state = jax.jit(tx.update)(g_full, full_state, params)
        u_part, part_state = jax.jit(tx.update)(g_part, part_state, trainable)
        assert jax.tree.structure(part_state) == jax.tree.structure(full_state)
        jax.tree.map(np.testing.assert_array_equal, optim.merge_frozen(u_part, u_full, mask), u_full)
    np.testing.assert_array_equal(u_full["image"]["kernel"], 0.0)
    merged = optim.merge_frozen(trainable, frozen, mask)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    assert optim.trainable_mask(ADAMW, params) is None and optim.split_frozen(params, None) == (params, None)


def test_freeze_typo_errors():
    with pytest.raises(ValueError, match="imgae"):
        optim.build_optimizer(dict(ADAMW, freeze=["imgae/"]), CONSTANT, 10, tiny_params())


def test_boxed_params_are_tolerated():
    import flax.linen as nn
    params = {"kernel": nn.LogicallyPartitioned(jnp.ones((2, 2)), ("a", "b")),
              "bias": nn.LogicallyPartitioned(jnp.ones(2), ("b",))}
    assert optim.decay_mask(params) == {"kernel": True, "bias": False}
    tx, _ = optim.build_optimizer(dict(ADAMW, freeze="bias"), CONSTANT, 10, params)
    got, _ = run(tx, params, [jax.tree.map(jnp.ones_like, params)], jit=False)
    assert isinstance(got["kernel"], nn.LogicallyPartitioned)
    np.testing.assert_array_equal(got["bias"].value, 1.0)
    assert np.all(np.asarray(got["kernel"].value) < 1.0)


# ---------------------------------------------------------------- config errors

def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="adagrad") as err:
        optim.build_optimizer(dict(name="adagrad"), CONSTANT, 10, tiny_params())
    assert "adamw" in str(err.value) and "sgd" in str(err.value)


def test_unknown_and_unused_keys():
    with pytest.raises(ValueError, match="beta1"):
        optim.build_optimizer(dict(ADAMW, beta1=0.9), CONSTANT, 10, tiny_params())
    with pytest.raises(ValueError, match="b1"):
        optim.build_optimizer(dict(name="sgd", b1=0.9), CONSTANT, 10, tiny_params())
    with pytest.raises(ValueError, match="adamw"):
        optim.build_optimizer(dict(name="adam", weight_decay=0.1), CONSTANT, 10, tiny_params())


def _flat(tree):
    paths = jax.tree.leaves(optim.path_strings(tree))
    return {p: np.asarray(x) for p, x in zip(paths, jax.tree.leaves(tree))}


# ---------------------------------------------------------------- layer-wise lr decay

def vit_like_params(scanned):
    """Embedding, 3 blocks (unscanned layer_N or one scanned stack), final norm and head."""
    blocks = [{"attn": {"kernel": jnp.full((2, 2), float(i))}, "ln1": {"scale": jnp.ones(2)}} for i in range(3)]
    encoder = ({"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)} if scanned
               else {f"layer_{i}": b for i, b in enumerate(blocks)})
    return {"embedding": {"conv": {"kernel": jnp.ones((1, 1, 2, 2))}}, "cls": jnp.zeros((1, 1, 2)),
            "encoder": encoder, "norm": {"scale": jnp.ones(2)}, "head": {"kernel": jnp.ones((2, 3))}}


@pytest.mark.parametrize("scanned", [False, True])
def test_layer_decay_scales_updates_per_layer(scanned):
    """SGD with lr 1: each update is -decay ** (L + 1 - id) * grad, ids 0 / i + 1 / L + 1 (L = 3)."""
    params = vit_like_params(scanned)
    decay = 0.5
    tx, _ = optim.build_optimizer(dict(name="sgd", layer_decay=decay), dict(lr=1.0), 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    got = _flat(updates)
    np.testing.assert_allclose(got["embedding/conv/kernel"], -decay ** 4)
    np.testing.assert_allclose(got["cls"], -decay ** 4)
    np.testing.assert_allclose(got["norm/scale"], -1.0)
    np.testing.assert_allclose(got["head/kernel"], -1.0)
    for i in range(3):
        expected = -decay ** (3 - i)
        if scanned:
            np.testing.assert_allclose(got["encoder/layers/attn/kernel"][i], expected)
            np.testing.assert_allclose(got["encoder/layers/ln1/scale"][i], expected)
        else:
            np.testing.assert_allclose(got[f"encoder/layer_{i}/attn/kernel"], expected)


def test_layer_decay_scales_adamw_with_weight_decay_like_param_groups():
    """torch param groups scale lr for Adam and decoupled wd alike: the whole update scales."""
    params = vit_like_params(scanned=False)
    grads = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x) + 0.1 * x, params)
    plain, _ = optim.build_optimizer(dict(ADAMW), CONSTANT, 10, params)
    decayed, _ = optim.build_optimizer(dict(ADAMW, layer_decay=0.65), CONSTANT, 10, params)
    ref, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    got, _ = jax.jit(decayed.update)(grads, decayed.init(params), params)
    ids = _flat(optim.layer_ids(params))
    for path, value in _flat(got).items():
        np.testing.assert_allclose(value, 0.65 ** (4 - ids[path]) * _flat(ref)[path], rtol=1e-6)
    assert ids["encoder/layer_2/attn/kernel"] == 3 and ids["head/kernel"] == 4 and ids["cls"] == 0


def test_layer_decay_with_freeze_and_errors():
    params = vit_like_params(scanned=True)
    tx, _ = optim.build_optimizer(dict(name="sgd", layer_decay=0.5, freeze="^embedding"), dict(lr=1.0), 10, params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_array_equal(_flat(updates)["embedding/conv/kernel"], 0.0)
    np.testing.assert_allclose(_flat(updates)["encoder/layers/attn/kernel"][0], -0.5 ** 3)
    with pytest.raises(ValueError, match="one stack of blocks"):
        optim.build_optimizer(dict(name="sgd", layer_decay=0.5), dict(lr=1.0), 10, tiny_params())
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        optim.build_optimizer(dict(name="sgd", layer_decay=1.5), dict(lr=1.0), 10, params)


# ---------------------------------------------------------------- per-parameter lr multipliers

def test_lr_multipliers_scale_adamw_like_a_param_group_with_a_larger_lr():
    """ViLT's VQA head at 10× the lr: its AdamW update (with decoupled wd) is the one a 10× lr
    gives; the first matching regex counts; frozen parameters stay frozen."""
    params = vit_like_params(scanned=False)
    grads = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x) + 0.1 * x, params)
    multipliers = (("^head/", 10.0), ("^(head|norm)/", 3.0))
    tx, _ = optim.build_optimizer(dict(ADAMW, lr_multipliers=multipliers, freeze="^cls$"), CONSTANT, 10, params)
    got = _flat(jax.jit(tx.update)(grads, tx.init(params), params)[0])
    plain, _ = optim.build_optimizer(dict(ADAMW), CONSTANT, 10, params)
    ref = _flat(jax.jit(plain.update)(grads, plain.init(params), params)[0])
    ten_x, _ = optim.build_optimizer(dict(ADAMW), dict(CONSTANT, lr=1.0), 10, params)
    ref_10x = _flat(jax.jit(ten_x.update)(grads, ten_x.init(params), params)[0])
    np.testing.assert_allclose(got["head/kernel"], ref_10x["head/kernel"], rtol=1e-6)
    np.testing.assert_allclose(got["norm/scale"], 3.0 * ref["norm/scale"], rtol=1e-6)
    np.testing.assert_allclose(got["encoder/layer_1/attn/kernel"], ref["encoder/layer_1/attn/kernel"], rtol=1e-6)
    np.testing.assert_array_equal(got["cls"], 0.0)


@pytest.mark.parametrize("value, message", [
    ((("^nothing/", 10.0),), "matches no parameter"),
    ((("^head/", 0.0),), "must be positive"),
    (("^head/",), r"takes \(regex, factor\) pairs"),
])
def test_lr_multipliers_errors(value, message):
    with pytest.raises(ValueError, match=message):
        optim.build_optimizer(dict(ADAMW, lr_multipliers=value), CONSTANT, 10, vit_like_params(scanned=False))
