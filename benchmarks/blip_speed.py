"""BLIP-B against transformers on this CPU: a pretraining train step and caption generation.

transformers has no BLIP pretraining module, so both sides run the same composition of the
converted models, with the same weights (random, converted by mmjax/convert/blip.py) and inputs:
BlipForImageTextRetrieval (vision tower, ITC projections, image-grounded text encoder, ITM head)
plus BlipForConditionalGeneration's text decoder (its vision tower is left out: pretraining's
decoder reads the one vision tower's tokens). One step is forward and backward of
ITC (in-batch, temperature 0.07) + ITM (cross-entropy over B positives, B negative texts and B
negative images; the negatives are the batch rolled by one, where BLIP samples hard negatives:
the same work, but deterministic on both sides) + LM (token cross-entropy with label smoothing
0.1, BLIP's), then AdamW. The losses of every step are compared between the two sides.

Generation: BlipCaptioner through mmjax.generate.Generator against
BlipForConditionalGeneration.generate, greedy and beam 3, prompt [DEC], exactly `new_tokens`
new tokens (min = max: random weights would stop at random places), image encoding included on
both sides. The two sides run in turns within one process, so both see the same background load.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import timing
from mmjax import flops, generate, pretrained
from mmjax.convert import blip as blip_convert
from mmjax.convert import engine
from mmjax.models import bert, vit

TEMPERATURE = 0.07          # BLIP's initial ITC temperature (kept fixed here on both sides)
LABEL_SMOOTHING = 0.1       # BLIP's captioning LM loss
ENC, DEC, CLS, SEP, PAD = 30523, 30522, 101, 102, 0   # BLIP's [ENC] / [DEC] and BERT's ids


@dataclasses.dataclass(frozen=True)
class Setup:
    """The benchmarked shapes: BLIP-B ("base": ViT-B/16, BERT-base with 12 heads, vocabulary
    30524) or a tiny model ("tiny": tests), at `image_size` with `text_length`-token captions."""

    size: str = "base"
    batch: int = 4
    image_size: int = 224
    text_length: int = 32
    new_tokens: int = 20

    @property
    def vocab(self) -> int:
        return 30524 if self.size == "base" else 99

    @property
    def name(self) -> str:
        return f"blip {self.size} @{self.image_size} text{self.text_length} b{self.batch} float32"

    def hf_config(self):
        from transformers import BlipConfig

        if self.size == "base":   # transformers' BLIP defaults are BLIP-base, but 8 text heads: BLIP has 12
            vision, text = {"image_size": self.image_size}, {"num_attention_heads": 12}
        else:
            vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                          image_size=self.image_size, patch_size=8)
            text = dict(hidden_size=24, encoder_hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, vocab_size=99, max_position_embeddings=64, bos_token_id=DEC % 99,
                        sep_token_id=SEP % 99, pad_token_id=PAD)
        return BlipConfig(vision_config=vision, text_config=text)

    def token(self, token_id: int) -> int:
        return token_id if self.size == "base" else token_id % self.vocab


def torch_models(s: Setup, seed: int = 0):
    """(BlipForImageTextRetrieval, BlipForConditionalGeneration) with random weights; vision
    weights redrawn at std 0.02 (transformers draws them at 1e-10, which would hide the image)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    torch.manual_seed(seed)
    models = []
    for cls in (BlipForImageTextRetrieval, BlipForConditionalGeneration):
        model = cls(s.hf_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and "vision_model" in name:
                    p.normal_(0, 0.02)
        models.append(model)
    return tuple(models)


def to_mmjax(ref) -> tuple[nn.Module, dict]:
    """transformers model -> (mmjax module, params) through the conversion table, in memory."""
    config = ref.config.to_dict()
    config["architectures"] = [type(ref).__name__]
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    plan = blip_convert.from_hf(config, state)
    model = pretrained.build(plan.model_class, plan.fields)
    flat = engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs))
    return model, engine.unflatten(flat)


def random_inputs(s: Setup, seed: int = 0) -> dict[str, np.ndarray]:
    """Images (B, H, W, 3), captions (B, L) with [CLS]/[ENC]/[DEC] first variants and a padding mask."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(s.batch, s.image_size, s.image_size, 3)).astype(np.float32)
    lengths = rng.integers(s.text_length // 2, s.text_length + 1, s.batch)
    mask = np.arange(s.text_length)[None] < lengths[:, None]
    words = rng.integers(1000, s.vocab - 2, (s.batch, s.text_length)) if s.size == "base" else \
        rng.integers(3, s.vocab - 3, (s.batch, s.text_length))
    words[np.arange(s.batch), lengths - 1] = s.token(SEP)
    words = np.where(mask, words, PAD).astype(np.int32)
    out = {"images": images, "mask": mask}
    for key, first in (("itc", CLS), ("itm", ENC), ("lm", DEC)):
        out[key] = words.copy()
        out[key][:, 0] = s.token(first)
    return out


def itm_pairs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text index, image index and label (1 = match) of the 3n ITM pairs: n positives, each image
    with the next text, each text with the next image."""
    rolled = (np.arange(n) + 1) % n
    text = np.concatenate([np.arange(n), rolled, np.arange(n)])
    image = np.concatenate([np.arange(n), np.arange(n), rolled])
    return text, image, np.concatenate([np.ones(n), np.zeros(2 * n)]).astype(np.int32)


