"""Contrastive image–text pretraining (CLIP / SigLIP) and the predict functions its evaluators call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import flops
from mmjax.data import tokenizers
from mmjax.losses import contrastive
from mmjax.models import clip
from mmjax.tasks import base

LOSSES = ("clip", "siglip")


def loss_inputs(out: dict) -> tuple[jax.Array, ...]:
    """CLIP's output dict as the losses' positional inputs: (zimg, ztxt, scale[, bias])."""
    args = (out["image_embeds"], out["text_embeds"], out["logit_scale"])
    return args + ((out["logit_bias"],) if "logit_bias" in out else ())


def pair_logits(out: dict) -> jax.Array:
    """(B,) logits of the aligned pairs (image i, text i) of CLIP's output dict."""
    logits = out["logit_scale"] * jnp.sum(out["image_embeds"] * out["text_embeds"], axis=-1)
    return logits + out["logit_bias"] if "logit_bias" in out else logits


class ContrastiveTask(base.Task):
    """Trains `mmjax.models.clip.CLIP` on batches with "image" and tokenized "text"."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        loss_cfg = config.get("loss", {})
        self.loss_name = loss_cfg.get("name", "clip")
        if self.loss_name not in LOSSES:
            raise ValueError(f"Unknown contrastive loss {self.loss_name!r}; known: {LOSSES}")
        impl = loss_cfg.get("impl", "full")   # "local" (clip) / "chunked" (siglip) save memory
        if (self.loss_name, impl) not in contrastive.LOSSES:
            known = sorted(i for n, i in contrastive.LOSSES if n == self.loss_name)
            raise ValueError(f"Unknown loss.impl {impl!r} for the {self.loss_name} loss; known: {known}")
        self._loss_fn = contrastive.LOSSES[(self.loss_name, impl)]
        if impl == "chunked" and loss_cfg.get("num_chunks"):
            self._loss_fn = functools.partial(self._loss_fn, num_chunks=int(loss_cfg.num_chunks))
        model_cfg = config.model.to_dict()
        if self.loss_name == "siglip" and model_cfg.get("logit_bias_init") is None:
            raise ValueError("The siglip loss needs model.logit_bias_init (SigLIP uses -10)")
        self.model = clip.CLIP(**model_cfg)
        self.tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        context = model_cfg.get("text", {}).get("context_length", 77)
        if self.tokenizer.context_length > context:
            raise ValueError(f"Tokenizer context length {self.tokenizer.context_length} exceeds the "
                             f"text tower's context_length {context}")
        self._encode_image = jax.jit(functools.partial(self.model.apply, method="encode_image"))
        self._encode_text = jax.jit(functools.partial(self.model.apply, method="encode_text"))
        self._score_pairs = jax.jit(lambda variables, images, tokens: pair_logits(
            self.model.apply(variables, images, tokens)))

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"], batch["text"])

    def loss(self, params, batch, rng):
        out = self.model.apply({"params": params}, batch["image"], batch["text"], train=True,
                               rngs={"dropout": rng})
        loss, metrics = self._loss_fn(*loss_inputs(out))
        metrics["logit_scale"] = out["logit_scale"]
        return loss, metrics

    def model_description(self, batch):
        inputs = [base.input_spec(batch["image"]), base.input_spec(batch["text"])]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def train_flops_per_example(self, batch_shapes):
        parts = clip.forward_flops(self.model, tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1],
                                  batch_size=batch_shapes["image"][0], train=True)
        return flops.TRAIN_FACTOR * flops.total(parts)

    def embed_images(self, params, images: jax.Array) -> jax.Array:
        """(B, embed_dim) unnormalised image embeddings (zero-shot and retrieval call this)."""
        return self._encode_image({"params": params}, images)

    def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
        """(B, embed_dim) unnormalised text embeddings of token ids."""
        return self._encode_text({"params": params}, tokens)

    def score_pairs(self, params, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """(B,) logits that image i matches text i: scale · cosine (+ SigLIP's bias), for re-ranking."""
        return self._score_pairs({"params": params}, images, tokens)
