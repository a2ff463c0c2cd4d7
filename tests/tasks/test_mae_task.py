"""The mae task: its loss is the model's masked pixel loss with noise drawn from the step rng,
and evaluation is reproducible."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs, sharding, tasks
from mmjax.losses import masked_modeling
from mmjax.models import mae


def _config(*overrides):
    return configs.apply_overrides(configs.load_config("experiments/mae/shapes.py:smoke=True"), list(overrides))


def test_loss_is_the_masked_pixel_loss_and_depends_on_the_rng():
    task = tasks.get_task(_config())
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), {"image": images}))["params"]
    rng = np.random.default_rng(1)                       # random params without compiling init
    params = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes)
    loss_fn = jax.jit(task.loss)
    loss, metrics = loss_fn(params, {"image": images}, jax.random.key(1))
    again, _ = loss_fn(params, {"image": images}, jax.random.key(1))
    other, _ = loss_fn(params, {"image": images}, jax.random.key(2))
    assert float(loss) == float(again) and float(loss) != float(other)
    assert abs(float(metrics["masked_share"]) - 0.75) < 1e-6
    # Same numbers from the pieces: the noise comes from the first half of the split step rng.
    mask_rng, _ = jax.random.split(jax.random.key(1))
    noise = jax.random.uniform(mask_rng, (2, 16))                  # 8-px patches of 32-px images
    out = task.model.apply({"params": params}, images, noise)
    expected, _ = masked_modeling.mim_pixels(out["pred"], mae.patchify(images, 8), out["mask"],
                                             norm_pix=task.norm_pix)
    assert abs(float(loss) - float(expected)) < 1e-6


def test_evaluation_is_reproducible_and_config_errors():
    config = _config()
    task = tasks.get_task(config)
    mesh = sharding.make_mesh(config.mesh)
    shapes = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), {"image": jnp.zeros((8, 32, 32, 3))}))
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), shapes["params"])
    first = task.evaluate(params, mesh)
    assert set(first) == {"recon/loss", "probe/label_top1", "probe/position_top1"}
    assert 0.0 <= first["probe/label_top1"] <= 1.0
    assert first["recon/loss"] == task.evaluate(params, mesh)["recon/loss"]
    bad = configs.apply_overrides(config, [])
    with bad.unlocked():
        bad.loss.norm_pixels = True
    with pytest.raises(ValueError, match="Unknown mae loss"):
        tasks.get_task(bad)
