"""BLIP's retrieval fine-tune (Li et al. 2022; the official blip_retrieval.py): ITC against a
momentum model and queues, with targets aware of image ids, plus ITM on hard negatives.

ITC: each online image (text) embedding is scored against the momentum text (image) embeddings of
the batch and of a queue of the last `queue_size` momentum embeddings; every column whose image id
equals the row's is a positive (COCO has five captions per image), so the hard targets are
uniform over those, softened by momentum distillation: α·softmax(momentum scores) + (1 − α)·hard
(α 0.4, ramped from 0 over `distill_warmup_steps`). The queues keep the image ids beside the
embeddings (BLIP's idx_queue, filled with -100 at the start: never a positive).
ITM: for every image one text and for every text one image of the global batch are drawn with
probability ∝ softmax of the online similarities, captions of the same image excluded; the
image-grounded encoder classifies the N positive and 2N negative pairs. Loss = ITC + ITM.

Config::

    task = "blip_retrieval"
    model = dict(vision=..., text=..., embed_dim=256, learn_temperature=True)   # BlipRetrieval
    momentum = dict(decay=0.995, queue_size=57600, distill=0.4, distill_warmup_steps=0)
    itm = dict(enc_token_id=None)    # BLIP's code puts [ENC] (30523) first in ITM texts

Without an "image_id" in the batch every example is its own image. A model without
`learn_temperature` (a transformers checkpoint has no temperature) scores at 1 / temperature_init.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax import flops
from mmjax.data import tokenizers
from mmjax.losses import distillation, matching
from mmjax.models import blip, blip_pretrain
from mmjax.tasks import base, momentum_state

MOMENTUM_DEFAULTS = {"decay": 0.995, "queue_size": None, "distill": 0.4, "distill_warmup_steps": 0}
ITM_DEFAULTS = {"enc_token_id": None}
NO_IMAGE = -100     # the image id of the queues' initial random entries


def _settings(config: ml_collections.ConfigDict, key: str, defaults: dict) -> dict:
    given = dict(config.get(key) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown {key} key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _embed_images(module: blip.BlipRetrieval, images: jax.Array, train: bool = False):
    tokens = module.encode_image_tokens(images, train=train)
    return tokens, module.embed_image(tokens)


def _logit_scale(module: blip.BlipRetrieval) -> jax.Array:
    if module.learn_temperature:
        return 1.0 / jnp.clip(module.temp, 0.001, 0.5)
    return jnp.float32(1.0 / module.temperature_init)


class BlipRetrievalTask(base.Task):
    """BLIP's image–text retrieval fine-tune (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = blip.BlipRetrieval(**config.model.to_dict())
        cfg = _settings(config, "momentum", MOMENTUM_DEFAULTS)
        self.decay = momentum_state.check_decay(cfg["decay"])
        self.queue_size = momentum_state.check_queue_size(cfg["queue_size"], int(config.input.batch_size))
        self.distill, self.distill_warmup = float(cfg["distill"]), int(cfg["distill_warmup_steps"])
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"momentum.distill must be in [0, 1], got {self.distill}")
        vocab = {**blip.TEXT_DEFAULTS, **(self.model.text or {})}["vocab_size"]
        self.enc_token_id = _settings(config, "itm", ITM_DEFAULTS)["enc_token_id"]
        if self.enc_token_id is not None and not 0 <= int(self.enc_token_id) < vocab:
            raise ValueError(f"itm.enc_token_id={self.enc_token_id} is outside the text vocabulary of {vocab} ids")
        self.tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"The tokenizer has {self.tokenizer.vocab_size} ids but the text tower embeds {vocab} "
                             "(model.text.vocab_size)")
        apply = self.model.apply
        self._embed_images = jax.jit(lambda v, x: apply(v, x, method=_embed_images)[1])
        self._embed_texts = jax.jit(lambda v, t: apply(v, t, self.mask(t), method="encode_text"))
        self._image_tokens = jax.jit(functools.partial(apply, method="encode_image_tokens"))
        self._match = jax.jit(lambda v, img, t: apply(v, self.itm_tokens(t), self.mask(t), img, method="match"))

    def mask(self, tokens: jax.Array) -> jax.Array:
        return tokens != self.tokenizer.pad_token_id

    def itm_tokens(self, tokens: jax.Array) -> jax.Array:
        """The ITM encoder's input: [CLS] -> [ENC] when itm.enc_token_id is set."""
        return tokens if self.enc_token_id is None else tokens.at[:, 0].set(int(self.enc_token_id))

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"], batch["text"], self.mask(batch["text"]))

    def loss(self, params, batch, rng):
        raise NotImplementedError("blip_retrieval trains against its momentum model: the trainer calls train_loss")

    def init_extra_state(self, params, rng):
        queue = momentum_state.init_queues(rng, self.queue_size, self.model.embed_dim)
        queue["image_id"] = nn.LogicallyPartitioned(jnp.full((self.queue_size, 1), NO_IMAGE, jnp.int32), (None, None))
        return {"ema_params": momentum_state.ema_copy(params), "queue": queue,
                "distill_step": jnp.zeros((), jnp.int32)}

    def image_ids(self, batch: dict) -> jax.Array | None:
        ids = batch.get("image_id")
        if ids is None:
            return None
        ids = jnp.asarray(ids)
        if ids.shape != (batch["image"].shape[0],) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"image_id must be one integer per example, got {ids.dtype} {ids.shape}")
        return ids.astype(jnp.int32)

    def train_loss(self, params, extra, batch, rng):
        images, text = batch["image"], batch["text"]
        mask, ids = self.mask(text), self.image_ids(batch)
        ema = momentum_state.ema_update(extra["ema_params"], params, self.decay)
        alpha = distillation.distill_alpha(extra["distill_step"], self.distill, self.distill_warmup)
        drop_rng, negatives_rng = jax.random.split(rng)
        rngs = {"dropout": drop_rng}
        variables = {"params": params}
        image_tokens, image_feat = self.model.apply(variables, images, True, method=_embed_images, rngs=rngs)
        text_feat = self.model.apply(variables, text, mask, train=True, method="encode_text", rngs=rngs)
        scale = self.model.apply(variables, method=_logit_scale)
        _, image_feat_m = self.model.apply({"params": ema}, images, method=_embed_images)
        text_feat_m = self.model.apply({"params": ema}, text, mask, method="encode_text")
        image_feat_m, text_feat_m = jax.lax.stop_gradient(image_feat_m), jax.lax.stop_gradient(text_feat_m)

        queue = extra["queue"]
        texts_all = jnp.concatenate([text_feat_m, queue["text"]])
        images_all = jnp.concatenate([image_feat_m, queue["image"]])
        positives = None
        if ids is not None:
            positives = ids[:, None] == jnp.concatenate([ids, queue["image_id"][:, 0]])[None, :]
        teacher_scale = jax.lax.stop_gradient(scale)
        itc, itc_metrics = distillation.itc_distill_loss(
            scale * image_feat @ texts_all.T, scale * text_feat @ images_all.T,
            teacher_scale * image_feat_m @ texts_all.T, teacher_scale * text_feat_m @ images_all.T, alpha, positives)

        sim = jax.lax.stop_gradient(scale * image_feat @ text_feat.T)
        negatives = matching.sample_hard_negatives(negatives_rng, sim, sim.T, image_ids=ids)
        texts = (self.itm_tokens(text), mask)
        pair_images, (pair_text, pair_mask) = matching.itm_inputs(negatives, image_tokens, texts)
        itm_logits = self.model.apply(variables, pair_text, pair_mask, pair_images, train=True, method="match",
                                      rngs=rngs)
        itm, itm_metrics = matching.itm_loss(itm_logits, matching.itm_weights(negatives))

        new_ids = jnp.full((text.shape[0],), NO_IMAGE, jnp.int32) if ids is None else ids
        new_queue = momentum_state.enqueue_all(queue, image=image_feat_m, text=text_feat_m, image_id=new_ids[:, None])
        metrics = {**itc_metrics, **itm_metrics, "itc_loss": itc, "itm_loss": itm, "logit_scale": scale,
                   "distill_alpha": alpha}
        new_extra = {"ema_params": ema, "queue": new_queue, "distill_step": extra["distill_step"] + 1}
        return itc + itm, (metrics, new_extra)

    def train_flops_per_example(self, batch_shapes):
        """Online towers forward and backward (image, unimodal text, the ITM encoder on 3 pairs, the
        heads; BLIP pretraining's count less its decoder), the momentum towers' forward, and this
        example's share of the ITC logits against batch + queue (online: forward and the gradient
        to its own features, the momentum side has none; teacher and hard-negative scores: forward)."""
        hw, length = tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1]
        online = {k: v for k, v in blip_pretrain.forward_flops(self.model, hw, length).items()
                  if not k.startswith("decoder")}
        momentum = blip_pretrain.momentum_forward_flops(self.model, hw, length)
        columns = batch_shapes["image"][0] + self.queue_size
        logits = 2 * flops.dense(1, self.model.embed_dim, columns)      # image-to-text and text-to-image
        negatives = flops.dense(1, self.model.embed_dim, batch_shapes["image"][0])
        return (flops.TRAIN_FACTOR * flops.total(online) + flops.total(momentum) + 2 * logits + logits
                + negatives)

    def model_description(self, batch):
        inputs = [base.input_spec(batch["image"]), base.input_spec(batch["text"]),
                  base.input_spec(batch["text"], bool)]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def embed_images(self, params, images: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC embeddings of the image [CLS] tokens."""
        return self._embed_images({"params": params}, images)

    def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC embeddings of the unimodal text [CLS] tokens."""
        return self._embed_texts({"params": params}, tokens)

    def image_tokens(self, params, images: jax.Array) -> jax.Array:
        """(B, 1 + patches, width) vision states, computed once per image for ITM re-ranking."""
        return self._image_tokens({"params": params}, images)

    def match_tokens(self, params, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
        """(B,) ITM 'match' logits of (image_tokens i, text i)."""
        return self._match({"params": params}, image_tokens, tokens)[:, 1]
