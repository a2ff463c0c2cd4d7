"""Per-device memory of a recipe's train step under the dp, fsdp and fsdp_tp presets, on 8 CPU devices.

Driven by a recipe (`experiments/<family>/<recipe>.py[:args]`) with its global batch overridden:
the task, model, optimizer and the task-owned train state (momentum towers, feature queues) are
the recipe's. Nothing is allocated: the batch's shapes come from the recipe's pp string run on one
made-up example of its data source, every state entry is abstract (shapes + shardings), and the
compiled step's buffer assignment (`memory_analysis`) gives the per-device peak, as
benchmarks/sharding_memory.py does for ViT and CLIP. Run on its own, since it needs 8 host devices:
  python -m benchmarks.fusion_memory --out /tmp/memory.json [--recipes SPEC ...] [--batch 64]
"""

from __future__ import annotations

import os

if __name__ == "__main__":   # before jax is imported: 8 simulated devices on the host
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import math
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import timing
from benchmarks.sharding_memory import MESHES, shard_bytes
from mmjax import configs, faults, optim, sharding, tasks, train

# The pretraining recipes with the data paths their docstrings name (only named: the batch shapes
# come from a made-up example) and, for `{vocab}`, a stand-in for bert-base-uncased's vocab.txt
# of its size (BLIP sizes its vocabulary from the file).
_NAMED = "image_dir=/data/pairs,captions=/data/pairs/captions.jsonl,vocab={vocab}"
RECIPES = (f"experiments/blip/pretrain_14m.py:{_NAMED}", f"experiments/albef/pretrain_4m.py:data=4m,{_NAMED}")
BERT_VOCAB_SIZE = 30_522
SMOKE_RECIPE = "experiments/clip/shapes_momentum.py"


def made_up_example(data: Any) -> dict[str, Any]:
    """One example as `data`'s source yields it (image, caption, label), nothing read from disk."""
    if data["name"].split("/")[0] == "mmjax_shapes":
        from mmjax.data import shapes

        return shapes.generate_example(0, seed=0, image_size=32)
    return {"image": np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8),
            "caption": "a photo of a small dog running on the grass.", "label": np.int64(7)}


def made_up_features(config, tokenizer) -> dict[str, np.ndarray]:
    """The numeric fields of one made-up example after the recipe's pp, as the trainer batches them."""
    from mmjax.data.pipeline import _canonical  # the trainer's dtype canonicalisation
    from mmjax.data.preprocess import Preprocess

    example = Preprocess(config.input.pp, tokenizer)(made_up_example(config.input.data), np.random.default_rng(0))
    values = {k: np.asarray(v) for k, v in _canonical(example).items()}
    return {k: v for k, v in values.items() if v.dtype.kind in "biuf"}


def batch_shapes(config, tokenizer) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The numeric fields one preprocessed example has (shape, dtype)."""
    return {k: (v.shape, v.dtype) for k, v in made_up_features(config, tokenizer).items()}


def recipe_config(spec: str, preset: str, batch: int):
    """The recipe's config with the global batch, mesh and sharding preset of this measurement."""
    config = configs.load_config(spec)
    with config.unlocked():
        config.input.batch_size = batch
        config.mesh = MESHES[preset]
        config.sharding = preset
    return config


