"""The benchmark sections: speed vs PyTorch with FLOPs cross-check, FLIP, and scaling."""

from __future__ import annotations

import dataclasses
import gc
import os
from typing import Any

import jax

from benchmarks import timing, workloads
from benchmarks.workloads import Workload
from mmjax import flops
from mmjax.models import vit


def speed_workloads(args, families=None) -> list[Workload]:
    families = families or args.models
    if args.smoke:
        made = {"vit": Workload("vit", "tiny", batch=args.batch, image_size=32),
                "clip": Workload("clip", "tiny", batch=args.batch, image_size=32, text_length=16)}
    else:
        made = {"vit": Workload("vit", "B/16", batch=args.batch), "clip": Workload("clip", "B/16", batch=args.batch)}
    return [made[f] for f in families]


def measure_mmjax(w: Workload, warmup: int, steps: int, inference: bool = True) -> dict[str, Any]:
    """Compile and time the jitted inference function and the trainer's donated train step."""
    built = workloads.build(w)
    out = {}
    if inference:
        out["inference"] = timing.time_jax(built.forward, (built.state["params"], built.batch), warmup, steps, w.batch)
    out["train"] = timing.time_jax(built.train_step, (built.state, built.batch), warmup, steps, w.batch,
                                   carry_state=True)
    out["device_peak_bytes"] = timing.device_memory_peak()
    del built
    gc.collect()
    return out


def flops_summary(w: Workload, measured: dict[str, Any]) -> dict[str, Any]:
    """Analytic model FLOPs per step against XLA's count, and the achieved rate and MFU."""
    kind = jax.devices()[0].device_kind
    out = {}
    for mode in ("inference", "train"):
        if mode not in measured:
            continue
        forward = flops.total(workloads.analytic_flops(w, train_mode=mode == "train"))
        analytic = w.batch * forward * (flops.TRAIN_FACTOR if mode == "train" else 1.0)
        remat = 0.0
        if mode == "train" and w.remat_policy != "none":
            remat = w.batch * flops.remat_recompute_flops(workloads.analytic_flops(w, True), w.remat_policy)
        rate = analytic / measured[mode]["step_time_s"]
        xla = measured[mode]["xla_flops"]
        out[mode] = {"analytic": analytic, "remat_recompute": remat, "xla": xla,
                     # XLA counts a scanned layer body once, so only unrolled models compare.
                     "agreement": xla / (analytic + remat) if xla and not w.scan else None,
                     "tflops": rate / 1e12, "mfu": flops.mfu(rate, kind)}
    return out


def speed(w: Workload, args) -> dict[str, Any]:
    """One workload, mmjax and (unless --no-torch) its PyTorch reference, same batch and threads."""
    print(f"[speed] {w.name}: mmjax", flush=True)
    if getattr(args, "profile", None):   # a TensorBoard / Perfetto trace of compile and steps
        with jax.profiler.trace(os.path.join(args.profile, w.name.replace(" ", "_").replace("/", "-"))):
            measured = measure_mmjax(w, args.warmup, args.steps)
    else:
        measured = measure_mmjax(w, args.warmup, args.steps)
    result = {"workload": w.name, "config": dataclasses.asdict(w), "mmjax": measured,
              "flops": flops_summary(w, measured)}
    if not args.no_torch:
        from benchmarks import torch_refs
        print(f"[speed] {w.name}: PyTorch", flush=True)
        result["torch"] = torch_refs.benchmark(w, args.warmup, args.steps, threads=args.threads or None)
        gc.collect()
    for mode in ("inference", "train"):
        m, t = measured[mode], (result.get("torch") or {}).get(mode)
        ratio = f", ratio {m['examples_per_sec'] / t['examples_per_sec']:.2f}" if t else ""
        print(f"  {mode}: mmjax {m['examples_per_sec']:.3g} ex/s (compile {m['compile_s']:.1f}s)"
              + (f", PyTorch {t['examples_per_sec']:.3g} ex/s" if t else "") + ratio
              + f"; XLA/analytic FLOPs {result['flops'][mode]['agreement'] or float('nan'):.3f}", flush=True)
    return result


