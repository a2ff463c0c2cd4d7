"""Metrics to the console, `metrics.jsonl` and TensorBoard; only process 0 writes files."""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np

from mmjax import paths


def _scalar(value: Any) -> float | int:
    value = np.asarray(value)
    return value.item() if value.size == 1 else float(value.mean())


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            paths.makedirs(workdir, exist_ok=True)
            # Line-buffered; in a bucket (gs://) the object is rewritten at every line.
            self._jsonl = paths.open_append(paths.join(workdir, "metrics.jsonl"))
            from tensorboardX import SummaryWriter
            # Written locally; in a bucket, a temporary folder uploaded after every flush.
            self._tb_dir = paths.LocalMirror(paths.join(workdir, "tensorboard"))
            self._tb = SummaryWriter(self._tb_dir.local)

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
            self._tb_dir.sync()
        return scalars

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self._tb_dir.close()


def format_line(step: int, total: int, scalars: dict[str, float], keys: tuple[str, ...]) -> str:
    parts = [f"step {step}/{total}"]
    for key in keys:
        if key in scalars:
            value = scalars[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
