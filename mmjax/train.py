"""The one training loop. CLI: `mmjax-train --config experiments/x.py[:k=v] --workdir DIR [--config.a.b=v]`.

config → mesh → task → sharded init (or restore) → donated, jitted train step → periodic
logging, evaluation and async checkpoints. Everything model-specific lives in the task.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import (
    checkpoint,
    configs,
    cpu_devices,
    distributed,
    faults,
    flops,
    optim,
    paths,
    runs,
    sharding,
    tasks,
    warm_start,
)
from mmjax import metrics as metrics_lib
from mmjax import progress as progress_lib
from mmjax.data import pipeline, sources

LOG_KEYS = ("loss", "lr", "examples_per_sec", "tflops_per_device", "mfu", "eval_time_share",
            "checkpoint_time_share", "eta")


def total_steps(config: ml_collections.ConfigDict) -> int:
    """`config.total_steps`, or `num_epochs` over the training split."""
    if config.get("total_steps"):
        return int(config.total_steps)
    if config.get("num_epochs"):
        examples = sources.num_examples(config.input.data)
        return max(int(config.num_epochs * examples // config.input.batch_size), 1)
    raise ValueError("Set config.total_steps or config.num_epochs")


def check_writable(workdir: str) -> None:
    """Local directories and bucket URLs (gs://, see mmjax.paths) alike: a probe file is written."""
    remote = paths.is_remote(workdir)
    try:
        paths.makedirs(workdir, exist_ok=True)
        probe = paths.join(workdir, f".write_probe.{os.uname().nodename}.{os.getpid()}")  # one per process
        with paths.open(probe, "w") as f:
            f.write("ok")
        paths.remove(probe)
    except ImportError as e:  # gs:// without gcsfs installed
        raise ValueError(f"Workdir {workdir!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - object stores raise their own errors (no bucket, 403)
        if not (remote or isinstance(e, OSError)):
            raise
        raise ValueError(f"Workdir {workdir!r} is not writable ({type(e).__name__}: {e}); pass a "
                         "--workdir this process can create and write to") from e


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings, replicated):
    """Shardings for the optimizer state: moments follow their parameters, counters replicate."""
    abstract = jax.eval_shape(tx.init, params)
    masked = lambda v: isinstance(v, optax.MaskedNode)  # noqa: E731 - frozen leaves (optimizer.freeze)
    return optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)


# The trainer's own train-state entries; any other entry is the task's extra state.
TRAINER_KEYS = ("step", "params", "opt_state", "nonfinite")


def init_extra_state(task: tasks.Task, params, mesh, rules, rng: jax.Array, init_batch) -> tuple[dict, dict]:
    """The task's extra train state (`Task.init_extra_state`) created in its shardings, which
    follow the same logical-axis rules as the parameters: (state entries, their shardings).

    `params` (the initial, possibly warm-started ones) reach the task in their logical boxes.
    A task that keeps the base class's method owns no extra state: ({}, {}), nothing traced.
    """
    if type(task).init_extra_state is tasks.Task.init_extra_state:
        return {}, {}
    boxes = jax.eval_shape(task.init_variables, rng, init_batch)["params"]   # the params' logical axes
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    boxed = jax.tree.map(lambda box, p: box.replace_boxed(p) if is_box(box) else p, boxes, params, is_leaf=is_box)
    extra_rng = jax.random.fold_in(rng, 1)   # init_rng itself made the parameters
    abstract = jax.eval_shape(task.init_extra_state, boxed, extra_rng)
    if abstract is None:
        return {}, {}
    if not isinstance(abstract, dict) or set(abstract) & set(TRAINER_KEYS):
        got = sorted(abstract) if isinstance(abstract, dict) else type(abstract).__name__
        raise ValueError(f"{type(task).__name__}.init_extra_state must return a dict of named entries "
                         f"other than {TRAINER_KEYS}; got {got}")
    return sharding.init_sharded(task.init_extra_state, mesh, rules, boxed, extra_rng)


