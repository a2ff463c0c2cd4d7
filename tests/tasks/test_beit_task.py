"""The beit task: frozen dVAE targets inside the step, blockwise masks, the freeze check,
loading the tokenizer from an mmjax model directory, and the BEiT fine-tuning task."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs, optim, pretrained, tasks
from mmjax.models import dvae

SMOKE = "experiments/beit/in1k_pretrain.py:smoke=True"


def _config(*overrides):
    return configs.apply_overrides(configs.load_config(SMOKE), list(overrides))


@pytest.fixture(scope="module")
def task_and_params():
    task = tasks.get_task(_config())
    batch = {"image": np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)}
    shapes = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch))["params"]
    rng = np.random.default_rng(1)                       # random params without compiling init
    params = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)
    return task, params, batch


def test_targets_are_the_tokenizer_on_unnormalised_pixels(task_and_params):
    task, params, batch = task_and_params
    targets = np.asarray(task.targets(params["tokenizer"], jnp.asarray(batch["image"])))
    pixels = np.clip(batch["image"] * np.asarray(task.pixel_std) + np.asarray(task.pixel_mean), 0, 1)
    ids = task.tokenizer.apply({"params": params["tokenizer"]}, jnp.asarray(pixels), method="tokenize")
    assert targets.shape == (4, 16)
    np.testing.assert_array_equal(targets, np.asarray(ids).reshape(4, 16))


def test_step_trains_beit_and_leaves_the_tokenizer_alone(task_and_params):
    task, params, batch = task_and_params
    (loss, metrics), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(
        params, {"image": jnp.asarray(batch["image"])}, jax.random.key(1))
    assert np.isfinite(float(loss)) and 0 < float(metrics["masked_share"]) <= 6 / 16
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["tokenizer"]))
    assert float(optax_norm(grads["beit"])) > 0
    config = task.config
    tx, _ = optim.build_optimizer(config.optimizer, config.schedule, 10, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["tokenizer"]))


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="optimizer.freeze"):
        tasks.get_task(_config("--config.optimizer.freeze=()"))
    config = _config()
    config.tokenizer.checkpoint = None
    with pytest.raises(ValueError, match="tokenizer.checkpoint"):
        tasks.get_task(config)
    with pytest.raises(ValueError, match="vocab_size"):
        tasks.get_task(_config("--config.model.vocab_size=32"))
    with pytest.raises(ValueError, match="token grid"):
        task = tasks.get_task(_config("--config.tokenizer.image_size=64"))
        jax.eval_shape(task.init_variables, jax.random.key(0), {"image": jnp.zeros((2, 32, 32, 3))})


def test_tokenizer_loads_from_a_model_directory(tmp_path):
    encoder = dvae.DVAEEncoder(n_hid=16, blocks_per_group=1, vocab_size=64)
    spec = pretrained.input_spec((1, 32, 32, 3))
    shapes = nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    rng = np.random.default_rng(3)
    weights = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)
    pretrained.save(str(tmp_path / "dvae"), encoder, weights, [spec])
    config = _config()
    config.tokenizer = dict(checkpoint=str(tmp_path / "dvae"), image_size=32)
    task = tasks.get_task(config)
    assert task.tokenizer == encoder
    np.testing.assert_array_equal(np.asarray(task._tokenizer_params["input"]["kernel"]), weights["input"]["kernel"])
    params = jax.eval_shape(task.init_variables, jax.random.key(0), {"image": jnp.zeros((2, 32, 32, 3))})["params"]
    assert jax.tree.structure(nn.meta.unbox(params["tokenizer"])) == jax.tree.structure(weights)
    config.tokenizer = dict(checkpoint=str(tmp_path / "dvae"), image_size=32, n_hid=32)
    with pytest.raises(ValueError, match="come from the checkpoint"):
        tasks.get_task(config)


def test_beit_classification_task_trains_a_step():
    config = configs.load_config("experiments/beit/in1k_finetune.py:smoke=True")
    task = tasks.get_task(config)
    batch = {"image": jnp.zeros((2, 32, 32, 3)), "label": jnp.array([1, 2])}
    params = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch))["params"]
    assert "rel_pos_bias" in params["encoder"]["layers"] and params["head"]["kernel"].shape == (32, 24)
    loss, metrics = jax.eval_shape(task.loss, params, batch, jax.random.key(0))
    assert loss.shape == () and "batch_top1" in metrics
