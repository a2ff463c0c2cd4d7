"""MAE learns on the embedded shapes data: the reconstruction loss falls clearly, and linear
probes on the trained encoder beat the same probes on the randomly initialised encoder: by far
for the shape's position (which reconstruction needs), a little for the 24-way class (colour is
already linear in random features; the shape itself takes longer to learn).

The run uses the task, optimizer and schedule of experiments/mae/shapes.py on one device with
the training images held in memory (the trainer itself is covered by the smoke tests); the
evaluation is the task's own (`evals.recon`, `evals.probe`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import configs, optim, sharding, tasks
from mmjax.data import pipeline

STEPS = 3000


def _train_images(config, count: int) -> np.ndarray:
    batches = pipeline.eval_batches(config.input.data, config.input.pp, 500, max_examples=count)
    return np.concatenate([b["image"][np.asarray(b["mask"], bool)] for b in batches])


def test_mae_reconstruction_falls_and_probe_beats_random_encoder():
    config = configs.load_config(f"experiments/mae/shapes.py:steps={STEPS}")
    task = tasks.get_task(config)
    mesh = sharding.make_mesh(config.mesh)
    images = _train_images(config, 6000)
    batch_size = config.input.batch_size
    params = nn.meta.unbox(jax.jit(task.init_variables)(jax.random.key(0), {"image": images[:batch_size]}))["params"]
    tx, _ = optim.build_optimizer(config.optimizer, config.schedule, STEPS, params)

    @jax.jit
    def step(state, batch, rng):
        params, opt_state = state
        grads = jax.grad(lambda p: task.loss(p, batch, rng)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    before = task.evaluate(params, mesh)
    state, order = (params, tx.init(params)), np.random.default_rng(0)
    for i in range(STEPS):
        batch = {"image": jnp.asarray(images[order.integers(0, len(images), batch_size)])}
        state = step(state, batch, jax.random.key(i))
    after = task.evaluate(state[0], mesh)
    print(f"\nMAE shapes, {STEPS} steps of {batch_size}: test recon loss {before['recon/loss']:.3f} -> "
          f"{after['recon/loss']:.3f}; linear probe top-1, random vs trained encoder: position "
          f"{before['probe/position_top1']:.3f} vs {after['probe/position_top1']:.3f} (chance 0.111), "
          f"class {before['probe/label_top1']:.3f} vs {after['probe/label_top1']:.3f} (chance 0.042)")
    assert after["recon/loss"] < 0.2 * before["recon/loss"]
    assert after["probe/position_top1"] > before["probe/position_top1"] + 0.3
    assert after["probe/label_top1"] > before["probe/label_top1"] + 0.02