# --- mmjax -------------------------------------------------------------------------------------

def mmjax_losses(retrieval: nn.Module, captioner: nn.Module, params: dict, b: dict) -> dict[str, jax.Array]:
    ret = {"params": params["retrieval"]}
    image_tokens = retrieval.apply(ret, b["images"], method="encode_image_tokens")
    zi = retrieval.apply(ret, image_tokens, method="embed_image")
    zt = retrieval.apply(ret, b["itc"], b["mask"], method="encode_text")
    sim = zi @ zt.T / TEMPERATURE
    target = jnp.arange(sim.shape[0])
    itc = (optax.softmax_cross_entropy_with_integer_labels(sim, target).mean()
           + optax.softmax_cross_entropy_with_integer_labels(sim.T, target).mean()) / 2
    text, image, label = itm_pairs(sim.shape[0])
    itm_logits = retrieval.apply(ret, b["itm"][text], b["mask"][text], image_tokens[image], method="match")
    itm = optax.softmax_cross_entropy_with_integer_labels(itm_logits, jnp.asarray(label)).mean()
    logits = captioner.apply({"params": params["decoder"]}, b["lm"], mask=b["mask"], context=image_tokens,
                             method="decode_text")["logits"][:, :-1]
    vocab = logits.shape[-1]
    smooth = optax.smooth_labels(jax.nn.one_hot(b["lm"][:, 1:], vocab), LABEL_SMOOTHING)
    valid = b["mask"][:, 1:]
    per_token = optax.softmax_cross_entropy(logits, smooth)
    lm = jnp.sum(per_token * valid) / jnp.sum(valid)
    return {"itc": itc, "itm": itm, "lm": lm}


def mmjax_train_step(retrieval: nn.Module, captioner: nn.Module, tx: optax.GradientTransformation):
    """(params, opt_state, batch) -> (params, opt_state, losses), jitted with the state donated."""

    def step(params, opt_state, batch):
        def loss_fn(p):
            parts = mmjax_losses(retrieval, captioner, p, batch)
            return sum(parts.values()), parts
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    return jax.jit(step, donate_argnums=(0, 1))


# --- transformers ------------------------------------------------------------------------------

def torch_losses(retrieval, captioner, b: dict) -> dict:
    import torch
    import torch.nn.functional as F

    image_states = retrieval.vision_model(pixel_values=b["pixels"])[0]
    zi = F.normalize(retrieval.vision_proj(image_states[:, 0]), dim=-1)
    text = retrieval.text_encoder(input_ids=b["itc"], attention_mask=b["mask"])[0]   # no image: unimodal
    zt = F.normalize(retrieval.text_proj(text[:, 0]), dim=-1)
    sim = zi @ zt.T / TEMPERATURE
    target = torch.arange(sim.shape[0])
    itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
    t, i, label = (torch.from_numpy(x).long() for x in itm_pairs(sim.shape[0]))
    fused = retrieval.text_encoder(input_ids=b["itm"][t], attention_mask=b["mask"][t],
                                   encoder_hidden_states=image_states[i])[0]
    itm = F.cross_entropy(retrieval.itm_head(fused[:, 0]), label)
    logits = captioner.text_decoder(input_ids=b["lm"], attention_mask=b["mask"],
                                    encoder_hidden_states=image_states).logits[:, :-1]
    labels = b["lm"][:, 1:].masked_fill(b["mask"][:, 1:] == 0, -100)
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                         label_smoothing=LABEL_SMOOTHING)
    return {"itc": itc, "itm": itm, "lm": lm}


def torch_batch(b: dict) -> dict:
    import torch

    out = {k: torch.from_numpy(b[k]).long() for k in ("itc", "itm", "lm")}
    out["mask"] = torch.from_numpy(b["mask"]).long()
    out["pixels"] = torch.from_numpy(b["images"].transpose(0, 3, 1, 2).copy())
    return out


# --- analytic FLOPs ----------------------------------------------------------------------------

