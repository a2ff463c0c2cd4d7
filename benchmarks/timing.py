"""Timing, compiled-memory and compiled-FLOP measurements of jitted functions and torch steps."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def minor_page_faults() -> int:
    """Minor page faults of this process so far: touching freshly mapped memory costs one per page."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(times: list[float], batch: int) -> dict[str, float]:
    """Median / min step time over the timed steps, and examples per second at the median."""
    median = statistics.median(times)
    return {"step_time_s": median, "step_time_min_s": min(times), "examples_per_sec": batch / median,
            "timed_steps": len(times)}


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's buffer assignment for one device: arguments, outputs, temporaries and their peak."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def compiled_flops(compiled) -> float:
    """FLOPs of one execution by XLA's cost analysis (a scanned body counts once, not per layer)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def device_memory_peak() -> int | None:
    """Peak bytes in use on device 0 so far in this process (GPU/TPU; None on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def time_jax(fn, args: tuple, warmup: int, steps: int, batch: int, carry_state: bool = False) -> dict[str, Any]:
    """Compiles `fn` (a jax.jit function) for `args`, then times `steps` calls after `warmup`.

    With `carry_state`, `fn(state, *rest)` returns (new state, aux) and the state is fed back,
    as in a training loop with a donated state.
    """
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t
    out = {"compile_s": compile_s, "memory": compiled_memory(compiled), "xla_flops": compiled_flops(compiled)}
    state, rest = args[0], args[1:]
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            faults = minor_page_faults()
        t = time.perf_counter()
        result = compiled(state, *rest)
        jax.block_until_ready(result)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if carry_state:
            state = result[0]
    out.update(summarize(times, batch))
    out["page_faults_per_step"] = (minor_page_faults() - faults) / steps
    return out


def time_callable(step: Callable[[], Any], warmup: int, steps: int, batch: int,
                  sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Times a zero-argument step (PyTorch): the first call is reported as `first_call_s`."""
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            faults = minor_page_faults()
        t = time.perf_counter()
        step()
        sync()
        elapsed = time.perf_counter() - t
        if i == 0:
            first = elapsed
        if i >= warmup:
            times.append(elapsed)
    return {"first_call_s": first, **summarize(times, batch),
            "page_faults_per_step": (minor_page_faults() - faults) / steps}


def time_jax_interleaved(runs: dict[str, tuple], warmup: int, steps: int, batch: int) -> dict[str, dict[str, Any]]:
    """Like `time_jax` (train steps: state carried) for several functions, timed in turns.

    `runs` maps a name to (jitted fn, state, *rest). Alternating the steps exposes every
    function to the same background load, so their ratio is fair on a busy machine.
    """
    compiled, states, out = {}, {}, {}
    for name, (fn, state, *rest) in runs.items():
        t = time.perf_counter()
        compiled[name] = fn.lower(state, *rest).compile()
        out[name] = {"compile_s": time.perf_counter() - t, "memory": compiled_memory(compiled[name]),
                     "xla_flops": compiled_flops(compiled[name])}
        states[name] = state
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (_, _, *rest) in runs.items():
            t = time.perf_counter()
            states[name] = jax.block_until_ready(compiled[name](states[name], *rest))[0]
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    for name in runs:
        out[name].update(summarize(times[name], batch))
    return out


def in_turns(sides: dict[str, Callable[[], Any]], warmup: int, steps: int) -> tuple[dict, dict, dict]:
    """Runs each side's function in turns, `1 + warmup + steps` rounds, so that a busy machine's
    slow spells hit both sides alike: (the first call's seconds (mmjax compiles there, torch warms
    up), the timed calls' seconds after `warmup` more rounds, the last outputs), each by side."""
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {side: [] for side in sides}
    outputs: dict[str, Any] = {}
    for i in range(1 + warmup + steps):
        for side, fn in sides.items():
            start = time.perf_counter()
            outputs[side] = fn()
            elapsed = time.perf_counter() - start
            if i == 0:
                first[side] = elapsed
            elif i > warmup:
                times[side].append(elapsed)
    return first, times, outputs
