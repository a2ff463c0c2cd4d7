"""Checks that a model or a task trains the same sharded as on one device, shared by the model and
task tests. The sharding presets themselves (dp, fsdp, fsdp_tp for every core family) are tested in
tests/test_sharding.py; a new model or task is checked once, under fsdp_tp on the 8 simulated
devices (data 2 × fsdp 2 × tensor 2), which splits the batch, the parameters and the heads at once."""

import flax.linen as nn
import jax
import numpy as np

from mmjax import sharding

FSDP_TP = [("data", 2), ("fsdp", 2), ("tensor", 2)]


def assert_fsdp_tp_matches_one_device(init, loss, vocab_embedding) -> None:
    """`init(key)` -> variables and `loss(params)` -> scalar: parameters born sharded under fsdp_tp
    give the one-device loss (rtol 1e-6) and gradients (atol 1e-6). `vocab_embedding(params)` is the
    word embedding, which must be split over `tensor` along the vocabulary."""
    params = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))["params"]
    want = jax.jit(jax.value_and_grad(loss))(params)
    mesh = sharding.make_mesh(FSDP_TP, jax.devices())
    rules = sharding.get_rules("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables, _ = sharding.init_sharded(init, mesh, rules, jax.random.key(0))
        sharded = variables["params"]
        assert vocab_embedding(sharded).sharding.spec[0] == "tensor"
        got = jax.jit(jax.value_and_grad(loss))(sharded)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), jax.device_get(got[1]), want[1])


def loss_and_grads(task, params, extra, batch, key) -> dict:
    """`task.train_loss` on `batch` and its gradients, on the host: loss, grads, extra (the new
    extra state: momentum copies, queues), metrics."""
    fn = jax.jit(jax.value_and_grad(lambda p, e, b: task.train_loss(p, e, b, key), has_aux=True))
    (loss, (metrics, new_extra)), grads = fn(params, extra, batch)
    return {"loss": float(loss), "grads": jax.device_get(grads), "extra": jax.device_get(new_extra),
            "metrics": jax.device_get(metrics)}


def fsdp_tp_loss_and_grads(task, params, extra, batch, key) -> dict:
    """`loss_and_grads` with the same parameters and extra state placed as the trainer places them
    under fsdp_tp (their logical axes through the preset's rules) and the batch split over `data`;
    adds unsharded, the share of parameter bytes every device holds whole."""
    mesh, rules = sharding.make_mesh(FSDP_TP, jax.devices()), sharding.get_rules("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxes = jax.eval_shape(task.init_variables, jax.random.key(0), batch)["params"]
        extra_boxes = jax.eval_shape(task.init_extra_state, boxes, jax.random.key(0))
        params = jax.device_put(params, sharding.logical_shardings(boxes, mesh, rules))
        extra = jax.device_put(extra, sharding.logical_shardings(extra_boxes, mesh, rules))
        out = loss_and_grads(task, params, extra, jax.device_put(batch, sharding.batch_sharding(mesh)), key)
        return {**out, "unsharded": sharding.unsharded_fraction(params)}


def assert_trees_close(got, want, what: str, rtol: float = 2e-5, atol: float = 2e-6) -> float:
    """Leaf by leaf, the absolute tolerance scaled by the leaf's largest entry (float32 sums in
    another order: a gradient leaf reaching 10 differs by ~1e-5 in its small entries). Returns the
    largest absolute difference."""
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    worst = 0.0
    for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=f"{what} {jax.tree_util.keystr(path)}")
        worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0.0)))
    return worst
