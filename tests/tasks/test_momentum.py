"""The momentum-encoder contrastive task (mmjax/tasks/momentum_contrastive.py), the task that owns
extra train state (an EMA copy of the CLIP and two feature queues):

* it learns: the main job's model, 60 steps of 64 on the shapes data, zero-shot far above chance;
* `mmjax.load(workdir, which="ema")` gives the momentum parameters that the checkpoint holds;
* one train step equals the unsharded step under dp / fsdp / fsdp_tp on 8 CPU devices: loss,
  every gradient, and every leaf of the new extra state (EMA parameters, queues, pointer);
* killed with SIGKILL mid-run and restarted, its final train state equals an uninterrupted run's
  byte for byte (EMA parameters and queues included).
"""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainer_process
from jax.sharding import NamedSharding, PartitionSpec

import mmjax
from mmjax import checkpoint, configs, faults, optim, sharding, tasks, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = "experiments/clip/shapes_momentum.py"
CHANCE = 1 / 24
# Measured on 2 shared CPU cores (about 90 s with compiles and evaluations): zero-shot top-1
# 0.178 after 60 steps of 64 with a queue of 4 batches (the plain CLIP loss: 0.198), 0.206 after 100.
STEPS, BOUND = 60, 3.0


@pytest.fixture(scope="module")
def momentum_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("momentum"))
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

MESHES = {"dp": [("data", 8)], "fsdp": [("data", 2), ("fsdp", 4)],
          "fsdp_tp": [("data", 2), ("fsdp", 2), ("tensor", 2)]}
RTOL, ATOL = 2e-5, 2e-6   # float32 partial sums in another order (as tests/test_sharding.py)


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


def _assert_trees_close(got, want, what, atol=ATOL):
    paths = jax.tree_util.tree_leaves_with_path(want)
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, b), a in zip(paths, jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("preset", list(MESHES))
def test_sharded_step_equals_one_device(unsharded, preset):
    loss, grads, first_extra, after_one, after_two, params, loss2, ema_fraction = _two_steps(
        MESHES[preset], preset, jax.devices())
    want = unsharded
    np.testing.assert_allclose(loss, want[0], rtol=RTOL)
    _assert_trees_close(grads, want[1], "gradient")
    _assert_trees_close(first_extra, want[2], "extra state from train_loss")
    _assert_trees_close(after_one, want[3], "extra state after step 1")
    _assert_trees_close(after_two, want[4], "extra state after step 2")
    np.testing.assert_allclose(loss2, want[6], rtol=RTOL)
    assert int(after_two["queue"]["pointer"]) == 0 and int(after_one["queue"]["pointer"]) == 16
    # Step 1 enqueued its batch's momentum embeddings into rows 0-15, step 2 into rows 16-31.
    np.testing.assert_array_equal(after_one["queue"]["image"][:16], after_two["queue"]["image"][:16])
    assert not np.array_equal(after_one["queue"]["image"][16:], after_two["queue"]["image"][16:])
    _assert_trees_close(after_one, first_extra, "the step's extra state against train_loss's")
    # The momentum copy shards like the parameters it follows.
    assert ema_fraction[0] == ema_fraction[1] and (ema_fraction[0] == 1.0) == (preset == "dp"), ema_fraction
    worst = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
    print(f"{preset}: max |grad diff| {worst(grads, want[1]):.2g}, "
          f"max |extra state diff| {worst(after_two, want[4]):.2g}")


# --- SIGKILL and resume -------------------------------------------------------------------------

RESUME_STEPS = 8
RESUME_ARGS = ["--config", f"{SPEC}:smoke=True", f"--config.total_steps={RESUME_STEPS}", "--config.log_every_steps=1",
               "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2", "--config.input.batch_size=16",
               "--config.momentum.queue_size=48", "--config.model.embed_dim=32",
               "--config.model.image.depth=1", "--config.model.image.width=32", "--config.model.image.mlp_dim=64",
               "--config.model.text.depth=1", "--config.model.text.width=32", "--config.model.text.mlp_dim=64",
               "--config.mesh=[('data', 4), ('fsdp', 2)]", "--config.sharding=fsdp",
               "--config.evals.zeroshot.max_examples=8", "--config.evals.zeroshot.batch_size=8",
               "--config.evals.retrieval.max_examples=8", "--config.evals.retrieval.batch_size=8"]


def _run(workdir, env, kill_on=None):
    proc = subprocess.Popen([sys.executable, "-u", "-m", "mmjax.train", *RESUME_ARGS, "--workdir", workdir],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return trainer_process.watch(proc, kill_on)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_sigkill_mid_run_resumes_bit_exactly(tmp_path):
    env = trainer_process.trainer_env(str(tmp_path / "jax_cache"), 8)
    reference = str(tmp_path / "reference")
    _run(reference, env)
    workdir = str(tmp_path / "killed")
    lines, killed = _run(workdir, env, lambda line: line.startswith(f"step 5/{RESUME_STEPS} "))
    assert killed, "".join(lines[-20:])
    lines, _ = _run(workdir, env)
    resumed = [int(m.group(1)) for m in (re.match(r"Resumed from step (\d+)", x) for x in lines) if m]
    assert resumed and 2 <= resumed[0] <= 4, "".join(lines[-20:])
    nbytes = trainer_process.assert_same_train_state(reference, workdir)
    state = checkpoint.load_train_state(workdir)
    assert int(state["queue"]["pointer"]) == RESUME_STEPS * 16 % 48
    assert _losses(workdir) == _losses(reference)
    print(f"\nmomentum task: killed at step 5, resumed from {resumed[0]}: {nbytes} train-state bytes equal "
          "(EMA parameters and queues included), every logged loss equal")
