"""The momentum-encoder contrastive task (mmjax/tasks/momentum_contrastive.py), the task that owns
extra train state (an EMA copy of the CLIP and two feature queues):

* it learns: the main job's model, 60 steps of 64 on the shapes data, zero-shot far above chance;
* `mmjax.load(workdir, which="ema")` gives the momentum parameters that the checkpoint holds;
* two trainer steps under fsdp_tp on 8 CPU devices equal the one-device steps: loss, every
  gradient, and every leaf of the new extra state (EMA parameters, queues, pointer).

Exact resume of extra train state is tested on ALBEF's (tests/tasks/test_albef_task.py), SIGKILL at
any moment on the plain trainer (tests/test_resume.py).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import mmjax
from mmjax import checkpoint, configs, faults, optim, sharding, tasks, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = "experiments/clip/shapes_momentum.py"
CHANCE = 1 / 24
# Measured on 2 shared CPU cores, the main job's one-layer tower with linear decay: zero-shot top-1
# 0.136 after 60 steps of 64 with a queue of 4 batches (3.3x chance; the earlier 4-layer tower: 0.178).
STEPS, BOUND = 60, 2.5


@pytest.fixture(scope="module")
def momentum_run(module_tmp):
    workdir = str(module_tmp("momentum"))
    config = configs.apply_overrides(configs.load_config(f"{SPEC}:steps={STEPS},batch=64,queue=256"), [
        "--config.evals.every_steps=0", "--config.checkpoint.every_steps=100000",
        "--config.evals.zeroshot.max_examples=500", "--config.evals.retrieval.max_examples=500"])
    return workdir, train.train(config, workdir)


def test_momentum_task_learns_far_above_chance(momentum_run):
    _, final = momentum_run
    top1 = final["zeroshot/top1"]
    print(f"momentum ITC zero-shot top-1 after {STEPS} steps of 64: {top1:.3f} ({top1 / CHANCE:.1f}x chance)")
    assert top1 >= BOUND * CHANCE


def test_load_which_ema_returns_the_momentum_parameters(momentum_run):
    workdir, _ = momentum_run
    state = checkpoint.load_train_state(workdir)
    assert sorted(state) == ["ema_params", "nonfinite", "opt_state", "params", "queue", "step"]
    assert int(state["queue"]["pointer"]) == STEPS * 64 % 256
    model, ema = mmjax.load(workdir, which="ema")
    _, online = mmjax.load(workdir)
    jax.tree.map(np.testing.assert_array_equal, ema["params"], state["ema_params"])
    jax.tree.map(np.testing.assert_array_equal, online["params"], state["params"])
    # After 60 steps at decay 0.995 the momentum model trails the online one: they differ.
    kernel = lambda tree: np.asarray(tree["visual"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"])  # noqa: E731
    assert not np.array_equal(kernel(ema["params"]), kernel(online["params"]))
    out = model.apply(ema, np.zeros((2, 32, 32, 3), np.float32), np.ones((2, 16), np.int32))
    assert out["image_embeds"].shape == (2, 128) and np.all(np.isfinite(out["image_embeds"]))


# --- Sharded == unsharded -----------------------------------------------------------------------

RTOL = 2e-5   # float32 partial sums in another order (as tests/test_sharding.py)


def _tiny_config():
    config = configs.load_config(f"{SPEC}:smoke=True")
    tower = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
    return configs.apply_overrides(config, [
        "--config.input.batch_size=16", "--config.momentum.queue_size=32", "--config.model.embed_dim=32",
        *[f"--config.model.image.{k}={v}" for k, v in tower.items()],
        *[f"--config.model.text.{k}={v}" for k, v in tower.items()]])


def _batch(step):
    rng = np.random.default_rng(step)
    return {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
            "text": rng.integers(1, 200, size=(16, 16)).astype(np.int32)}


def _two_steps(mesh_spec, preset, devices):
    """(loss and grads of step 1, extra state after steps 1 and 2, params after step 2), on host."""
    config = _tiny_config()
    task = tasks.get_task(config)
    mesh, rules = sharding.make_mesh(mesh_spec, devices), sharding.get_rules(preset)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables, shardings = sharding.init_sharded(task.init_variables, mesh, rules, jax.random.key(0), _batch(0))
        params, param_shardings = variables["params"], shardings["params"]
        extra, extra_shardings = train.init_extra_state(task, params, mesh, rules, jax.random.key(0), _batch(0))
        tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, 10, params)
        opt_shardings = train.optimizer_shardings(tx, params, param_shardings, replicated)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
                 "nonfinite": faults.init_counters(), **extra}
        state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                           "nonfinite": {"count": replicated, "first_step": replicated}, **extra_shardings}
        rng = jax.random.key(1)
        grads_fn = jax.jit(jax.value_and_grad(
            lambda p, e, b: task.train_loss(p, e, b, jax.random.fold_in(rng, 0)), has_aux=True))
        (loss, (_, first_extra)), grads = grads_fn(params, extra, jax.device_put(_batch(1), batch_sharding))
        step = jax.jit(train.make_train_step(task, tx, schedule, rng),
                       in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated))
        state, _ = step(state, jax.device_put(_batch(1), batch_sharding))
        after_one = {k: state[k] for k in extra}
        state, metrics = step(state, jax.device_put(_batch(2), batch_sharding))
        ema_fraction = (sharding.unsharded_fraction(state["ema_params"]), sharding.unsharded_fraction(state["params"]))
        host = jax.device_get
        return (float(loss), host(grads), host(first_extra), host(after_one), host({k: state[k] for k in extra}),
                host(state["params"]), float(metrics["loss"]), ema_fraction)


@pytest.fixture(scope="module")
def unsharded():
    return _two_steps([("data", 1)], "dp", jax.devices()[:1])


def test_fsdp_tp_step_equals_one_device(unsharded):
    """Through the trainer's compiled step (the extra state it carries between steps): under
    fsdp_tp on 8 devices, loss, every gradient and every extra-state leaf equal one device's."""
    from sharded_equality import FSDP_TP, assert_trees_close

    loss, grads, first_extra, after_one, after_two, params, loss2, ema_fraction = _two_steps(
        FSDP_TP, "fsdp_tp", jax.devices())
    want = unsharded
    np.testing.assert_allclose(loss, want[0], rtol=RTOL)
    worst = assert_trees_close(grads, want[1], "gradient")
    assert_trees_close(first_extra, want[2], "extra state from train_loss")
    assert_trees_close(after_one, want[3], "extra state after step 1")
    extra_diff = assert_trees_close(after_two, want[4], "extra state after step 2")
    np.testing.assert_allclose(loss2, want[6], rtol=RTOL)
    assert int(after_two["queue"]["pointer"]) == 0 and int(after_one["queue"]["pointer"]) == 16
    # Step 1 enqueued its batch's momentum embeddings into rows 0-15, step 2 into rows 16-31.
    np.testing.assert_array_equal(after_one["queue"]["image"][:16], after_two["queue"]["image"][:16])
    assert not np.array_equal(after_one["queue"]["image"][16:], after_two["queue"]["image"][16:])
    assert_trees_close(after_one, first_extra, "the step's extra state against train_loss's")
    # The momentum copy shards like the parameters it follows.
    assert ema_fraction[0] == ema_fraction[1] < 1.0, ema_fraction
    print(f"fsdp_tp: max |grad diff| {worst:.2g}, max |extra state diff| {extra_diff:.2g}")
