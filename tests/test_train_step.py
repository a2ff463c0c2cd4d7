"""The jitted train step (mmjax.train.make_train_step) beyond one task's loss:

* frozen sub-trees (`optimizer.freeze`) are not differentiated: the compiled step of a CLIP with
  its image tower frozen does about two image-tower forwards' worth fewer FLOPs than the step that
  differentiates everything and zeroes the frozen updates (what the trainer did before), and it
  moves the trainable parameters exactly as that step does;
* a task's extra state (Task.init_extra_state / train_loss) is created in the parameters'
  logical-axis shardings, updated in the step, kept as it was when `nonfinite="skip"` drops a
  step, and wrong shapes or reserved names are named in the error.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import faults, optim, sharding, tasks, train

FROZEN_IMAGE_TOWER = ("^visual/", "^image_proj/")


def _clip_config(freeze=()):
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.model = dict(embed_dim=32, image=dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8),
                   text=dict(vocab_size=64, context_length=8, width=32, depth=1, num_heads=2))
    c.input = dict(tokenizer=dict(name="shapes", context_length=8))
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0,
                       freeze=list(freeze))
    c.schedule = dict(lr=1e-3, warmup_steps=0, decay="constant")
    return c


def _clip_batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
            "text": rng.integers(1, 64, size=(8, 8)).astype(np.int32)}


def _full_gradient_step(task, tx, schedule, rng):
    """The step before frozen leaves were partitioned out: every parameter differentiated, the
    optimizer's set_to_zero discarding the frozen gradients."""
    def step(state, batch):
        (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(
            state["params"], batch, jax.random.fold_in(rng, state["step"]))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return dict(state, step=state["step"] + 1, params=optax.apply_updates(state["params"], updates),
                    opt_state=opt_state), {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return step


def _compiled(freeze, old=False):
    config = _clip_config(freeze)
    task = tasks.get_task(config)
    batch = _clip_batch()
    params = jax.jit(lambda r: nn.meta.unbox(task.init_variables(r, batch)))(jax.random.key(0))["params"]
    tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, 10, params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "nonfinite": faults.init_counters()}
    rng = jax.random.key(1)
    make = _full_gradient_step if old else train.make_train_step
    args = (task, tx, schedule, rng) + (() if old else (optim.trainable_mask(config.optimizer, params),))
    step = jax.jit(make(*args))
    flops = step.lower(state, batch).compile().cost_analysis()["flops"]
    new_state, _ = step(state, batch)
    image_forward = jax.jit(lambda p, x: task.model.apply({"params": p}, x, method="encode_image"))
    forward_flops = image_forward.lower(params, batch["image"]).compile().cost_analysis()["flops"]
    return flops, forward_flops, state, jax.device_get(new_state)


def test_frozen_image_tower_is_not_differentiated():
    all_flops, image_forward, _, _ = _compiled(())
    frozen_flops, _, before, after = _compiled(FROZEN_IMAGE_TOWER)
    old_flops, _, _, old_after = _compiled(FROZEN_IMAGE_TOWER, old=True)
    saved = old_flops - frozen_flops
    print(f"\ncompiled train step FLOPs: all trainable {all_flops:.4g}, image tower frozen {frozen_flops:.4g} "
          f"(full-gradient step with the tower frozen: {old_flops:.4g}); saved {saved:.4g} = "
          f"{saved / image_forward:.2f}x the image tower's forward ({image_forward:.4g})")
    # The image tower's backward (activation and weight gradients) is about twice its forward.
    assert 1.5 * image_forward < saved < 2.5 * image_forward
    assert frozen_flops < all_flops - 1.5 * image_forward
    # Frozen leaves stay bit-identical; trainable ones move as in the full-gradient step, up to
    # float rounding (the two programs fuse differently) that AdamW's first step scales by up to
    # lr / eps where a gradient is ~0 (the attention key biases): 1% of lr, as tests/test_sharding.py.
    mask = optim.trainable_mask(_clip_config(FROZEN_IMAGE_TOWER).optimizer, before["params"])
    for keep, a, b, start in zip(jax.tree.leaves(mask), jax.tree.leaves(after["params"]),
                                 jax.tree.leaves(old_after["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
        assert keep or np.array_equal(a, start)


# --- Extra state: a toy task that counts its steps and keeps an EMA of its weights ---------------

class CountingTask(tasks.Task):
    """Least squares on x @ w; extra state: how many steps ran, and an EMA of the parameters."""

    def __init__(self, extra_names=("ema_params", "seen"), wrong_shape=False):
        super().__init__(ml_collections.ConfigDict())
        self.extra_names, self.wrong_shape = extra_names, wrong_shape

    def init_variables(self, rng, batch):
        w = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp"))(rng, (16, 8))
        return {"params": {"w": w}}

    def loss(self, params, batch, rng):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    def init_extra_state(self, params, rng):
        ema_name, count_name = self.extra_names
        return {ema_name: jax.tree.map(jnp.copy, params), count_name: jnp.zeros((), jnp.int32)}

    def train_loss(self, params, extra, batch, rng):
        loss, metrics = self.loss(params, batch, rng)
        ema = jax.tree.map(lambda m, p: 0.5 * m + 0.5 * jax.lax.stop_gradient(p), extra["ema_params"], params)
        seen = extra["seen"] + 1
        if self.wrong_shape:
            seen = jnp.zeros((2,), jnp.int32)
        return loss, (metrics, {"ema_params": ema, "seen": seen})


def _toy_state(task, mesh_spec=(("fsdp", 8),), preset="fsdp"):
    mesh, rules = sharding.make_mesh(list(mesh_spec)), sharding.get_rules(preset)
    batch = {"x": jnp.ones((8, 16)), "y": jnp.zeros((8, 8))}
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables, shardings = sharding.init_sharded(task.init_variables, mesh, rules, jax.random.key(0), batch)
        extra, extra_shardings = train.init_extra_state(task, variables["params"], mesh, rules,
                                                        jax.random.key(0), batch)
    tx = optax.sgd(0.1)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"], "opt_state": tx.init(variables["params"]),
             "nonfinite": faults.init_counters(), **extra}
    return state, tx, mesh, shardings["params"], extra_shardings, replicated


def test_extra_state_is_sharded_like_params_updated_and_kept_on_skipped_steps():
    task = CountingTask()
    state, tx, mesh, param_shardings, extra_shardings, _ = _toy_state(task)
    assert extra_shardings["ema_params"] == param_shardings      # the same logical axes, the same rules
    assert state["ema_params"]["w"].sharding.spec == state["params"]["w"].sharding.spec == PartitionSpec("fsdp", None)
    assert state["seen"].sharding.is_fully_replicated    # an unboxed leaf
    np.testing.assert_array_equal(state["ema_params"]["w"], state["params"]["w"])
    step = jax.jit(train.make_train_step(task, tx, optax.constant_schedule(0.1), jax.random.key(1)),
                   donate_argnums=(0,))
    good = {"x": jnp.ones((8, 16)), "y": jnp.zeros((8, 8))}
    with jax.set_mesh(mesh):
        state, _ = step(state, good)
        state, _ = step(state, good)
        assert int(state["seen"]) == 2
        kept = jax.device_get(state)
        state, metrics = step(state, {"x": jnp.full((8, 16), jnp.nan), "y": jnp.zeros((8, 8))})
    assert int(metrics["nonfinite_steps"]) == 1 and int(state["step"]) == 3
    # The dropped step changed neither the parameters nor the task's state (config.nonfinite="skip").
    for name in ("params", "ema_params", "seen", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state[name]), kept[name])


def test_extra_state_errors_are_named():
    with pytest.raises(ValueError, match=r"other than \(.step., .params.*got \[.ema_params., .params.\]"):
        _toy_state(CountingTask(extra_names=("ema_params", "params")))
    task = CountingTask(wrong_shape=True)
    state, tx, mesh, *_ = _toy_state(task)
    with pytest.raises(ValueError, match="CountingTask.train_loss returned extra state unlike"):
        jax.eval_shape(train.make_train_step(task, tx, optax.constant_schedule(0.1), jax.random.key(1)),
                       state, {"x": jnp.ones((8, 16)), "y": jnp.zeros((8, 8))})
