"""BLIP pretraining (Li et al. 2022, Sec. 3.2): ITC + ITM + LM on image-text pairs.

* ITC: the unimodal [CLS] embeddings against a momentum model's embeddings of the batch plus
  queues of past ones, with momentum distillation (α ramped linearly from 0 over the first
  `alpha_warmup_steps`; BLIP's pretrain.py ramps it over the first 2 epochs).
* ITM: the image-grounded encoder (first token [ENC]) classifies the N pairs and 2N hard
  negatives drawn over the global batch from the ITC similarities against the momentum
  features, softmax + 1e-4 (BLIP's floor), own pair excluded (mmjax.losses.matching).
* LM: the causal decoder (first token [DEC]) predicts the caption, label smoothing 0.1.
loss = itc + itm + lm. Config::

    task = "blip"
    model = dict(vision=dict(...), text=dict(..., vocab_size=V + 2), embed_dim=256)
    momentum = dict(decay=0.995, queue_size=57600, alpha=0.4, alpha_warmup_steps=...)
    loss = dict(label_smoothing=0.1, negative_floor=1e-4)

Extra train state: "momentum_params" (the momentum towers only: vision_model, text_encoder,
vision_proj, text_proj, as BLIP's model_pairs; `mmjax.load(WORKDIR, which="ema")` gives the
online parameters with these four replaced by their momentum copies, mmjax/runs.py),
"queue" (image and text queues, pointer) and "distill_step" (the step count the α ramp reads).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import flops, generate
from mmjax.data import tokenizers
from mmjax.losses import distillation, language, matching
from mmjax.models import blip, blip_pretrain
from mmjax.tasks import base, momentum_state

MOMENTUM_DEFAULTS = {"decay": 0.995, "queue_size": None, "alpha": 0.4, "alpha_warmup_steps": 0}
LOSS_DEFAULTS = {"label_smoothing": 0.1, "negative_floor": 1e-4}
MOMENTUM_TOWERS = ("vision_model", "text_encoder", "vision_proj", "text_proj")
MODEL_KEYS = ("vision", "text", "embed_dim", "temperature_init", "dtype")


def _options(config: ml_collections.ConfigDict, key: str, defaults: dict) -> dict:
    given = dict(config.get(key) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown {key} key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def momentum_towers(params: Any) -> dict:
    """The parameters BLIP keeps a momentum copy of."""
    return {k: params[k] for k in MOMENTUM_TOWERS}


def _momentum_embeds(model: blip_pretrain.BlipPretrain, images, tokens, mask):
    return model.embed_image(model.encode_image_tokens(images)), model.encode_text(tokens, mask)


def _image_tokens(model: blip_pretrain.BlipPretrain, images):
    return model.encode_image_tokens(images)


def _embed_images(model: blip_pretrain.BlipPretrain, images):
    return model.embed_image(model.encode_image_tokens(images))


def _match(model: blip_pretrain.BlipPretrain, image_tokens, tokens, mask):
    return model.match(tokens, mask, image_tokens)[:, 1]


class BlipPretrainTask(base.Task):
    """Trains `mmjax.models.blip_pretrain.BlipPretrain` on batches with "image" and tokenized "text"."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        model_cfg = config.model.to_dict()
        unknown = sorted(set(model_cfg) - set(MODEL_KEYS))
        if unknown:
            raise ValueError(f"Unknown model key(s) {unknown}; known: {list(MODEL_KEYS)}")
        self.model = blip_pretrain.BlipPretrain(**model_cfg)
        self.tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        for attr in ("cls_token_id", "sep_token_id", "pad_token_id"):
            if getattr(self.tokenizer, attr, None) is None:
                raise ValueError(f"BLIP needs a BERT-style tokenizer with [CLS]/[SEP]/[PAD] (e.g. 'wordpiece'); "
                                 f"input.tokenizer {config.input.tokenizer.get('name')!r} has no {attr}")
        text = blip.text_tower(self.model.text, self.model.dtype, causal=False, lm_head=False)
        if text.vocab_size != self.tokenizer.vocab_size + blip_pretrain.ADDED_TOKENS:
            raise ValueError(f"model.text.vocab_size={text.vocab_size} must be the tokenizer's vocabulary "
                             f"{self.tokenizer.vocab_size} + 2 (BLIP's [DEC] and [ENC]): set it to "
                             f"{self.tokenizer.vocab_size + blip_pretrain.ADDED_TOKENS}")
        if self.tokenizer.context_length > text.max_len:
            raise ValueError(f"Tokenizer context_length {self.tokenizer.context_length} exceeds the text "
                             f"tower's {text.max_len} positions (model.text.max_len)")
        self.special = blip_pretrain.special_tokens(text.vocab_size)
        m = _options(config, "momentum", MOMENTUM_DEFAULTS)
        self.decay = momentum_state.check_decay(m["decay"])
        self.queue_size = momentum_state.check_queue_size(m["queue_size"], int(config.input.batch_size))
        self.alpha, self.alpha_warmup = float(m["alpha"]), int(m["alpha_warmup_steps"])
        if not 0.0 <= self.alpha <= 1.0 or self.alpha_warmup < 0:
            raise ValueError(f"momentum.alpha must be in [0, 1] and alpha_warmup_steps >= 0, got {self.alpha}, "
                             f"{self.alpha_warmup}")
        losses = _options(config, "loss", LOSS_DEFAULTS)
        self.label_smoothing, self.floor = float(losses["label_smoothing"]), float(losses["negative_floor"])
        apply = self.model.apply
        self._embed_images = jax.jit(functools.partial(apply, method=_embed_images))
        self._embed_texts = jax.jit(functools.partial(apply, method="encode_text"))
        self._image_tokens = jax.jit(functools.partial(apply, method=_image_tokens))
        self._match = jax.jit(functools.partial(apply, method=_match))
        self._generators: dict[int, generate.Generator] = {}

    # --- training ---------------------------------------------------------------------------

    def init_variables(self, rng, batch):
        text = jnp.asarray(batch["text"])
        return self.model.init({"params": rng}, batch["image"], text, self.mask(text))

    def mask(self, tokens: jax.Array) -> jax.Array:
        return tokens != self.tokenizer.pad_token_id

    def with_first_token(self, tokens: jax.Array, which: str) -> jax.Array:
        """tokens with [CLS] replaced by [ENC] (which="enc", ITM) or [DEC] (which="dec", LM)."""
        return tokens.at[:, 0].set(self.special[which])

    def init_extra_state(self, params, rng):
        return {"momentum_params": momentum_state.ema_copy(momentum_towers(params)),
                "queue": momentum_state.init_queues(rng, self.queue_size, self.model.embed_dim),
                "distill_step": jnp.zeros((), jnp.int32)}

    def loss(self, params, batch, rng):
        raise NotImplementedError("BLIP trains against its momentum model and queues: use train_loss")

    def train_loss(self, params, extra, batch, rng):
        images, text = batch["image"], jnp.asarray(batch["text"])
        mask = self.mask(text)
        ema = momentum_state.ema_update(extra["momentum_params"], momentum_towers(params), self.decay)
        momentum = {**ema, "temp": jax.lax.stop_gradient(params["temp"])}   # setup() reads it; unused here
        zimg_m, ztxt_m = self.model.apply({"params": momentum}, images, text, mask, method=_momentum_embeds)
        zimg_m, ztxt_m = jax.lax.stop_gradient(zimg_m), jax.lax.stop_gradient(ztxt_m)
        queue = extra["queue"]
        alpha = distillation.distill_alpha(extra["distill_step"], self.alpha, self.alpha_warmup)
        dropout_key, negatives_key = jax.random.split(rng)
        out = self.model.apply({"params": params}, images, text, mask, zimg_m, ztxt_m, queue["image"],
                               queue["text"], negatives_key, method=self._online, rngs={"dropout": dropout_key})
        itc, itc_metrics = distillation.itc_distill_loss(out["i2t"], out["t2i"], out["teacher_i2t"],
                                                         out["teacher_t2i"], alpha)
        itm, itm_metrics = matching.itm_loss(out["itm_logits"], matching.itm_weights(out["negatives"]))
        labels = language.causal_lm_labels(language.labels_from_tokens(text, mask))
        lm, lm_metrics = language.token_cross_entropy(out["lm_logits"], labels, self.label_smoothing)
        metrics = {"itc_loss": itc, "itm_loss": itm, "lm_loss": lm, "itm_accuracy": itm_metrics["itm_accuracy"],
                   "lm_token_accuracy": lm_metrics["token_accuracy"], "alpha": alpha,
                   "logit_scale": out["logit_scale"], "i2t_loss": itc_metrics["i2t_loss"],
                   "t2i_loss": itc_metrics["t2i_loss"]}
        new_extra = {"momentum_params": ema, "queue": momentum_state.enqueue_all(queue, image=zimg_m, text=ztxt_m),
                     "distill_step": extra["distill_step"] + 1}
        return itc + itm + lm, (metrics, new_extra)

    def _online(self, model: blip_pretrain.BlipPretrain, images, text, mask, zimg_m, ztxt_m, image_queue,
                text_queue, negatives_key) -> dict:
        """The online model's forward pass: ITC logits, ITM on hard negatives, decoder logits."""
        image_tokens = model.encode_image_tokens(images, train=True)
        zimg, ztxt = model.embed_image(image_tokens), model.encode_text(text, mask, train=True)
        scale = 1.0 / jnp.clip(model.temp, 0.001, 0.5)
        texts_all = jnp.concatenate([ztxt_m, jax.lax.stop_gradient(text_queue)])
        images_all = jnp.concatenate([zimg_m, jax.lax.stop_gradient(image_queue)])
        i2t, t2i = scale * zimg @ texts_all.T, scale * ztxt @ images_all.T
        n = text.shape[0]
        negatives = matching.sample_hard_negatives(negatives_key, i2t[:, :n], t2i[:, :n], floor=self.floor)
        pair_images, (pair_text, pair_mask) = matching.itm_inputs(
            negatives, image_tokens, (self.with_first_token(text, "enc"), mask))
        itm_logits = model.match(pair_text, pair_mask, pair_images, train=True)
        lm_logits = model.decode_text(self.with_first_token(text, "dec"), mask=mask, context=image_tokens,
                                      train=True)["logits"]
        return {"i2t": i2t, "t2i": t2i, "teacher_i2t": scale * zimg_m @ texts_all.T,
                "teacher_t2i": scale * ztxt_m @ images_all.T, "negatives": negatives, "itm_logits": itm_logits,
                "lm_logits": lm_logits, "logit_scale": scale}

    def train_flops_per_example(self, batch_shapes):
        hw, length = tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1]
        online = flops.total(blip_pretrain.forward_flops(self.model, hw, length))
        momentum = flops.total(blip_pretrain.momentum_forward_flops(self.model, hw, length))
        return flops.TRAIN_FACTOR * online + momentum

    def model_description(self, batch):
        text = batch["text"]
        inputs = [base.input_spec(batch["image"]), base.input_spec(text),
                  {"shape": [1, int(text.shape[1])], "dtype": "bool"}]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    # --- predict functions (mmjax.evaluate.runner.PREDICT_FUNCTIONS) ----------------------------

    def embed_images(self, params, images: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC embeddings of the images."""
        return self._embed_images({"params": params}, images)

    def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC embeddings of the unimodal [CLS] of tokenized texts."""
        tokens = jnp.asarray(tokens)
        return self._embed_texts({"params": params}, tokens, self.mask(tokens))

    def image_tokens(self, params, images: jax.Array) -> jax.Array:
        """(B, 1 + patches, width): the image tokens the ITM encoder cross-attends to."""
        return self._image_tokens({"params": params}, images)

    def match_tokens(self, params, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
        """(B,) ITM 'match' logits of (image_tokens i, text i); [CLS] becomes [ENC] as in BLIP."""
        tokens = jnp.asarray(tokens)
        return self._match({"params": params}, image_tokens, self.with_first_token(tokens, "enc"), self.mask(tokens))

    def caption(self, params, images: jax.Array, settings: dict | None = None) -> jax.Array:
        """(B·num_return_sequences, L) int32 caption ids after [DEC] (pad after [SEP]), by greedy,
        beam or nucleus search (settings: GenerationConfig fields; 'key' a jax key for sampling)."""
        settings = dict(settings or {})
        key = settings.pop("key", None)
        if settings.get("do_sample") and key is None:
            key = jax.random.key(0)
        settings.setdefault("max_new_tokens", self.tokenizer.context_length)
        config = generate.GenerationConfig(**{"eos_token_id": self.tokenizer.sep_token_id,
                                              "pad_token_id": self.tokenizer.pad_token_id, **settings})
        total = config.total_length(1)
        if total not in self._generators:
            self._generators[total] = generate.Generator(
                generate.FlaxDecoder(self.model, "decode_caption"), max_length=total)
        context = self.image_tokens(params, images)
        prompt = jnp.full((context.shape[0], 1), self.special["dec"], jnp.int32)
        out = self._generators[total](params, prompt, config, inputs={"context": context}, key=key)
        return out.generated.astype(jnp.int32)

