"""Greedy generation with a KV cache: mmjax's DecoderLM + Generator against transformers'
LlamaForCausalLM.generate on this CPU, the same random weights (converted by
mmjax/convert/decoder_lm.py) and the same prompts.

The model is LLaMA's structure at small dimensions (RMSNorm, rotary positions, SwiGLU, grouped-
query attention, untied head, LLaMA's 32,000-token vocabulary). Each batch size generates exactly
`new_tokens` tokens after a `prompt_length`-token prompt (min = max: random weights would stop at
random places), both sides in turns within one process, so they see the same background load.
mmjax's first call compiles (prefill and the decode loop are one program); its compile time is
that call's time less the steady one. The generated tokens of the two sides are compared.
Run as the `llm` section of benchmarks/cpu.py:
  python -m benchmarks.cpu --sections llm --out benchmarks/results/llm_cpu.json
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from mmjax import generate, pretrained
from mmjax.convert import decoder_lm as decoder_lm_convert
from mmjax.convert import engine

PAD, BOS, EOS = 0, 1, 2      # LLaMA's special ids


@dataclasses.dataclass(frozen=True)
class Setup:
    """The benchmarked shapes: "small" (width 256, 4 layers, 8 heads of which 4 key/value heads,
    SwiGLU 688, vocabulary 32,000) or "tiny" (tests)."""

    size: str = "small"
    batches: tuple[int, ...] = (1, 8)
    prompt_length: int = 16
    new_tokens: int = 64

    @property
    def arch(self) -> dict[str, int]:
        if self.size == "small":
            return dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=688, vocab_size=32_000)
        return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, vocab_size=256)

    @property
    def name(self) -> str:
        a = self.arch
        return (f"llama {self.size} (width {a['hidden_size']}, {a['num_hidden_layers']} layers, "
                f"{a['num_attention_heads']}/{a['num_key_value_heads']} heads, vocab {a['vocab_size']}) float32")

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**self.arch, max_position_embeddings=self.prompt_length + self.new_tokens,
                           pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def torch_model(s: Setup, seed: int = 0):
    """LlamaForCausalLM with random weights, its 1-D weights (the norms) moved away from their 1 init."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(s.hf_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def to_mmjax(ref) -> tuple[Any, dict]:
    """transformers model -> (DecoderLM, params) through the conversion table, in memory."""
    config = ref.config.to_dict()
    config["architectures"] = [type(ref).__name__]
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    plan = decoder_lm_convert.from_hf(config, state)
    model = pretrained.build(plan.model_class, plan.fields)
    flat = engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs))
    return model, jax.tree.map(jnp.asarray, engine.unflatten(flat))


def prompts(s: Setup, batch: int, seed: int = 0) -> np.ndarray:
    """(batch, prompt_length) ids: BOS, then random ordinary tokens (no padding)."""
    rng = np.random.default_rng(seed + batch)
    ids = rng.integers(3, s.arch["vocab_size"], (batch, s.prompt_length)).astype(np.int32)
    ids[:, 0] = BOS
    return ids


def generation(s: Setup, warmup: int, steps: int, threads: int | None = None) -> list[dict[str, Any]]:
    """Per batch size: first-call and steady times, tokens/s of both sides and whether the tokens agree."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    ref = torch_model(s)
    model, params = to_mmjax(ref)
    generator = generate.Generator(generate.FlaxDecoder(model), max_length=s.prompt_length + s.new_tokens)
    config = generate.GenerationConfig(max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                                       eos_token_id=EOS, pad_token_id=PAD)
    rows = []
    for batch in s.batches:
        host = prompts(s, batch)
        prompt, torch_prompt = jnp.asarray(host), torch.from_numpy(host).long()

        def mmjax_generate(prompt=prompt):
            out = generator(params, prompt, config)
            return np.asarray(jax.block_until_ready(out.generated))

        def torch_generate(torch_prompt=torch_prompt):
            with torch.inference_mode():
                out = ref.generate(torch_prompt, attention_mask=torch.ones_like(torch_prompt), do_sample=False,
                                   max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, pad_token_id=PAD,
                                   eos_token_id=EOS)
            return out[:, s.prompt_length:].numpy()

        first, times, tokens = timing.in_turns({"mmjax": mmjax_generate, "torch": torch_generate}, warmup, steps)
        same = tokens["mmjax"].shape == tokens["torch"].shape and bool(np.array_equal(tokens["mmjax"],
                                                                                     tokens["torch"]))
        row = {"workload": s.name, "batch": batch, "prompt_length": s.prompt_length, "new_tokens": s.new_tokens,
               "same_tokens": same, "matching_token_fraction": float(np.mean(tokens["mmjax"] == tokens["torch"]))
               if tokens["mmjax"].shape == tokens["torch"].shape else 0.0,
               "mmjax_tokens": tokens["mmjax"].tolist(), "torch_tokens": tokens["torch"].tolist()}
        for side in ("mmjax", "torch"):
            summary = timing.summarize(times[side], batch)
            row[side] = {**summary, "first_call_s": first[side],
                         "tokens_per_sec": batch * s.new_tokens / summary["step_time_s"]}
        row["mmjax"]["compile_s"] = first["mmjax"] - row["mmjax"]["step_time_s"]    # torch compiles nothing
        row["ratio"] = row["mmjax"]["tokens_per_sec"] / row["torch"]["tokens_per_sec"]
        row["traces"] = generator.traces
        print(f"  batch {batch}: mmjax {row['mmjax']['tokens_per_sec']:.4g} tok/s (compile "
              f"{row['mmjax']['compile_s']:.1f}s), transformers {row['torch']['tokens_per_sec']:.4g} tok/s, "
              f"ratio {row['ratio']:.2f}, same tokens {same}", flush=True)
        rows.append(row)
    return rows


def run(args) -> dict[str, Any]:
    """The "llm" section of benchmarks/cpu.py."""
    s = Setup("tiny", batches=(1, 2), prompt_length=4, new_tokens=6) if args.smoke else Setup()
    print(f"[llm] {s.name}: greedy generation, prompt {s.prompt_length}, {s.new_tokens} new tokens", flush=True)
    load = os.getloadavg()
    rows = generation(s, args.warmup, args.steps, args.threads)
    return {"load_average_at_start": load, "generation": rows, "load_average_at_end": os.getloadavg()}