def flip(args) -> list[dict[str, Any]]:
    """CLIP train step with and without FLIP patch dropping (ratio 0.5): FLOPs, and time with
    the two steps run in turns (so both see the same background load)."""
    base = speed_workloads(args, ["clip"])[0]
    ws = [dataclasses.replace(base, patch_drop_ratio=ratio) for ratio in (0.0, 0.5)]
    print(f"[flip] {ws[0].name} vs patch_drop_ratio 0.5, in turns", flush=True)
    built = [workloads.build(w) for w in ws]
    measured = timing.time_jax_interleaved(
        {w.name: (b.train_step, b.state, b.batch) for w, b in zip(ws, built)}, args.warmup, args.steps, base.batch)
    del built
    gc.collect()
    rows = []
    for w in ws:
        parts = workloads.analytic_flops(w, train_mode=True)
        rows.append({"workload": w.name, "patch_drop_ratio": w.patch_drop_ratio,
                     "image_tower_gflops": sum(v for k, v in parts.items() if k.startswith("image_")) / 1e9,
                     "analytic_gflops_per_step": flops.TRAIN_FACTOR * w.batch * flops.total(parts) / 1e9,
                     "xla_gflops": measured[w.name]["xla_flops"] / 1e9,
                     "step_time_s": measured[w.name]["step_time_s"],
                     "compiled_peak_bytes": measured[w.name]["memory"].get("peak_bytes")})
    for row in rows:
        row["image_tower_ratio"] = row["image_tower_gflops"] / rows[0]["image_tower_gflops"]
        row["analytic_ratio"] = row["analytic_gflops_per_step"] / rows[0]["analytic_gflops_per_step"]
        row["xla_ratio"] = row["xla_gflops"] / rows[0]["xla_gflops"]
        row["time_ratio"] = row["step_time_s"] / rows[0]["step_time_s"]
    print(f"  patch drop 0.5: image tower FLOPs ×{rows[1]['image_tower_ratio']:.2f}, step FLOPs "
          f"×{rows[1]['analytic_ratio']:.2f} (XLA ×{rows[1]['xla_ratio']:.2f}), time ×{rows[1]['time_ratio']:.2f}",
          flush=True)
    return rows


def scaling_workloads(args) -> list[Workload]:
    """ViT-B/16 train steps: batch 1, 2, 4 at 224 px (197 tokens), then one image at 320 and
    448 px (401 and 785 tokens)."""
    if args.smoke:
        return [Workload("vit", "tiny", batch=b, image_size=s) for b, s in ((1, 32), (2, 32), (1, 64))]
    shapes = ((1, 224), (2, 224), (4, 224), (1, 320), (1, 448))
    return [Workload("vit", "B/16", batch=b, image_size=s, scan=True) for b, s in shapes]


def scaling(args) -> list[dict[str, Any]]:
    """Step time against work: linear in the batch; in the token count, linear plus a quadratic
    attention part that the analytic count separates ("attention share")."""
    rows = []
    for w in scaling_workloads(args):
        print(f"[scaling] {w.name}", flush=True)
        measured = measure_mmjax(w, args.warmup, args.steps, inference=False)["train"]
        parts = workloads.analytic_flops(w, train_mode=True)
        model = workloads.make_task(w).model
        rows.append({"workload": w.name, "batch": w.batch, "image_size": w.image_size,
                     "tokens": vit.tokens_seen(model, (w.image_size, w.image_size)),
                     "step_time_s": measured["step_time_s"], "compile_s": measured["compile_s"],
                     "gflops_per_example": flops.TRAIN_FACTOR * flops.total(parts) / 1e9,
                     "attention_share": parts["blocks_attention"] / flops.total(parts)})
        rows[-1]["s_per_tflop"] = rows[-1]["step_time_s"] / (w.batch * rows[-1]["gflops_per_example"] / 1e3)
        print(f"  {measured['step_time_s']:.3f}s per step", flush=True)
    return rows