def _check_extra(task: tasks.Task, old, new) -> None:
    same = jax.tree.structure(old) == jax.tree.structure(new) and all(
        (a.shape, a.dtype) == (b.shape, b.dtype) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
    if not same:
        raise ValueError(f"{type(task).__name__}.train_loss returned extra state unlike the one it was "
                         f"given (structure, shapes and dtypes must stay): {jax.tree.map(jnp.shape, new)} "
                         f"for {jax.tree.map(jnp.shape, old)}")


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    dropout_rng: jax.Array, trainable=None):
    """(state, batch) -> (new state, metrics): one optimizer step on the task's loss.

    State entries besides TRAINER_KEYS are the task's extra state, which `Task.train_loss`
    updates. `trainable` (`optim.trainable_mask`, None: all) leaves out frozen parameters: the
    loss is differentiated w.r.t. the trainable ones alone, the frozen ones are constants to it.
    """

    def train_step(state, batch):
        step_rng = jax.random.fold_in(dropout_rng, state["step"])
        extra = {k: v for k, v in state.items() if k not in TRAINER_KEYS}
        params, frozen = optim.split_frozen(state["params"], trainable)

        def loss_fn(params):
            return task.train_loss(optim.merge_frozen(params, frozen, trainable), extra, batch, step_rng)

        (loss, (aux, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        _check_extra(task, extra, new_extra)
        grad_norm = optax.tree.norm(grads)

        def apply_update(grads_and_extra, params, opt_state, extra):
            grads, new_extra = grads_and_extra
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, new_extra

        params, opt_state, extra = faults.apply_if_finite(loss, grad_norm, apply_update, (grads, new_extra),
                                                          params, state["opt_state"], extra)
        step = state["step"] + 1
        new_state = dict(state, step=step, params=optim.merge_frozen(params, frozen, trainable),
                         opt_state=opt_state, **extra,
                         nonfinite=faults.count_nonfinite(state["nonfinite"], loss, grad_norm, step))
        aux = dict(aux, loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]),
                   nonfinite_steps=new_state["nonfinite"]["count"])
        return new_state, aux

    return train_step