def train_flops_per_example(retrieval: nn.Module, captioner: nn.Module, s: Setup) -> dict[str, float]:
    """Forward FLOPs of one example by part: the vision tower, the unimodal text encoder, three
    ITM pairs through the image-grounded encoder, the decoder with its LM head, projections."""
    hw = (s.image_size, s.image_size)
    v = _bound_tower(retrieval, "vision_model")
    parts = flops.prefixed("image_", vit.forward_flops(v, hw))
    tokens = vit.tokens_seen(v, hw)
    width = v.arch()["width"]
    text = _bound_tower(retrieval, "text_encoder")
    fused = bert.forward_flops(text, s.text_length, tokens, width)
    unimodal = {k: x for k, x in fused.items() if not k.startswith("cross_")}
    parts.update(flops.prefixed("text_", unimodal))
    parts.update(flops.prefixed("itm_", {k: 3 * x for k, x in fused.items()}))
    parts.update(flops.prefixed("lm_", bert.forward_flops(_bound_tower(captioner, "text_decoder"), s.text_length,
                                                           tokens, width)))
    embed = retrieval.embed_dim
    parts["heads"] = flops.dense(1, width, embed) + flops.dense(1, text.arch()["width"], embed) \
        + 3 * flops.dense(1, text.arch()["width"], 2) + flops.dense(1, embed, s.batch)
    return parts


def _bound_tower(model: nn.Module, name: str) -> nn.Module:
    """A tower of an (unbound) BLIP module as setup() builds it."""
    from mmjax.models import blip

    if name == "vision_model":
        return blip.vision_tower(model.vision, model.dtype)
    causal = name == "text_decoder"
    return blip.text_tower(model.text, model.dtype, causal=causal, lm_head=causal)


# --- the measurements --------------------------------------------------------------------------

