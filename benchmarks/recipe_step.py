"""Times one recipe's train step on this machine's devices: the recipe's task, model, optimizer,
frozen parameters and sharding preset, random parameters (no warm start), and a batch of one
made-up example run through the recipe's pp and repeated (benchmarks/fusion_memory.py's). The
train state is created as the trainer creates it, and the step is the trainer's. Reports examples/s,
the task's analytic model FLOPs (frozen towers counted forward only) with MFU where the device's
peak is known, and the compiled and measured device memory.

Used by benchmarks/gpu.py for its recipe rows (BLIP-2 stage 2 with a frozen OPT-2.7B in bf16).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import timing
from benchmarks.fusion_memory import made_up_features
from mmjax import configs, faults, flops, optim, sharding, tasks, train


def recipe_config(spec: str, overrides: list[str], batch: int):
    """The recipe's config with `--config.*` overrides and the global batch of this measurement."""
    config = configs.apply_overrides(configs.load_config(spec), list(overrides))
    with config.unlocked():
        config.input.batch_size = batch
    return config


def train_state(task: tasks.Task, config, mesh, rules, init_batch: dict[str, jax.Array]):
    """(state, state shardings, compiled-ready step function) as `train.train` builds them, fresh."""
    rng = jax.random.key(config.get("seed", 0))
    init_rng, dropout_rng = jax.random.split(rng)
    replicated = NamedSharding(mesh, PartitionSpec())
    variables, var_shardings = sharding.init_sharded(task.init_variables, mesh, rules, init_rng, init_batch)
    params, param_shardings = variables["params"], var_shardings["params"]
    tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, train.total_steps(config), params)
    opt_shardings = train.optimizer_shardings(tx, params, param_shardings, replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    extra, extra_shardings = train.init_extra_state(task, params, mesh, rules, init_rng, init_batch)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
             "nonfinite": faults.init_counters(), **extra}
    shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                 "nonfinite": {"count": replicated, "first_step": replicated}, **extra_shardings}
    step = train.make_train_step(task, tx, schedule, dropout_rng, optim.trainable_mask(config.optimizer, params))
    step_fn = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(shardings, replicated), donate_argnums=(0,))
    return state, step_fn


def measure(spec: str, overrides: list[str], batch: int, warmup: int, steps: int) -> dict[str, Any]:
    """Times `steps` train steps of the recipe after `warmup` (the first one compiles)."""
    config = recipe_config(spec, overrides, batch)
    task = tasks.get_task(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.get_rules(config.get("sharding", "dp"))
    dp = sharding.data_parallel_size(mesh)
    if batch % dp:
        raise ValueError(f"batch {batch} is not divisible by the data-parallel size {dp}")
    example = made_up_features(config, task.tokenizer)
    batch_sharding = sharding.batch_sharding(mesh)
    host = {k: np.broadcast_to(v, (batch, *v.shape)) for k, v in example.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init_batch = {k: jnp.zeros((dp, *v.shape), v.dtype) for k, v in example.items()}
        state, step_fn = train_state(task, config, mesh, rules, init_batch)
        data = {k: jax.device_put(v, batch_sharding) for k, v in host.items()}
        sizes = [math.prod(x.shape) for x in jax.tree.leaves(state["params"])]
        trainable = optim.trainable_mask(config.optimizer, state["params"])
        kept = jax.tree.leaves(trainable) if trainable is not None else [True] * len(sizes)
        n_params, n_trained = sum(sizes), sum(n for n, keep in zip(sizes, kept) if keep)
        timed = timing.time_jax(step_fn, (state, data), warmup, steps, batch, carry_state=True)
    example_flops = task.train_flops_per_example({k: (batch, *v.shape) for k, v in example.items()})
    device_kind = jax.devices()[0].device_kind
    row = {"recipe": spec, "overrides": list(overrides), "task": config.task, "global_batch": batch,
           "mesh": dict(mesh.shape), "device_kind": device_kind, "params_millions": n_params / 1e6,
           "trained_params_millions": n_trained / 1e6, "batch_shapes": {k: list(v.shape) for k, v in example.items()},
           "train": timed, "device_peak_bytes": timing.device_memory_peak()}
    if example_flops:
        row["model_gflops_per_example"] = example_flops / 1e9
        row.update(flops.throughput(example_flops, timed["examples_per_sec"], jax.device_count(), device_kind))
    return row