def train(config: ml_collections.ConfigDict, workdir: str, progress: str | None = None) -> dict[str, float]:
    """Runs (or resumes) the experiment; returns the final evaluation metrics.

    `progress`: "bar", "lines" or "auto" (default, or $MMJAX_PROGRESS): see mmjax/progress.py.
    """
    check_writable(workdir)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.get_rules(config.get("sharding", "dp"))
    dp = sharding.data_parallel_size(mesh)
    global_batch = int(config.input.batch_size)
    if global_batch % dp:
        raise ValueError(f"input.batch_size={global_batch} is not divisible by the data-parallel "
                         f"size {dp} (mesh {dict(mesh.shape)}); change one of them")
    steps = total_steps(config)
    guard = faults.NonFiniteGuard(config.get("nonfinite"))
    task = tasks.get_task(config)
    writer = metrics_lib.MetricWriter(workdir)
    if jax.process_index() == 0:
        with paths.open(paths.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    loader = pipeline.make_train_loader(
        config.input.data, config.input.pp, global_batch, seed=config.get("seed", 0),
        tokenizer=task.tokenizer, worker_count=config.input.get("worker_count", 0))
    shapes_batch = next(iter(loader))
    if jax.process_index() == 0:   # the run as a model: mmjax.load(workdir), mmjax-convert --input workdir
        runs.write_model_config(workdir, config, task, shapes_batch)
    data_iter = iter(loader)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def to_global(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                for k, v in local.items()}

    rng = jax.random.key(config.get("seed", 0))
    init_rng, dropout_rng = jax.random.split(rng)
    console = progress_lib.Progress(steps, global_batch, progress)  # process 0 prints; a bar on a TTY
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), console:
        init_batch = {k: jnp.zeros((dp,) + np.shape(v)[1:], np.asarray(v).dtype)
                      for k, v in shapes_batch.items()}
        variables, var_shardings = sharding.init_sharded(task.init_variables, mesh, rules, init_rng, init_batch)
        params, param_shardings = variables["params"], var_shardings["params"]
        ckpt_cfg = config.get("checkpoint", {})
        ckpt = checkpoint.Checkpointer(workdir, ckpt_cfg.get("every_steps", 1000), ckpt_cfg.get("keep", 3))
        if ckpt.latest_step() is None:  # config.init: a resumed run keeps its own parameters
            params = warm_start.apply(config, params, param_shardings)
        tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, steps, params)
        opt_shardings = optimizer_shardings(tx, params, param_shardings, replicated)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        extra, extra_shardings = init_extra_state(task, params, mesh, rules, init_rng, init_batch)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
                 "nonfinite": faults.init_counters(), **extra}
        state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                           "nonfinite": {"count": replicated, "first_step": replicated}, **extra_shardings}

        start, restored = ckpt.restore_latest(checkpoint.abstract_like(state, state_shardings), data_iter)
        if start is not None:
            state = restored
            console.write(f"Resumed from step {start} in {workdir}")
        start = int(start or 0)
        guard.start(state["nonfinite"])
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        console.write(f"{config.task}: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
                      f"{sharding.unsharded_fraction(state['params']):.0%} of parameter bytes replicated, "
                      f"{steps} steps of {global_batch} examples")

        example_flops = task.train_flops_per_example(
            {k: (global_batch,) + np.shape(v)[1:] for k, v in shapes_batch.items()})
        device_kind = jax.devices()[0].device_kind
        if example_flops:
            peak = flops.peak_tflops(device_kind)
            console.write(f"model FLOPs per training example: {example_flops / 1e9:.3g} GFLOP (analytic); "
                          + (f"MFU against {peak} TFLOP/s bf16 peak per {device_kind}" if peak else
                             f"no bf16 peak known for {device_kind!r}, so no MFU"))

        train_step = make_train_step(task, tx, schedule, dropout_rng, optim.trainable_mask(config.optimizer, params))
        step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                          out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        evals = config.get("evals", {})
        eval_every = int(evals.get("every_steps", 0) or 0)
        log_every = int(config.get("log_every_steps", 50))
        final: dict[str, float] = {}
        timer = {"t0": time.perf_counter(), "step0": start, "eval": 0.0, "ckpt": 0.0, "side0": 0.0,
                 "train_start": time.perf_counter()}

        def run_eval(step: int) -> dict[str, float]:
            t = time.perf_counter()
            results = task.evaluate(state["params"], mesh)
            timer["eval"] += time.perf_counter() - t
            if results:
                scalars = writer.write(step, results)
                console.write(f"eval @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
            return results

        console.start(start)
        for step in range(start + 1, steps + 1):
            state, step_metrics = step_fn(state, to_global(next(data_iter)))
            console.advance(step)
            if step == start + 1:
                console.write(f"first step (compile + run) took {time.perf_counter() - timer['t0']:.1f}s")
                timer["t0"], timer["step0"] = time.perf_counter(), step
                timer["side0"] = timer["eval"] + timer["ckpt"]
            if step % log_every == 0 or step == steps or ckpt.due(step):  # never save a bad state
                guard.check(state["nonfinite"], step, before_raise=ckpt.close)
            if step % log_every == 0 or step == steps:
                scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                elapsed = time.perf_counter() - timer["t0"]
                done = max(step - timer["step0"], 1)
                # Throughput of training alone: eval and checkpoint time in this interval left out.
                train_time = elapsed - (timer["eval"] + timer["ckpt"] - timer["side0"])
                scalars["examples_per_sec"] = done * global_batch / max(train_time, 1e-9)
                if example_flops:
                    scalars.update(flops.throughput(example_flops, scalars["examples_per_sec"],
                                                    jax.device_count(), device_kind))
                wall = time.perf_counter() - timer["train_start"]
                scalars["eval_time_share"] = timer["eval"] / max(wall, 1e-9)
                scalars["checkpoint_time_share"] = timer["ckpt"] / max(wall, 1e-9)
                writer.write(step, scalars)
                console.log(step, scalars, elapsed / done, LOG_KEYS)  # a line, or the live bar's stats
                timer["t0"], timer["step0"] = time.perf_counter(), step
                timer["side0"] = timer["eval"] + timer["ckpt"]
            if eval_every and step % eval_every == 0 and step != steps:
                run_eval(step)
            t = time.perf_counter()
            ckpt.save(step, state, data_iter, force=step == steps)
            timer["ckpt"] += time.perf_counter() - t
        final = run_eval(steps)
        ckpt.close()
    writer.close()
    if jax.process_index() == 0:
        with paths.open(paths.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({k: float(v) for k, v in final.items()}, f, indent=2)
    console.summary(workdir, final, start, steps, ckpt.directory)
    return final


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="mmjax-train", description="Train an mmjax experiment.",
        epilog="Override any config field with --config.FIELD=VALUE, e.g. --config.total_steps=100")
    parser.add_argument("--config", required=True, help="experiments/<paper>/<recipe>.py[:key=value,...]")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0, for multi-process runs outside TPU pods and "
                             "clusters that JAX detects by itself")
    parser.add_argument("--num_processes", type=int, default=None, help="with --coordinator_address")
    parser.add_argument("--process_id", type=int, default=None, help="with --coordinator_address")
    parser.add_argument("--progress", choices=progress_lib.MODES, default=None,
                        help="console output: a live progress bar, periodic 'step N/T | ...' lines, or "
                             f"auto (the bar when stdout is a terminal; the default, or ${progress_lib.ENV_VAR})")
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if not a.startswith("--config.")]
    if stray:
        parser.error(f"unrecognised arguments: {' '.join(stray)} (config fields are set with --config.FIELD=VALUE)")
    config = configs.load_config(args.config)
    with config.unlocked():  # trainer options an experiment may leave out, still overridable
        if "nonfinite" not in config:
            config.nonfinite = faults.DEFAULT_MODE
        if "cpu_devices" not in config:   # None: JAX's default, one CPU device
            config.cpu_devices = None
        config.init = warm_start.config_block(config.get("init"))  # every key, so each is overridable
    config = configs.apply_overrides(config, rest)
    return config, args.workdir, args


def main(argv: Sequence[str] | None = None) -> None:
    config, workdir, args = parse_args(sys.argv[1:] if argv is None else argv)
    cpu_devices.request(config.cpu_devices)   # before JAX's backends start
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    final = train(config, workdir, args.progress)
    if jax.process_index() == 0:
        print("Final metrics: " + json.dumps({k: round(float(v), 4) for k, v in final.items()}), flush=True)


if __name__ == "__main__":
    main()
