"""The benchmarked models and their jitted steps, built the way the trainer builds them.

A `Workload` names a model (ViT classification or CLIP) and its input shapes. `build` turns it
into a task (`mmjax.tasks`), initialised parameters, a random batch, a jitted inference
function and the trainer's own donated train step (`mmjax.train.make_train_step`, AdamW).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import faults, tasks, train
from mmjax.models import clip, vit

# open_clip's ViT-B-16 text tower; the image towers come from the ViT variants table.
CLIP_TEXT = {"B": {"vocab_size": 49_408, "context_length": 77, "width": 512, "depth": 12, "num_heads": 8},
             "L": {"vocab_size": 49_408, "context_length": 77, "width": 768, "depth": 12, "num_heads": 12}}
CLIP_EMBED = {"B": 512, "L": 768}
TINY = {"width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmarked configuration. `variant` is a ViT variant ("B/16") or "tiny" (tests)."""

    family: str                      # "vit" (classification) or "clip"
    variant: str = "B/16"
    batch: int = 8
    image_size: int = 224
    text_length: int = 77
    dtype: str = "float32"
    attention_impl: str = "xla"
    remat_policy: str = "none"
    scan: bool = False
    patch_drop_ratio: float = 0.0

    @property
    def name(self) -> str:
        name = f"{self.family} {self.variant} @{self.image_size} b{self.batch} {self.dtype}"
        if self.attention_impl != "xla":
            name += f" attn={self.attention_impl}"
        if self.remat_policy != "none":
            name += f" remat={self.remat_policy}"
        if self.patch_drop_ratio:
            name += f" patch_drop={self.patch_drop_ratio}"
        return name


def model_config(w: Workload) -> dict[str, Any]:
    """`config.model` for the workload's task."""
    knobs = {"dtype": w.dtype, "attention_impl": w.attention_impl, "remat_policy": w.remat_policy, "scan": w.scan}
    tower = dict(TINY, patch_size=8) if w.variant == "tiny" else {"variant": w.variant}
    if w.family == "vit":
        return dict(tower, num_classes=10 if w.variant == "tiny" else 1000, patch_drop_ratio=w.patch_drop_ratio,
                    **knobs)
    size = "B" if w.variant == "tiny" else w.variant.split("/")[0]
    text = dict(TINY, vocab_size=256, context_length=w.text_length) if w.variant == "tiny" else \
        dict(CLIP_TEXT[size], context_length=w.text_length)
    tower_knobs = {k: v for k, v in knobs.items() if k != "dtype"}
    return {"embed_dim": 32 if w.variant == "tiny" else CLIP_EMBED[size], "dtype": w.dtype,
            "image": dict(tower, patch_drop_ratio=w.patch_drop_ratio, **tower_knobs),
            "text": dict(text, **tower_knobs)}


def make_task(w: Workload) -> tasks.Task:
    config = ml_collections.ConfigDict()
    config.task = "classification" if w.family == "vit" else "contrastive"
    config.model = model_config(w)
    if w.family == "vit":
        config.loss = {"name": "softmax_xent"}
    else:
        config.loss = {"name": "clip"}
        config.input = {"tokenizer": {"name": "shapes", "context_length": w.text_length}}
    return tasks.get_task(config)


def random_batch(w: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {"image": rng.normal(size=(w.batch, w.image_size, w.image_size, 3)).astype(np.float32)}
    if w.family == "vit":
        batch["label"] = rng.integers(0, 10, size=(w.batch,)).astype(np.int32)
    else:
        vocab = 256 if w.variant == "tiny" else 49_408
        batch["text"] = rng.integers(1, vocab, size=(w.batch, w.text_length)).astype(np.int32)
    return batch


@dataclasses.dataclass
class Built:
    workload: Workload
    task: tasks.Task
    batch: dict[str, jax.Array]
    state: dict[str, Any]
    forward: Any          # jitted (params, batch) -> outputs
    train_step: Any       # jitted, donated (state, batch) -> (state, metrics)


def build(w: Workload, seed: int = 0) -> Built:
    task = make_task(w)
    host_batch = random_batch(w, seed)
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
    from flax import linen as nn
    params = jax.jit(lambda r: nn.meta.unbox(task.init_variables(r, batch))["params"])(jax.random.key(seed))
    tx = optax.adamw(1e-4, weight_decay=0.05)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params),
             "nonfinite": faults.init_counters()}   # the trainer's state layout
    step = train.make_train_step(task, tx, optax.constant_schedule(1e-4), jax.random.key(seed + 1))
    model = task.model
    if w.family == "vit":
        forward = jax.jit(lambda p, b: model.apply({"params": p}, b["image"])["logits"])
    else:
        forward = jax.jit(lambda p, b: model.apply({"params": p}, b["image"], b["text"]))
    return Built(w, task, batch, state, forward, jax.jit(step, donate_argnums=(0,)))


def analytic_flops(w: Workload, train_mode: bool) -> dict[str, float]:
    """Forward FLOPs per example by part (each family's `forward_flops`), in training or inference mode.

    Inference runs the towers only; training adds the example's row of contrastive logits.
    """
    task = make_task(w)
    if w.family == "vit":
        return vit.forward_flops(task.model, (w.image_size, w.image_size), train=train_mode)
    return clip.forward_flops(task.model, (w.image_size, w.image_size), w.text_length,
                              batch_size=w.batch if train_mode else None, train=train_mode)
