"""Sharded == unsharded for BEiT pretraining: loss and gradients (BEiT with its shared relative
position bias, plus the frozen dVAE) under the fsdp_tp preset on 8 CPU devices match one device.
MAE is built from the same layers as the ViT that tests/test_sharding.py covers."""

import flax.linen as nn
import jax
import numpy as np

from mmjax import configs, sharding, tasks

SPEC = "experiments/beit/in1k_pretrain.py:smoke=True"


def _loss_and_grads(mesh_spec, preset: str, devices):
    task = tasks.get_task(configs.load_config(SPEC))
    mesh = sharding.make_mesh(mesh_spec, devices)
    rules = sharding.get_rules(preset)
    batch = {"image": np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)}
    abstract = jax.eval_shape(task.init_variables, jax.random.key(0), batch)["params"]
    rng = np.random.default_rng(2)                   # random params placed sharded (no init compile)
    params = jax.tree.map(lambda x, s: jax.device_put((0.3 * rng.normal(size=x.shape)).astype(np.float32), s),
                          nn.meta.unbox(abstract), sharding.logical_shardings(abstract, mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
        (loss, _), grads = fn(params, jax.device_put(batch, sharding.batch_sharding(mesh)), jax.random.key(1))
        fraction = sharding.unsharded_fraction(params)
        return float(loss), jax.device_get(grads), fraction


def test_beit_fsdp_tp_matches_one_device():
    ref_loss, ref_grads, _ = _loss_and_grads([("data", 1)], "dp", jax.devices()[:1])
    loss, grads, replicated = _loss_and_grads([("data", 2), ("fsdp", 2), ("tensor", 2)], "fsdp_tp", jax.devices())
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert replicated < 0.5, f"{replicated:.0%} of the parameter bytes are replicated under fsdp_tp"
