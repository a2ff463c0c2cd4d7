"""Environment facts for a results file, and the readable tables printed from the results."""

from __future__ import annotations

import datetime
import os
import platform

import jax

from mmjax import allocator


def environment(threads: int | None = None) -> dict:
    """What a reader needs to compare numbers: device, software versions, allocator, threads."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
           "device_count": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "threads": threads, "jax": jax.__version__, **allocator.describe()}
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return env


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def speed_table(results: dict) -> str:
    """mmjax vs PyTorch examples/s, per model and mode, with the ratio."""
    header = ["model", "mode", "mmjax ex/s", "mmjax step s", "compile s", "PyTorch ex/s", "ratio mmjax÷PyTorch",
              "XLA peak MiB", "page faults/step mmjax / PyTorch"]
    rows = []
    for r in results.get("speed", []):
        for mode in ("inference", "train"):
            m = r["mmjax"][mode]
            t = (r.get("torch") or {}).get(mode, {})
            ratio = m["examples_per_sec"] / t["examples_per_sec"] if t else None
            faults = f"{m['page_faults_per_step']:.3g} / {_fmt(t.get('page_faults_per_step'))}"
            rows.append([r["workload"], mode, m["examples_per_sec"], m["step_time_s"], m["compile_s"],
                         t.get("examples_per_sec"), ratio, m["memory"].get("peak_bytes", 0) / 2**20, faults])
    return markdown_table(header, rows)


def flops_table(results: dict) -> str:
    """Analytic vs XLA cost-analysis FLOPs, and the achieved TFLOP/s."""
    header = ["model", "mode", "analytic GFLOP/step", "XLA GFLOP/step", "XLA ÷ analytic", "TFLOP/s", "MFU"]
    rows = []
    for r in results.get("speed", []):
        for mode in ("inference", "train"):
            f = r["flops"][mode]
            rows.append([r["workload"], mode, f["analytic"] / 1e9, f["xla"] / 1e9, f["agreement"], f["tflops"],
                         f.get("mfu")])
    return markdown_table(header, rows)


def memory_table(results: dict) -> str:
    header = ["model", "preset", "mesh", "params+opt MiB/device", "compiled peak MiB/device"]
    rows = [[r["workload"], r["preset"], "×".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1),
             (r["param_bytes_per_device"] + r["optimizer_bytes_per_device"]) / 2**20,
             r["compiled"].get("peak_bytes", 0) / 2**20] for r in results.get("sharding_memory", [])]
    return markdown_table(header, rows)


def scaling_table(results: dict) -> str:
    header = ["model", "batch", "image", "tokens", "step s", "s per example", "train GFLOP/example",
              "attention share", "s per TFLOP"]
    rows = [[r["workload"], r["batch"], r["image_size"], r["tokens"], r["step_time_s"], r["step_time_s"] / r["batch"],
             r["gflops_per_example"], r["attention_share"], r["s_per_tflop"]] for r in results.get("scaling", [])]
    return markdown_table(header, rows)


def flip_table(results: dict) -> str:
    header = ["model", "patch_drop_ratio", "image tower GFLOP/example (analytic)", "XLA GFLOP/step",
              "train step s", "cost vs no drop (analytic / XLA / time)"]
    rows = []
    for r in results.get("flip", []):
        rows.append([r["workload"], r["patch_drop_ratio"], r["image_tower_gflops"], r["xla_gflops"],
                     r["step_time_s"], f"{r['analytic_ratio']:.2f} / {r['xla_ratio']:.2f} / {r['time_ratio']:.2f}"])
    return markdown_table(header, rows)


def blip_train_table(results: dict) -> str:
    """BLIP-B's train step on both sides, with the losses' agreement and the achieved FLOP/s."""
    header = ["model", "mmjax ex/s", "mmjax step s", "compile s", "transformers ex/s", "ratio mmjax÷transformers",
              "analytic GFLOP/step", "XLA ÷ analytic", "TFLOP/s mmjax / transformers", "max loss diff",
              "XLA peak MiB"]
    r = results["blip"]["train"]
    m, t, f = r["mmjax"], r["torch"], r["flops"]
    return markdown_table(header, [[r["workload"], m["examples_per_sec"], m["step_time_s"], m["compile_s"],
                                    t["examples_per_sec"], r["ratio"], f["analytic_per_step"] / 1e9, f["agreement"],
                                    f"{f['mmjax_tflops']:.3g} / {f['torch_tflops']:.3g}", r["max_loss_diff"],
                                    m["memory"].get("peak_bytes", 0) / 2**20]])


def blip_generation_table(results: dict) -> str:
    header = ["model", "beams", "new tokens", "mmjax tokens/s", "transformers tokens/s", "ratio mmjax÷transformers",
              "mmjax compile s", "same tokens"]
    rows = [[r["workload"], r["num_beams"], r["new_tokens"], r["mmjax"]["tokens_per_sec"],
             r["torch"]["tokens_per_sec"], r["ratio"], r["mmjax"]["compile_s"], r["same_tokens"]]
            for r in results["blip"]["generation"]]
    return markdown_table(header, rows)


def fusion_memory_table(results: dict) -> str:
    header = ["recipe", "task", "global batch", "preset", "mesh", "params M", "params+opt MiB/device",
              "task state MiB/device", "compiled peak MiB/device"]
    rows = [[r["recipe"], r["task"], r["global_batch"], r["preset"],
             "×".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1), r["params_millions"],
             (r["param_bytes_per_device"] + r["optimizer_bytes_per_device"]) / 2**20,
             r["task_state_bytes_per_device"] / 2**20, r["compiled"].get("peak_bytes", 0) / 2**20]
            for r in results.get("fusion_memory", [])]
    return markdown_table(header, rows)


def llm_generation_table(results: dict) -> str:
    header = ["model", "batch", "prompt", "new tokens", "mmjax tokens/s", "transformers tokens/s",
              "ratio mmjax÷transformers", "mmjax compile s", "mmjax steady s", "transformers s", "same tokens"]
    rows = [[r["workload"], r["batch"], r["prompt_length"], r["new_tokens"], r["mmjax"]["tokens_per_sec"],
             r["torch"]["tokens_per_sec"], r["ratio"], r["mmjax"]["compile_s"], r["mmjax"]["step_time_s"],
             r["torch"]["step_time_s"], r["same_tokens"]] for r in results["llm"]["generation"]]
    return markdown_table(header, rows)


def blip2_train_table(results: dict) -> str:
    """BLIP-2 stage 2's train step (frozen ViT and OPT) on both sides, with the losses' agreement."""
    header = ["model", "params M (trained)", "mmjax ex/s", "mmjax step s", "compile s", "transformers ex/s",
              "ratio mmjax÷transformers", "analytic GFLOP/step", "XLA ÷ analytic", "max loss diff", "XLA peak MiB"]
    r = results["blip2"]["train"]
    m, t, f = r["mmjax"], r["torch"], r["flops"]
    return markdown_table(header, [[r["workload"], f"{m['params_millions']:.3g} ({m['trained_millions']:.3g})",
                                    m["examples_per_sec"], m["step_time_s"], m["compile_s"], t["examples_per_sec"],
                                    r["ratio"], f["analytic_per_step"] / 1e9, f["agreement"], r["max_loss_diff"],
                                    m["memory"].get("peak_bytes", 0) / 2**20]])


def render(results: dict) -> str:
    env = results["environment"]
    parts = [(f"# mmjax benchmark ({env['device_kind']}, {env['cpu']}, {env['cpu_count']} cores, "
             f"{env['allocator']}, {env['date']})")]
    sections = [("speed", "Speed: mmjax vs PyTorch (same batch, threads, dtype)", speed_table),
                ("speed", "FLOPs: analytic vs XLA cost analysis (unrolled model)", flops_table),
                ("flip", "FLIP patch dropping (train step)", flip_table),
                ("scaling", "Scaling of step time with batch and image size", scaling_table),
                ("sharding_memory", "Memory per device on an 8-device CPU mesh", memory_table),
                ("blip", "BLIP-B train step (ITC + ITM + LM, AdamW): mmjax vs transformers, in turns",
                 blip_train_table),
                ("blip", "BLIP-B caption generation (images encoded too): mmjax vs transformers, in turns",
                 blip_generation_table),
                ("fusion_memory", "Fusion recipes' train step: memory per device on an 8-device CPU mesh",
                 fusion_memory_table),
                ("llm", "LLaMA-structure greedy generation with a KV cache: mmjax vs transformers, in turns",
                 llm_generation_table),
                ("blip2", "BLIP-2 stage-2 train step (frozen ViT and OPT, AdamW on the bridge): mmjax vs "
                 "transformers, in turns", blip2_train_table)]
    for key, title, fn in sections:
        if results.get(key):
            parts += [f"\n## {title}\n", fn(results)]
    return "\n".join(parts) + "\n"
