"""A BLIP-2 stage-2 train step against transformers on this CPU: frozen vision tower and OPT, the
Q-Former, its queries and the projection trained with AdamW on the LM loss of the caption.

Both sides hold the same weights: transformers' Blip2ForConditionalGeneration with random weights,
converted by mmjax/convert/blip2.py. transformers' side freezes with requires_grad=False (its
backward still runs through the frozen OPT to the soft prompt, as it must); mmjax's splits the
parameters with the trainer's `optimizer.freeze` machinery (mmjax.optim: no gradient and no optimizer
state for frozen leaves). Loss: next-token cross-entropy on the caption after the BOS (LAVIS's
targets; transformers' labels with -100 on the queries, the BOS and the padding). The losses of
every step are compared; the two sides run in turns within one process.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import timing
from mmjax import flops, optim, pretrained
from mmjax.convert import blip2 as blip2_convert
from mmjax.convert import engine
from mmjax.models import blip2

FREEZE = (r"^vision_model/", r"^language_model/")
PAD, BOS, IMAGE = 1, 2, 50265          # OPT's pad and BOS; the image placeholder is an id past OPT's words
LR = 1e-4


@dataclasses.dataclass(frozen=True)
class Setup:
    """"small": a 4-layer 256-wide ViT/14 at 224, a 4-layer 256-wide Q-Former with 32 queries and a
    4-layer 512-wide OPT with OPT's 50,272-word vocabulary; "tiny": tests."""

    size: str = "small"
    batch: int = 4
    text_length: int = 32

    @property
    def image_size(self) -> int:
        return 224 if self.size == "small" else 28

    @property
    def name(self) -> str:
        return f"blip2-opt {self.size} @{self.image_size} text{self.text_length} b{self.batch} float32"

    def hf_config(self):
        from transformers import Blip2Config

        if self.size == "small":
            vision = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                          image_size=224, patch_size=14, initializer_range=0.02)
            qformer = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
            opt = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, ffn_dim=2048, vocab_size=50272,
                       word_embed_proj_dim=512)
            queries = 32
        else:
            vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14, initializer_range=0.02)
            qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
            opt = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, vocab_size=50272,
                       word_embed_proj_dim=32)
            queries = 4
        opt.update(model_type="opt", pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS, dropout=0.0,
                   attention_dropout=0.0, activation_dropout=0.0)
        qformer.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)     # mmjax trains without
        vision.update(attention_dropout=0.0)
        return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt, num_query_tokens=queries,
                           image_token_index=IMAGE)


def torch_model(s: Setup, seed: int = 0):
    import torch
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(s.hf_config())
    with torch.no_grad():           # transformers starts the queries at zero: give them content
        model.query_tokens.normal_(0, 0.02)
    return model


def to_mmjax(ref) -> tuple[blip2.Blip2LM, dict]:
    config = {**ref.config.to_dict(), "architectures": ["Blip2ForConditionalGeneration"]}
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    plan = blip2_convert.from_hf(config, state)
    model = pretrained.build(plan.model_class, plan.fields)
    return model, engine.unflatten(engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs)))


