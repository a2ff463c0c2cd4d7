"""Per-device memory of a train step under the dp, fsdp and fsdp_tp presets, on 8 CPU devices.

Nothing is allocated: parameters and optimizer state are abstract (shapes + shardings), their
per-device bytes come from each leaf's shard shape, and the compiled step's buffer assignment
(`memory_analysis`) gives the per-device peak. Run on its own, since it needs 8 host devices:
  python -m benchmarks.sharding_memory --out /tmp/memory.json
"""

from __future__ import annotations

import os

if __name__ == "__main__":   # before jax is imported: 8 simulated devices on the host
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import timing
from benchmarks.workloads import Workload, make_task, random_batch
from mmjax import faults, sharding, train

MESHES = {
    "dp": [("data", 8)],
    "fsdp": [("data", 1), ("fsdp", 8)],
    "fsdp_tp": [("data", 1), ("fsdp", 4), ("tensor", 2)],
}


def shard_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs laid out by `shardings`."""
    total = 0
    for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def measure(w: Workload, preset: str) -> dict:
    """Per-device parameter, optimizer-state and compiled-peak bytes of one train step."""
    mesh = sharding.make_mesh(MESHES[preset])
    rules = sharding.get_rules(preset)
    task = make_task(w)
    host = random_batch(w)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in host.items()}
    boxed = jax.eval_shape(task.init_variables, jax.random.key(0), batch)
    param_shardings = sharding.logical_shardings(boxed, mesh, rules)["params"]
    params = nn.meta.unbox(boxed)["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx = optax.adamw(1e-4, weight_decay=0.05)
        opt_shardings = train.optimizer_shardings(tx, params, param_shardings, replicated)
        opt_state = jax.eval_shape(tx.init, params)
        counters = jax.eval_shape(faults.init_counters)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state,
                 "nonfinite": counters}
        state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                           "nonfinite": jax.tree.map(lambda _: replicated, counters)}
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_shardings)
        step = train.make_train_step(task, tx, optax.constant_schedule(1e-4), jax.random.key(1))
        t = time.perf_counter()
        compiled = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, replicated),
                           donate_argnums=(0,)).lower(state, batch).compile()
        compile_s = time.perf_counter() - t
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return {"workload": w.name, "preset": preset, "mesh": dict(mesh.shape), "params_millions": n_params / 1e6,
            "param_bytes_per_device": shard_bytes(params, param_shardings),
            "optimizer_bytes_per_device": shard_bytes(opt_state, opt_shardings),
            "compiled": timing.compiled_memory(compiled), "compile_s": compile_s}


def workloads(smoke: bool, batch: int) -> list[Workload]:
    if smoke:
        return [Workload("vit", "tiny", batch=8, image_size=32)]
    common = {"batch": batch, "dtype": "bfloat16", "scan": True, "remat_policy": "dots_no_batch"}
    return [Workload("vit", "L/16", **common), Workload("clip", "L/14", **common)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--batch", type=int, default=64, help="global batch (8 per device by default)")
    parser.add_argument("--smoke", action="store_true", help="tiny models (tests)")
    args = parser.parse_args(argv)
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}; run as `python -m benchmarks.sharding_memory`")
    rows = []
    for w in workloads(args.smoke, args.batch):
        for preset in MESHES:
            rows.append(measure(w, preset))
            state_bytes = rows[-1]['param_bytes_per_device'] + rows[-1]['optimizer_bytes_per_device']
            print(f"{w.name} {preset}: params+opt {state_bytes / 2**20:.1f} MiB/device, "
                  f"compiled peak {rows[-1]['compiled'].get('peak_bytes', 0) / 2**20:.1f} MiB/device "
                  f"(compile {rows[-1]['compile_s']:.0f}s)", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
