"""The GPU benchmark: mmjax ViT-B/16 and CLIP B/16 train steps in bf16, attention "xla" vs
"cudnn", remat on and off, with MFU; timm / open_clip (bf16 autocast) for the ratio; and recipe rows:
a paper recipe's own train step (BLIP-2 stage 2 with a frozen OPT-2.7B in bf16) at one GPU's batch.

Run by benchmarks/gpu.sh, which starts PyTorch and JAX in separate processes so that neither
holds GPU memory the other needs. `--smoke` runs tiny models on any backend (tests, CPU).
  python -m benchmarks.gpu --framework torch --out /tmp/gpu_torch.json
  python -m benchmarks.gpu --framework mmjax --torch-results /tmp/gpu_torch.json --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

REMAT = {"off": "none", "on": "dots_no_batch"}
# Recipe rows (benchmarks/recipe_step.py): name -> (recipe spec, --config overrides, batch). BLIP-2 stage
# 2 at the paper's per-GPU batch (1,920 over 16 GPUs): frozen EVA ViT-g and OPT-2.7B, both computing in
# bf16 and the OPT stored in bf16; the Q-Former, queries and projection train. The data paths are only
# named: the batch is a made-up example through the recipe's pp.
_PAIRS = "vocab=shapes,image_dir=/data/pairs,captions=/data/pairs/captions.jsonl"
_BF16_FROZEN_LM = ["--config.model.dtype=bfloat16", "--config.model.lm.param_dtype=bfloat16"]
RECIPES = {"blip2-stage2-opt2.7b": (f"experiments/blip2/stage2_opt.py:lm=opt-2.7b,{_PAIRS}", _BF16_FROZEN_LM, 120)}
# The same rows on the recipes' smoke models; batch 8: one example per device of the tests' simulated mesh.
SMOKE_RECIPES = {"blip2-stage2-opt2.7b": ("experiments/blip2/stage2_opt.py:smoke=True", _BF16_FROZEN_LM, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("mmjax", "torch"), default="mmjax")
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    p.add_argument("--torch-results", default=None, help="JSON from --framework torch, for the ratio column")
    p.add_argument("--models", default="vit,clip")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"recipe rows, of {sorted(RECIPES)} ('' for none)")
    p.add_argument("--attention", default="xla,cudnn", help="attention_impl values (cudnn needs a GPU)")
    p.add_argument("--remat", default="off,on", help=f"off/on; on = remat_policy {REMAT['on']!r}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-scan", action="store_true", help="unrolled layers (slower compiles)")
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 steps: checks the script anywhere")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.warmup, args.steps = min(args.batch, 4), 1, 2
    return args


def workload_list(args) -> list:
    from benchmarks.workloads import Workload
    out = []
    for family in args.models.split(","):
        base = Workload(family, "tiny", image_size=32, text_length=16) if args.smoke else Workload(family, "B/16")
        base = dataclasses.replace(base, batch=args.batch, dtype="bfloat16", scan=not args.no_scan)
        out.append(base)
    return out


def run_torch(args) -> list[dict]:
    import torch

    from benchmarks import torch_refs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for w in workload_list(args):
        print(f"[torch] {w.name} on {device}", flush=True)
        r = torch_refs.benchmark(w, args.warmup, args.steps, device=device)
        rows.append({"workload": w.name, "family": w.family, "device": device, **r})
        print(f"  train {r['train']['examples_per_sec']:.1f} ex/s", flush=True)
    return rows


def run_mmjax(args, torch_rows: list[dict]) -> list[dict]:
    import jax

    from benchmarks import suites
    impls = args.attention.split(",")
    if jax.default_backend() != "gpu" and "cudnn" in impls:
        print("no GPU: skipping attention_impl='cudnn'", flush=True)
        impls = [i for i in impls if i != "cudnn"]
    torch_train = {r["family"]: r["train"]["examples_per_sec"] for r in torch_rows}
    rows = []
    for base in workload_list(args):
        for impl in impls:
            for remat in args.remat.split(","):
                w = dataclasses.replace(base, attention_impl=impl, remat_policy=REMAT[remat])
                print(f"[mmjax] {w.name}", flush=True)
                try:
                    measured = suites.measure_mmjax(w, args.warmup, args.steps, inference=False)
                except Exception as e:  # noqa: BLE001 - one failing configuration (e.g. OOM) must not lose the rest
                    print(f"  failed: {type(e).__name__}: {e}", flush=True)
                    rows.append({"workload": w.name, "error": f"{type(e).__name__}: {e}"})
                    continue
                f = suites.flops_summary(w, measured)["train"]
                row = {"workload": w.name, "family": w.family, "attention_impl": impl, "remat": REMAT[remat],
                       "train": measured["train"], "flops": f, "device_peak_bytes": measured["device_peak_bytes"]}
                if w.family in torch_train:
                    row["ratio_vs_torch"] = measured["train"]["examples_per_sec"] / torch_train[w.family]
                rows.append(row)
                mfu = f"{f['mfu']:.1%}" if f.get("mfu") is not None else "n/a"
                print(f"  {measured['train']['examples_per_sec']:.1f} ex/s, {f['tflops']:.1f} TFLOP/s, MFU {mfu}, "
                      f"compile {measured['train']['compile_s']:.0f}s", flush=True)
    return rows


def run_recipes(args) -> list[dict]:
    from benchmarks import recipe_step
    table = SMOKE_RECIPES if args.smoke else RECIPES
    rows = []
    for name in filter(None, args.recipes.split(",")):
        if name not in table:
            raise SystemExit(f"unknown recipe row {name!r}; known: {sorted(table)}")
        spec, overrides, batch = table[name]
        print(f"[mmjax recipe] {name}: {spec} {' '.join(overrides)}, batch {batch}", flush=True)
        try:
            row = recipe_step.measure(spec, overrides, batch, args.warmup, args.steps)
        except Exception as e:  # noqa: BLE001 - as above: an OOM here must not lose the other rows
            print(f"  failed: {type(e).__name__}: {e}", flush=True)
            rows.append({"workload": name, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"workload": name, **row})
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
        print(f"  {row['train']['examples_per_sec']:.1f} ex/s, {row.get('tflops_per_device', 0):.1f} TFLOP/s, "
              f"MFU {mfu}, compile {row['train']['compile_s']:.0f}s", flush=True)
    return rows


def table(results: dict) -> str:
    from benchmarks.report import markdown_table
    header = ["model", "attention", "remat", "ex/s", "step s", "TFLOP/s", "MFU", "XLA÷analytic",
              "vs PyTorch (bf16 autocast on CUDA)"]
    rows = []
    for r in results.get("mmjax", []):
        if "error" in r:
            rows.append([r["workload"], "–", "–", r["error"][:60], None, None, None, None, None])
            continue
        rows.append([r["workload"], r["attention_impl"], r["remat"], r["train"]["examples_per_sec"],
                     r["train"]["step_time_s"], r["flops"]["tflops"], r["flops"].get("mfu"),
                     r["flops"]["agreement"], r.get("ratio_vs_torch")])
    for r in results.get("recipes", []):
        if "error" in r:
            rows.append([r["workload"], "–", "–", r["error"][:60], None, None, None, None, None])
            continue
        rows.append([f"{r['workload']} ({r['trained_params_millions']:.4g}M of {r['params_millions']:.4g}M trained, "
                     f"b{r['global_batch']})", "recipe's", "recipe's", r["train"]["examples_per_sec"],
                     r["train"]["step_time_s"], r.get("tflops_per_device"), r.get("mfu"), None, None])
    for r in results.get("torch", []):
        rows.append([r["workload"] + f" ({r['model']}, PyTorch)", "PyTorch default", "none",
                     r["train"]["examples_per_sec"], r["train"]["step_time_s"], None, None, None, 1.0])
    env = results["environment"]
    return f"# mmjax GPU benchmark ({env.get('device_kind')}, {env['date']})\n\n" + markdown_table(header, rows) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from benchmarks import report
    results = {"environment": report.environment(), "settings": vars(args)}
    if args.framework == "torch":
        results["torch"] = run_torch(args)
    else:
        torch_rows = []
        if args.torch_results and os.path.exists(args.torch_results):
            with open(args.torch_results) as f:
                torch_rows = json.load(f).get("torch", [])
        results["torch"] = torch_rows
        results["mmjax"] = run_mmjax(args, torch_rows)
        results["recipes"] = run_recipes(args)
    results["total_time_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    if args.framework == "mmjax":
        text = table(results)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text)
        print("\n" + text, flush=True)
    print(f"wrote {args.out} in {results['total_time_s']:.0f}s", flush=True)
    return results


if __name__ == "__main__":
    main()