def random_inputs(s: Setup, seed: int = 0) -> dict[str, np.ndarray]:
    """Images (B, H, W, 3) and right-padded captions (B, L), BOS first."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(s.batch, s.image_size, s.image_size, 3)).astype(np.float32)
    lengths = rng.integers(s.text_length // 2, s.text_length + 1, s.batch)
    mask = np.arange(s.text_length)[None] < lengths[:, None]
    words = rng.integers(3, 50000, (s.batch, s.text_length))
    words[:, 0] = BOS
    return {"images": images, "text": np.where(mask, words, PAD).astype(np.int32), "mask": mask}


def mmjax_train_step(model: blip2.Blip2LM, tx: optax.GradientTransformation, trainable):
    """(live params, frozen params, opt_state, batch) -> (live params, opt_state, loss), jitted."""

    def step(live, frozen, opt_state, batch):
        def loss_fn(p):
            params = optim.merge_frozen(p, frozen, trainable)
            logits = model.apply({"params": params}, batch["images"], batch["text"], batch["mask"])["logits"]
            return blip2.text_lm_loss(logits, batch["text"], batch["mask"])[0]
        loss, grads = jax.value_and_grad(loss_fn)(live)
        updates, opt_state = tx.update(grads, opt_state, live)
        return optax.apply_updates(live, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2))


def torch_inputs(host: dict, queries: int) -> dict:
    """transformers' input: the image placeholders first, then the caption; labels -100 on the
    placeholders, the BOS and the padding."""
    import torch

    b = host["text"].shape[0]
    ids = np.concatenate([np.full((b, queries), IMAGE), host["text"]], 1)
    attention = np.concatenate([np.ones((b, queries), bool), host["mask"]], 1)
    labels = np.where(attention, ids, -100)
    labels[:, :queries + 1] = -100
    return {"pixel_values": torch.from_numpy(host["images"].transpose(0, 3, 1, 2).copy()),
            "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention.astype(np.int64)),
            "labels": torch.from_numpy(labels)}


def train_step(s: Setup, warmup: int, steps: int, threads: int | None = None) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    ref = torch_model(s)
    model, params = to_mmjax(ref)
    params = jax.tree.map(jnp.asarray, params)
    trainable = optim.trainable_mask({"freeze": list(FREEZE)}, params)
    live, frozen = optim.split_frozen(params, trainable)
    host = random_inputs(s)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    tx = optax.adamw(LR, weight_decay=0.05)
    opt_state = jax.jit(tx.init)(live)
    step = mmjax_train_step(model, tx, trainable)
    t = time.perf_counter()
    compiled = step.lower(live, frozen, opt_state, batch).compile()
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree)) / 1e6      # noqa: E731
    mm = {"compile_s": time.perf_counter() - t, "memory": timing.compiled_memory(compiled),
          "xla_flops": timing.compiled_flops(compiled), "params_millions": count(params),
          "trained_millions": count(live)}

    for name, p in ref.named_parameters():
        p.requires_grad_(not name.startswith(("vision_model.", "language_model.")))
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=0.05)
    inputs = torch_inputs(host, ref.config.num_query_tokens)
    ref.train()                     # dropout is 0 on both sides (hf_config)

    def torch_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = ref(**inputs).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    times: dict[str, list[float]] = {"mmjax": [], "torch": []}
    losses: dict[str, list[float]] = {"mmjax": [], "torch": []}
    for i in range(warmup + steps):
        t = time.perf_counter()
        live, opt_state, loss = compiled(live, frozen, opt_state, batch)
        losses["mmjax"].append(float(loss))
        if i >= warmup:
            times["mmjax"].append(time.perf_counter() - t)
        t = time.perf_counter()
        losses["torch"].append(torch_step())
        if i >= warmup:
            times["torch"].append(time.perf_counter() - t)
        print(f"  step {i}: losses {losses['mmjax'][-1]:.6f} / {losses['torch'][-1]:.6f}", flush=True)
    mm.update(timing.summarize(times["mmjax"], s.batch))
    th = {"threads": torch.get_num_threads(), **timing.summarize(times["torch"], s.batch)}
    parts = blip2.stage2_train_flops(model, (s.image_size, s.image_size), s.text_length)
    analytic = s.batch * flops.total(parts)
    return {"workload": s.name, "config": dataclasses.asdict(s), "mmjax": mm, "torch": th,
            "ratio": th["step_time_s"] / mm["step_time_s"], "losses": losses,
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses["mmjax"], losses["torch"])),
            "flops": {"analytic_per_step": analytic, "parts_per_example": parts, "xla": mm["xla_flops"],
                      "agreement": mm["xla_flops"] / analytic if mm["xla_flops"] else None,
                      "mmjax_tflops": analytic / mm["step_time_s"] / 1e12,
                      "torch_tflops": analytic / th["step_time_s"] / 1e12}}


def run(args) -> dict[str, Any]:
    """The "blip2" section of benchmarks/cpu.py."""
    s = Setup("tiny", batch=2, text_length=6) if args.smoke else Setup(batch=args.blip_batch)
    print(f"[blip2] {s.name}: stage-2 train step (frozen ViT and OPT), mmjax and transformers in turns", flush=True)
    load = os.getloadavg()
    out = {"train": train_step(s, args.warmup, args.steps, args.threads)}
    return {"load_average_at_start": load, **out, "load_average_at_end": os.getloadavg()}
