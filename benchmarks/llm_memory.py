"""Per-device memory of a BLIP-2 stage-2-like train step with a frozen 7B LLM, against the same
step training the LLM, under fsdp and fsdp_tp on 8 simulated CPU devices (compile only).

The step: Q query embeddings (B, Q, 768), the Q-Former's output, -> a trainable linear projection
to the LM width -> a soft prompt before T text tokens of a DecoderLM (Vicuna-7B by default:
parameters stored and computed in bfloat16, scanned layers) -> the LM loss on the text alone
(mmjax.models.blip2.text_lm_loss). The train step is the trainer's (mmjax.train.make_train_step)
with AdamW from mmjax.optim: "frozen" freezes `language_model/` through `optimizer.freeze`, so the
LLM gets no gradient and no optimizer state; "trained" is the same step training everything (AdamW
moments in the parameters' bfloat16); "trained_f32" trains an LLM stored in float32 (mixed
precision's master weights and moments, still computed in bfloat16). `--remat full` recomputes each
layer in the backward pass (the gradient reaches the projection through the frozen LLM, so its
activations are kept otherwise). Nothing is allocated: every state entry is abstract (shapes + shardings)
and the compiled step's buffer assignment (`memory_analysis`) gives the per-device peak, as
benchmarks/fusion_memory.py does for the fusion recipes. Needs 8 host devices, so run it alone:
  python -m benchmarks.llm_memory --out benchmarks/results/llm_memory.json   (writes the .md too)
"""

from __future__ import annotations

import os

if __name__ == "__main__":   # before jax is imported: 8 simulated devices on the host
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import itertools
import json
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import timing
from benchmarks.sharding_memory import MESHES, shard_bytes
from mmjax import faults, layers, optim, sharding, tasks, train
from mmjax.models import blip2
from mmjax.models.decoder_lm import DecoderLM

FREEZE_LLM = (r"^language_model/",)
OPTIMIZER = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05)   # BLIP-2's stage 2
SCHEDULE = dict(lr=1e-4, warmup_steps=2000, decay="cosine")
PRESETS = ("fsdp", "fsdp_tp")
MODES = ("frozen", "trained", "trained_f32")
# BLIP-2's stage 2 with Vicuna-7B (as MiniGPT-4): 32 queries of 768, LM in bfloat16, scanned layers.
VICUNA_7B = dict(variant="vicuna-7b", scan=True, param_dtype="bfloat16")
TINY_LM = dict(kind="llama", width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=96, vocab_size=256, max_len=64,
               scan=True, param_dtype="bfloat16")


