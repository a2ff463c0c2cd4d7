"""The CPU benchmark: mmjax vs timm / open_clip, FLOPs cross-check, FLIP, scaling, sharded memory.

One command (about 10 minutes on 2 cores with the defaults), results as JSON and Markdown:
  python -m benchmarks.cpu --allocator jemalloc --out benchmarks/results/cpu.json
`--allocator` (`--jemalloc` for short) re-runs the process, JAX and PyTorch alike, with a host
allocator that does not page-fault fresh buffers in on every step (see mmjax/allocator.py).
`--smoke` runs tiny models in seconds (tests).
Opt-in sections: `blip` (BLIP-B train step and captions vs transformers, benchmarks/blip_speed.py)
and `blip_memory` (per-device memory of the ALBEF / BLIP pretraining recipes, benchmarks/fusion_memory.py):
  python -m benchmarks.cpu --allocator hugepages --sections blip,blip_memory --out benchmarks/results/blip_cpu.json
and `llm` (LLaMA-structure greedy generation with a KV cache vs transformers, benchmarks/llm_generation.py;
the frozen-LLM memory is benchmarks/llm_memory.py, run on its own):
  python -m benchmarks.cpu --allocator hugepages --sections llm --out benchmarks/results/llm_cpu.json
and `blip2` (a BLIP-2 stage-2 train step with frozen ViT and OPT vs transformers, benchmarks/blip2_speed.py):
  python -m benchmarks.cpu --allocator hugepages --sections blip2 --out benchmarks/results/blip2_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from mmjax import allocator

SECTIONS = ("speed", "flip", "scaling", "memory", "blip", "blip_memory", "llm", "blip2")
DEFAULT_SECTIONS = SECTIONS[:4]   # blip, blip_memory, llm, blip2: vs transformers, fusion recipes' memory (opt-in)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu.json",
                   help="results JSON (a .md table is written next to it)")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {SECTIONS} (default: {DEFAULT_SECTIONS})")
    p.add_argument("--models", default="vit,clip", help="speed-section models: vit (ViT-B/16), clip (CLIP B/16)")
    p.add_argument("--batch", type=int, default=8, help="batch for the speed and FLIP sections")
    p.add_argument("--blip-batch", type=int, default=4, help="batch of the blip section (train step, captions)")
    p.add_argument("--memory-recipes", nargs="+", default=None,
                   help="recipe specs of the blip_memory section (default: benchmarks/fusion_memory.py's RECIPES)")
    p.add_argument("--memory-batch", type=int, default=64, help="global batch of the blip_memory section")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps after compilation (PyTorch still page-faults in its 2nd step)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="PyTorch intra-op threads (default: all cores, as XLA)")
    p.add_argument("--no-torch", action="store_true", help="skip the timm / open_clip references")
    p.add_argument("--allocator", choices=allocator.ALLOCATORS, default="default",
                   help="re-run under this host allocator (both frameworks); see mmjax/allocator.py")
    p.add_argument("--jemalloc", action="store_true", help="same as --allocator jemalloc")
    p.add_argument("--jemalloc-path", default=allocator.JEMALLOC)
    p.add_argument("--jemalloc-conf", default=allocator.JEMALLOC_CONF, help="MALLOC_CONF; '' for stock jemalloc")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of each mmjax speed run here")
    p.add_argument("--smoke", action="store_true", help="tiny models, 1 warm-up and 2 timed steps (tests)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {SECTIONS}")
    args.models = [m for m in args.models.split(",") if m]
    if set(args.models) - {"vit", "clip"}:
        p.error(f"unknown models {args.models}; known: vit, clip")
    if args.jemalloc:
        args.allocator = "jemalloc"
    if args.smoke:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    allocator.reexec(args.allocator, "benchmarks.cpu", argv, jemalloc_path=args.jemalloc_path,
                     jemalloc_conf=args.jemalloc_conf)

    from benchmarks import report, suites  # jax is imported only after the re-exec
    threads = args.threads or os.cpu_count()
    results = {"environment": report.environment(threads), "settings": {
        k: v for k, v in vars(args).items() if k not in ("out", "jemalloc", "jemalloc_path", "jemalloc_conf")}}
    print(f"environment: {json.dumps(results['environment'])}", flush=True)
    t0 = time.perf_counter()
    if "speed" in args.sections:
        results["speed"] = [suites.speed(w, args) for w in suites.speed_workloads(args)]
    if "flip" in args.sections:
        results["flip"] = suites.flip(args)
    gc.collect()
    if "scaling" in args.sections:
        results["scaling"] = suites.scaling(args)
    if "memory" in args.sections:
        results["sharding_memory"] = sharding_memory(args.smoke)
    if "blip" in args.sections:
        from benchmarks import blip_speed
        results["blip"] = blip_speed.run(argparse.Namespace(**{**vars(args), "batch": args.blip_batch}))
        gc.collect()
    if "blip_memory" in args.sections:
        extra = ["--batch", str(args.memory_batch)]
        if args.memory_recipes:
            extra += ["--recipes", *args.memory_recipes]
        results["fusion_memory"] = sharding_memory(args.smoke, "benchmarks.fusion_memory", extra)
    if "llm" in args.sections:
        from benchmarks import llm_generation
        results["llm"] = llm_generation.run(args)
    if "blip2" in args.sections:
        from benchmarks import blip2_speed
        results["blip2"] = blip2_speed.run(args)
    results["total_time_s"] = time.perf_counter() - t0

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = report.render(results)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print("\n" + table, flush=True)
    print(f"wrote {args.out} and its .md table in {results['total_time_s']:.0f}s", flush=True)
    return results


def sharding_memory(smoke: bool, module: str = "benchmarks.sharding_memory", extra: list[str] = ()) -> list[dict]:
    """Runs `module` (benchmarks.sharding_memory or .fusion_memory) in a child process with 8 host devices."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "memory.json")
        cmd = [sys.executable, "-m", module, "--out", out, *extra] + (["--smoke"] if smoke else [])
        subprocess.run(cmd, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        with open(out) as f:
            return json.load(f)


if __name__ == "__main__":
    main()