def measure(spec: str, preset: str, batch: int = 64) -> dict[str, Any]:
    """Per-device parameter, optimizer, task-state and compiled-peak bytes of one train step."""
    config = recipe_config(spec, preset, batch)
    task = tasks.get_task(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.get_rules(preset)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = batch_shapes(config, task.tokenizer)
    batch_abstract = {k: jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=batch_sharding)
                      for k, (shape, dtype) in shapes.items()}
    rng = jax.random.key(0)
    steps = train.total_steps(config) if config.get("total_steps") else 1_000
    # Boxes are unboxed outside the mesh context: inside it, unboxing constrains (abstract) values.
    boxed = jax.eval_shape(task.init_variables, rng, batch_abstract)
    param_shardings = sharding.logical_shardings(boxed, mesh, rules)["params"]
    params = nn.meta.unbox(boxed)["params"]
    extra_boxed = jax.eval_shape(task.init_extra_state, boxed["params"], rng) or {}
    extra_shardings = sharding.logical_shardings(extra_boxed, mesh, rules)
    extra = nn.meta.unbox(extra_boxed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, steps, params)
        opt_shardings = train.optimizer_shardings(tx, params, param_shardings, replicated)
        opt_state = jax.eval_shape(tx.init, params)
        counters = jax.eval_shape(faults.init_counters)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state,
                 "nonfinite": counters, **extra}
        state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                           "nonfinite": jax.tree.map(lambda _: replicated, counters), **extra_shardings}
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_shardings)
        step = train.make_train_step(task, tx, schedule, rng, optim.trainable_mask(config.optimizer, params))
        t = time.perf_counter()
        compiled = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                           out_shardings=(state_shardings, replicated),
                           donate_argnums=(0,)).lower(state, batch_abstract).compile()
        compile_s = time.perf_counter() - t
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    return {"recipe": spec, "task": config.task, "preset": preset, "mesh": dict(mesh.shape), "global_batch": batch,
            "batch_shapes": {k: list(shape) for k, (shape, _) in shapes.items()},
            "dtype": model.get("dtype", "float32"), "params_millions": n_params / 1e6,
            "param_bytes_per_device": shard_bytes(params, param_shardings),
            "optimizer_bytes_per_device": shard_bytes(opt_state, opt_shardings),
            "task_state_bytes_per_device": shard_bytes(extra, extra_shardings) if extra else 0,
            "task_state_entries": sorted(extra),
            "compiled": timing.compiled_memory(compiled), "compile_s": compile_s}


def stand_in_vocab(directory: str, size: int = BERT_VOCAB_SIZE) -> str:
    """A WordPiece vocab.txt of `size` entries: the embedded shapes vocabulary, then [unusedN]."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "mmjax", "data", "tokenizers", "shapes_vocab.txt")) as f:
        words = f.read().split("\n")
    words = [w for w in words if w]
    words += [f"[unused{i}]" for i in range(size - len(words))]
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(words) + "\n")
    return path


def state_mib(row: dict) -> float:
    return (row["param_bytes_per_device"] + row["optimizer_bytes_per_device"] + row["task_state_bytes_per_device"]) \
        / 2**20


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe specs (path.py[:args])")
    parser.add_argument("--batch", type=int, default=64, help="global batch (8 per device by default)")
    parser.add_argument("--presets", nargs="+", default=list(MESHES), choices=list(MESHES), help="sharding presets")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_RECIPE} at batch 8 (tests)")
    args = parser.parse_args(argv)
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}; run as `python -m benchmarks.fusion_memory`")
    tmp = tempfile.mkdtemp(prefix="fusion_memory_")
    recipes, batch = ([SMOKE_RECIPE], 8) if args.smoke else (args.recipes, args.batch)
    recipes = [r.replace("{vocab}", stand_in_vocab(tmp)) if "{vocab}" in r else r for r in recipes]
    missing = [r for r in recipes if not os.path.isfile(r.split(":")[0])]
    if missing:
        raise SystemExit(f"recipe files not found: {missing}")
    rows = []
    for spec in recipes:
        for preset in args.presets:
            rows.append(measure(spec, preset, batch))
            r = rows[-1]
            print(f"{spec} ({r['task']}, b{batch}) {preset}: params+opt+task state {state_mib(r):.1f} MiB/device, "
                  f"compiled peak {r['compiled'].get('peak_bytes', 0) / 2**20:.1f} MiB/device "
                  f"(compile {r['compile_s']:.0f}s)", flush=True)
            with open(args.out, "w") as f:   # after every row: big models compile for many minutes
                json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
