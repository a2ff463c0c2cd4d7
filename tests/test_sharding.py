"""Sharded == unsharded: one train step of ViT, CLIP and MAE under dp, fsdp and fsdp_tp on 8 CPU
devices: the loss, every gradient leaf (a per-tensor scale error would hide in AdamW's first update,
which is about lr * sign(g)) and the updated parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import faults, optim, sharding, tasks
from mmjax.train import make_train_step, optimizer_shardings

MESHES = {
    "dp": [("data", 8)],
    "fsdp": [("data", 2), ("fsdp", 4)],
    "fsdp_tp": [("data", 2), ("fsdp", 2), ("tensor", 2)],
}
# float32 on CPU; the sharded runs sum partial products in a different order.
RTOL, ATOL = 2e-5, 2e-6
# Gradients, leaf by leaf: within 1e-4 relative, or 1e-5 of the leaf's largest entry where an entry
# is a sum that cancels (measured: up to 2e-6 of it), or 1e-7 of the largest gradient anywhere for
# leaves that are zero up to rounding (key biases: softmax ignores a per-query constant). A factor
# error in any leaf (a missed or doubled reduction) fails.
GRAD_RTOL, GRAD_ATOL_OF_LEAF, GRAD_ATOL_OF_ALL = 1e-4, 1e-5, 1e-7
# Updated parameters: AdamW's first step (update = lr * g / (|g| + eps)) scales that order noise
# by up to lr / eps = 1e3 where |g| <= eps (e.g. key biases, whose gradient is zero up to rounding
# because softmax ignores a per-query constant). 1% of lr; a real sharding error moves updates by
# O(lr) and the loss / gradient norm, which keep the tight bounds.
UPDATE_ATOL = 1e-5


def _config(task: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0)
    c.schedule = dict(lr=1e-3, warmup_steps=0, decay="cosine", end_lr=0.0)
    vit = dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8)
    if task == "classification":
        c.model = dict(vit, num_classes=16, head_zero_init=False)
    elif task == "mae":
        c.model = dict(vit, decoder_width=32, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=64, mask_ratio=0.75)
    else:
        c.model = dict(embed_dim=32, image=vit, text=dict(vocab_size=64, context_length=8, width=64,
                                                          depth=2, num_heads=4))
        c.input = dict(tokenizer=dict(name="shapes", context_length=8))
    return c


def _batch(task: str) -> dict:
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32)}
    if task == "classification":
        batch["label"] = rng.integers(0, 16, size=16).astype(np.int32)
    elif task == "contrastive":
        batch["text"] = rng.integers(1, 64, size=(16, 8)).astype(np.int32)
    return batch


def _one_step(task_name: str, mesh_spec, preset: str, devices):
    config = _config(task_name)
    task = tasks.get_task(config)
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = sharding.get_rules(preset)
    batch = _batch(task_name)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables, shardings = sharding.init_sharded(task.init_variables, mesh, rules,
                                                     jax.random.key(0), batch)
        params, param_shardings = variables["params"], shardings["params"]
        tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, 10, params)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_shardings = optimizer_shardings(tx, params, param_shardings, replicated)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
                 "nonfinite": faults.init_counters()}
        state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                           "nonfinite": {"count": replicated, "first_step": replicated}}
        train_step = make_train_step(task, tx, schedule, jax.random.key(1))

        def step_and_grads(state, batch):
            """The trainer's step, and the gradients it took (its loss at its step's rng)."""
            rng = jax.random.fold_in(jax.random.key(1), state["step"])
            grads = jax.grad(lambda p: task.loss(p, batch, rng)[0])(state["params"])
            return (*train_step(state, batch), grads)

        step = jax.jit(step_and_grads, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(state_shardings, replicated, param_shardings))
        before = jax.device_get(state["params"])
        state, metrics, grads = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
        return (before, jax.device_get(state["params"]), jax.device_get(metrics), jax.device_get(grads),
                state["params"])


@pytest.fixture(scope="module", params=["classification", "contrastive", "mae"])
def reference(request):
    return request.param, _one_step(request.param, [("data", 1)], "dp", jax.devices()[:1])


@pytest.mark.parametrize("preset", list(MESHES))
def test_sharded_step_equals_single_device(reference, preset):
    task_name, (ref_before, ref_after, ref_metrics, ref_grads, _) = reference
    before, after, metrics, grads, params = _one_step(task_name, MESHES[preset], preset, jax.devices())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, ref_before)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=RTOL, atol=ATOL)
    flat, ref_flat = (jax.tree_util.tree_leaves_with_path(g) for g in (grads, ref_grads))
    largest = max(np.abs(b).max() for _, b in ref_flat)
    for (path, a), (_, b) in zip(flat, ref_flat, strict=True):
        atol = max(GRAD_ATOL_OF_LEAF * np.abs(b).max(), GRAD_ATOL_OF_ALL * largest)
        np.testing.assert_allclose(a, b, rtol=GRAD_RTOL, atol=atol, err_msg=jax.tree_util.keystr(path))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=UPDATE_ATOL), after, ref_after)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), after, before))
    assert sum(changed) > 0.9 * len(changed), "the step should update (almost) every parameter"
    if preset != "dp":
        assert sharding.unsharded_fraction(params) < 0.2
    else:
        assert sharding.unsharded_fraction(params) == 1.0


@pytest.mark.parametrize("task_name", ["classification", "contrastive"])
def test_fsdp_stores_an_eighth_per_device(task_name):
    config = _config(task_name)
    task = tasks.get_task(config)
    mesh = sharding.make_mesh([("fsdp", 8)])
    rules = sharding.get_rules("fsdp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables, _ = sharding.init_sharded(task.init_variables, mesh, rules, jax.random.key(0), _batch(task_name))
    params = variables["params"]
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    per_device = sharding.per_device_bytes(params)
    print(f"{task_name}: per-device {per_device} of {total} bytes = 1/{total / per_device:.2f}")
    assert per_device <= total / 8 * 1.15
    with pytest.raises(ValueError, match="replicated"):
        sharding.check_sharded(params, max_unsharded_fraction=0.0)


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        sharding.make_mesh([("data", 3), ("fsdp", -1)])
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh([("data", 2), ("fsdp", 2)])
    with pytest.raises(ValueError, match="Unknown sharding preset"):
        sharding.get_rules("zero3")
    assert dict(sharding.make_mesh([("data", -1), ("tensor", 2)]).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