def train_step(s: Setup, warmup: int, steps: int, threads: int | None = None) -> dict[str, Any]:
    """The train step on both sides, in turns: times, compile time, XLA memory and FLOPs, the
    analytic FLOPs and the losses of every step on both sides."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    ref_retrieval, ref_captioner = torch_models(s)
    retrieval, ret_params = to_mmjax(ref_retrieval)
    captioner, cap_params = to_mmjax(ref_captioner)
    params = {"retrieval": ret_params, "decoder": {k: v for k, v in cap_params.items() if k != "vision_model"}}
    params = jax.tree.map(jnp.asarray, params)
    del cap_params, ret_params
    del ref_captioner.vision_model     # the decoder reads the retrieval model's image tokens, as in pretraining
    gc.collect()
    host = random_inputs(s)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = jax.jit(tx.init)(params)
    step = mmjax_train_step(retrieval, captioner, tx)
    t = time.perf_counter()
    compiled = step.lower(params, opt_state, batch).compile()
    mm = {"compile_s": time.perf_counter() - t, "memory": timing.compiled_memory(compiled),
          "xla_flops": timing.compiled_flops(compiled),
          "params_millions": sum(x.size for x in jax.tree.leaves(params)) / 1e6}

    trainable = [p for m in (ref_retrieval, ref_captioner) for p in m.parameters()]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    tb = torch_batch(host)
    ref_retrieval.train(), ref_captioner.train()   # dropout is 0 on both sides

    def torch_step():
        opt.zero_grad(set_to_none=True)
        parts = torch_losses(ref_retrieval, ref_captioner, tb)
        sum(parts.values()).backward()
        opt.step()
        return {k: float(v.detach()) for k, v in parts.items()}

    times: dict[str, list[float]] = {"mmjax": [], "torch": []}
    losses: dict[str, list[dict]] = {"mmjax": [], "torch": []}
    first_torch = None
    for i in range(warmup + steps):
        t = time.perf_counter()
        params, opt_state, parts = compiled(params, opt_state, batch)
        parts = {k: float(v) for k, v in jax.device_get(parts).items()}
        elapsed = time.perf_counter() - t
        losses["mmjax"].append(parts)
        if i >= warmup:
            times["mmjax"].append(elapsed)
        t = time.perf_counter()
        losses["torch"].append(torch_step())
        elapsed = time.perf_counter() - t
        first_torch = elapsed if i == 0 else first_torch
        if i >= warmup:
            times["torch"].append(elapsed)
        print(f"  step {i}: mmjax {times['mmjax'][-1] if i >= warmup else float('nan'):.2f}s "
              f"torch {elapsed:.2f}s, losses {losses['mmjax'][-1]} / {losses['torch'][-1]}", flush=True)
    mm.update(timing.summarize(times["mmjax"], s.batch))
    th = {"first_call_s": first_torch, "threads": torch.get_num_threads(), **timing.summarize(times["torch"], s.batch)}
    parts = train_flops_per_example(retrieval, captioner, s)
    analytic = flops.TRAIN_FACTOR * s.batch * flops.total(parts)
    loss_diff = max(abs(a[k] - b[k]) for a, b in zip(losses["mmjax"], losses["torch"]) for k in a)
    return {"workload": s.name, "config": dataclasses.asdict(s), "mmjax": mm, "torch": th,
            "ratio": th["step_time_s"] / mm["step_time_s"], "losses": losses, "max_loss_diff": loss_diff,
            "flops": {"analytic_per_step": analytic, "forward_parts_per_example": parts, "xla": mm["xla_flops"],
                      "agreement": mm["xla_flops"] / analytic if mm["xla_flops"] else None,
                      "mmjax_tflops": analytic / mm["step_time_s"] / 1e12,
                      "torch_tflops": analytic / th["step_time_s"] / 1e12}}


def generation(s: Setup, warmup: int, steps: int, beams: tuple[int, ...] = (1, 3),
               threads: int | None = None) -> list[dict[str, Any]]:
    """Captions of `s.batch` images, exactly `s.new_tokens` new tokens, per beam count: both
    sides in turns; first-call (compile) and steady times, tokens/s, and whether the tokens agree."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    _, ref = torch_models(s, seed=1)
    ref.eval()
    captioner, params = to_mmjax(ref)
    params = jax.tree.map(jnp.asarray, params)
    host = random_inputs(s, seed=1)
    images, pixels = jnp.asarray(host["images"]), torch_batch(host)["pixels"]
    length = 1 + s.new_tokens
    generator = generate.Generator(generate.FlaxDecoder(captioner, method="decode_text"), max_length=length)
    encode = jax.jit(lambda p, x: captioner.apply({"params": p}, x, method="encode_images"))
    prompt = jnp.full((s.batch, 1), s.token(DEC), jnp.int32)
    rows = []
    for num_beams in beams:
        config = generate.GenerationConfig(max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                                           num_beams=num_beams, eos_token_id=s.token(SEP), pad_token_id=PAD)

        def mmjax_caption(config=config):
            out = generator(params, prompt, config, inputs={"context": encode(params, images)})
            return np.asarray(jax.block_until_ready(out.sequences))

        def torch_caption(num_beams=num_beams):
            with torch.inference_mode():
                return ref.generate(pixel_values=pixels, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                                    num_beams=num_beams, do_sample=False).numpy()

        first, times, tokens = timing.in_turns({"mmjax": mmjax_caption, "torch": torch_caption}, warmup, steps)
        generated = s.batch * s.new_tokens
        row = {"workload": f"{s.name} caption", "num_beams": num_beams, "new_tokens": s.new_tokens,
               "same_tokens": tokens["mmjax"].shape == tokens["torch"].shape
               and bool(np.array_equal(tokens["mmjax"], tokens["torch"])),
               "mmjax_tokens": tokens["mmjax"].tolist(), "torch_tokens": tokens["torch"].tolist()}
        for side in ("mmjax", "torch"):
            summary = timing.summarize(times[side], s.batch)
            row[side] = {**summary, "first_call_s": first[side], "tokens_per_sec": generated / summary["step_time_s"],
                         "compile_s": first[side] - summary["step_time_s"]}
        row["ratio"] = row["mmjax"]["tokens_per_sec"] / row["torch"]["tokens_per_sec"]
        row["traces"] = generator.traces
        print(f"  beams {num_beams}: mmjax {row['mmjax']['tokens_per_sec']:.3g} tok/s, torch "
              f"{row['torch']['tokens_per_sec']:.3g} tok/s, ratio {row['ratio']:.2f}, same tokens "
              f"{row['same_tokens']}", flush=True)
        rows.append(row)
    return rows


def run(args) -> dict[str, Any]:
    """The "blip" section of benchmarks/cpu.py: the train step, then generation."""
    s = Setup("tiny", batch=2, image_size=32, text_length=8, new_tokens=4) if args.smoke else \
        Setup(batch=args.batch)
    print(f"[blip] {s.name}: train step, mmjax and transformers in turns", flush=True)
    out = {"load_average_at_start": os.getloadavg(), "train": train_step(s, args.warmup, args.steps, args.threads)}
    gc.collect()
    print(f"[blip] {s.name}: caption generation, {s.new_tokens} new tokens", flush=True)
    beams = (1,) if args.smoke else (1, 3)   # beam search's tokens are checked in tests/models/test_blip.py
    out["generation"] = generation(s, args.warmup, args.steps, beams, threads=args.threads)
    out["load_average_at_end"] = os.getloadavg()   # other jobs share the cores: both sides ran in turns
    return out