class SoftPromptLM(nn.Module):
    """Query embeddings -> `language_projection` -> soft prompt of `language_model` (a DecoderLM),
    named as mmjax.models.blip2.Blip2LM names them. Returns the LM's outputs at the text positions."""

    lm: dict
    dtype: layers.Dtype = jnp.bfloat16

    def setup(self):
        width = DecoderLM(**self.lm).arch()["embed_dim"]
        self.language_projection = nn.Dense(width, dtype=self.dtype, kernel_init=layers.dense_init((None, "embed")))
        self.language_model = DecoderLM(**self.lm, dtype=self.dtype)

    def __call__(self, queries: jax.Array, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> dict:
        prompt = self.language_projection(queries.astype(self.dtype))
        return self.language_model.after_prefix(tokens, prefix_mask=jnp.ones(prompt.shape[:2], bool),
                                                prefix_embeds=prompt, mask=mask, train=train)


class SoftPromptTask(tasks.Task):
    """The LM loss of SoftPromptLM on a batch {"queries", "tokens", "mask"} (the first token, BOS,
    is not scored, as BLIP-2's)."""

    def __init__(self, lm: dict):
        super().__init__(config=None)
        self.model = SoftPromptLM(dict(lm))

    def init_variables(self, rng, batch):
        return self.model.init(rng, batch["queries"], batch["tokens"], batch["mask"])

    def loss(self, params, batch, rng):
        out = self.model.apply({"params": params}, batch["queries"], batch["tokens"], batch["mask"], train=True,
                               rngs={"dropout": rng})
        return blip2.text_lm_loss(out["logits"], batch["tokens"], batch["mask"])


def abstract_batch(batch: int, queries: int, query_width: int, text_length: int, batch_sharding) -> dict:
    shape = lambda s, dtype: jax.ShapeDtypeStruct(s, dtype, sharding=batch_sharding)
    return {"queries": shape((batch, queries, query_width), jnp.float32),
            "tokens": shape((batch, text_length), jnp.int32), "mask": shape((batch, text_length), jnp.bool_)}


def measure(lm: dict, preset: str, mode: str, remat: str = "none", batch: int = 64, queries: int = 32,
            query_width: int = 768, text_length: int = 32, compile: bool = True) -> dict[str, Any]:
    """Per-device parameter, optimizer-state and compiled-peak bytes of one train step (without
    `compile`: the state's bytes alone, "compiled" left empty)."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; known: {MODES}")
    lm = dict(lm, remat_policy=remat, **({"param_dtype": "float32"} if mode == "trained_f32" else {}))
    task = SoftPromptTask(lm)
    mesh = sharding.make_mesh(MESHES[preset])
    rules = sharding.get_rules(preset)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_abstract = abstract_batch(batch, queries, query_width, text_length, batch_sharding)
    rng = jax.random.key(0)
    boxed = jax.eval_shape(task.init_variables, rng, batch_abstract)
    param_shardings = sharding.logical_shardings(boxed, mesh, rules)["params"]
    params = nn.meta.unbox(boxed)["params"]
    optimizer = dict(OPTIMIZER, freeze=FREEZE_LLM if mode == "frozen" else ())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx, schedule = optim.build_optimizer(optimizer, SCHEDULE, 100_000, params)
        opt_shardings = train.optimizer_shardings(tx, params, param_shardings, replicated)
        opt_state = jax.eval_shape(tx.init, params)
        counters = jax.eval_shape(faults.init_counters)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state,
                 "nonfinite": counters}
        state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                           "nonfinite": jax.tree.map(lambda _: replicated, counters)}
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_shardings)
        step = train.make_train_step(task, tx, schedule, rng, optim.trainable_mask(optimizer, params))
        t = time.perf_counter()
        memory = timing.compiled_memory(jax.jit(
            step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
            donate_argnums=(0,)).lower(state, batch_abstract).compile()) if compile else {}
        compile_s = time.perf_counter() - t if compile else None
    llm = params["language_model"]
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    return {"lm": {k: str(v) for k, v in lm.items()}, "mode": mode, "remat": remat, "preset": preset,
            "mesh": dict(mesh.shape),
            "global_batch": batch, "examples_per_device": batch // sharding.data_parallel_size(mesh),
            "queries": queries, "query_width": query_width, "text_length": text_length,
            "llm_params_millions": count(llm) / 1e6, "llm_param_dtypes": sorted({str(x.dtype) for x in
                                                                                jax.tree.leaves(llm)}),
            "trainable_params": count(params) - (count(llm) if mode == "frozen" else 0),
            "param_bytes_per_device": shard_bytes(params, param_shardings),
            "optimizer_bytes_per_device": shard_bytes(opt_state, opt_shardings),
            "compiled": memory, "compile_s": compile_s}


def markdown(rows: list[dict], environment: dict | None = None) -> str:
    from benchmarks import report

    gib = 2**30
    header = ["LLM", "LLM params", "preset", "mesh", "ex/device", "LLM mode", "remat", "trainable M",
              "params GiB/device", "optimizer GiB/device", "compiled peak GiB/device", "temporaries GiB/device",
              "compile s"]
    body = [[r["lm"].get("variant") or "tiny llama", f"{r['llm_params_millions'] / 1e3:.2f}B {r['llm_param_dtypes']}",
             r["preset"], "×".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1), r["examples_per_device"],
             r["mode"], r["remat"], r["trainable_params"] / 1e6, r["param_bytes_per_device"] / gib,
             r["optimizer_bytes_per_device"] / gib, r["compiled"].get("peak_bytes", 0) / gib,
             r["compiled"].get("temp_bytes", 0) / gib, r["compile_s"]] for r in rows]
    title = "# BLIP-2 stage-2 step with a frozen vs trained LLM: memory per device (8 simulated CPU devices)"
    if environment:
        title += f"\n\n{environment['date']}, jax {environment['jax']}, compile only (XLA buffer assignment)"
    return f"{title}\n\n{report.markdown_table(header, body)}\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON (a .md table is written next to it)")
    parser.add_argument("--variant", default="vicuna-7b", help="DecoderLM variant of the LLM")
    parser.add_argument("--batch", type=int, default=64, help="global batch (8 per device under fsdp)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(MESHES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full", "dots"],
                        help="the LLM's remat_policy (one row each)")
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA at batch 8 (tests)")
    args = parser.parse_args(argv)
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}; run as `python -m benchmarks.llm_memory`")
    from benchmarks import report

    lm, shapes = (TINY_LM, dict(batch=8, queries=4, query_width=32, text_length=8)) if args.smoke else \
        (dict(VICUNA_7B, variant=args.variant), dict(batch=args.batch))
    rows, environment = [], report.environment()
    for preset, remat, mode in itertools.product(args.presets, args.remat, args.modes):
        rows.append(measure(lm, preset, mode, remat, **shapes))
        r = rows[-1]
        state = (r["param_bytes_per_device"] + r["optimizer_bytes_per_device"]) / 2**30
        peak = r["compiled"].get("peak_bytes", 0) / 2**30
        print(f"{preset} {mode} remat {remat}: params+opt {state:.2f} GiB/device, compiled peak {peak:.2f} GiB/device "
              f"(compile {r['compile_s']:.0f}s)", flush=True)
        with open(args.out, "w") as f:   # after every row
            json.dump({"environment": environment, "rows": rows}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(rows, environment))
    return rows


if __name__ == "__main__":
    main()
