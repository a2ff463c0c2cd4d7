"""ALBEF pretraining (Li et al. 2021): ITC against momentum encoders and queues, ITM with hard
negatives, MLM with momentum distillation; loss = mlm + itc + itm (official model_pretrain.py).

Each step, as the official code:
1. the momentum model m ← decay·m + (1 − decay)·θ (all parameters; ALBEF keeps copies of the
   encoders and projections only, the copies of itm_head and temp here are never read);
2. ITC: online [CLS] embeddings against the momentum embeddings of the batch plus the other
   modality's queue, targets softened by the momentum model's similarities with weight α
   (distillation.itc_distill_loss); α ramps linearly from 0 over `alpha_warmup_steps` (ALBEF:
   the first epoch);
3. ITM: for every image a negative text, for every text a negative image, drawn ∝ softmax of
   the batch block of the ITC similarities (the whole global batch; ALBEF draws per GPU), then
   the fusion layers and the 2-way head on N positives + 2N negatives;
4. MLM: the `mlm_mask` pp op's masked ids read against the image by the whole text encoder,
   cross-entropy mixed with the momentum model's soft predictions by α;
5. the batch's momentum embeddings enter the queues (FIFO ring buffers).

Train state besides the parameters (mmjax.tasks.base): "ema_params", "queue" (image, text,
pointer) and "distill_step" (the α ramp's step count). Config::

    task = "albef"
    momentum = dict(decay=0.995, queue_size=65536, alpha=0.4, alpha_warmup_steps=STEPS_PER_EPOCH)
    input.pp = "...|tokenize(key='caption', out='text')|mlm_mask(key='text')|keep('image', 'text',
                'mlm_input', 'mlm_labels')"

Differences from the official code: the momentum model runs without dropout; mmjax's MLM masking
never masks [SEP] (ALBEF spares only [PAD] and [CLS]) and draws random replacements from
non-special ids. Predict functions: embed_images, embed_texts (ITC), image_tokens, match_tokens
(ITM re-ranking) and predict_masked (MLM word accuracy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import flops
from mmjax.data import tokenizers
from mmjax.losses import distillation, matching
from mmjax.models import albef
from mmjax.tasks import base, momentum_state

DEFAULTS = {"decay": 0.995, "queue_size": None, "alpha": 0.4, "alpha_warmup_steps": 0}
BATCH_KEYS = ("image", "text", "mlm_input", "mlm_labels")
PAD_ID = 0


class AlbefPretrainTask(base.Task):
    """Trains `mmjax.models.albef.Albef` on batches of "image", "text" and MLM-masked "mlm_input" /
    "mlm_labels" (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        cfg = dict(config.get("momentum") or {})
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"Unknown momentum key(s) {unknown}; known: {sorted(DEFAULTS)}")
        cfg = {**DEFAULTS, **cfg}
        self.decay = momentum_state.check_decay(cfg["decay"])
        self.queue_size = momentum_state.check_queue_size(cfg["queue_size"], int(config.input.batch_size))
        self.alpha, self.alpha_warmup_steps = float(cfg["alpha"]), int(cfg["alpha_warmup_steps"])
        if not 0.0 <= self.alpha <= 1.0 or self.alpha_warmup_steps < 0:
            raise ValueError(f"momentum.alpha must be in [0, 1] and alpha_warmup_steps >= 0; got {self.alpha} and "
                             f"{self.alpha_warmup_steps}")
        self.model = albef.Albef(**config.model.to_dict())
        self.tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        text = albef.text_tower(self.model.text, self.model.dtype)
        if self.tokenizer.vocab_size > text.vocab_size:
            raise ValueError(f"The tokenizer's {self.tokenizer.vocab_size} ids do not fit the text encoder's "
                             f"vocab_size {text.vocab_size}")
        if self.tokenizer.context_length > text.max_len:
            raise ValueError(f"Tokenizer context length {self.tokenizer.context_length} exceeds the text encoder's "
                             f"{text.max_len} positions (max_len)")
        apply = self.model.apply
        self._embed_images = jax.jit(lambda v, images: apply(v, apply(v, images, method="encode_image"),
                                                             method="embed_image"))
        self._embed_texts = jax.jit(lambda v, tokens: apply(
            v, apply(v, tokens, tokens != PAD_ID, method="encode_text"), method="embed_text"))
        self._image_tokens = jax.jit(functools.partial(apply, method="encode_image"))
        self._match = jax.jit(self._match_logits)
        self._predict_masked = jax.jit(lambda v, images, tokens: jnp.argmax(apply(
            v, tokens, tokens != PAD_ID, apply(v, images, method="encode_image"), method="mlm"), axis=-1))

    # --- training ---------------------------------------------------------------------------

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"], batch["text"], batch["text"] != PAD_ID)

    def init_extra_state(self, params, rng):
        return {"ema_params": momentum_state.ema_copy(params),
                "queue": momentum_state.init_queues(rng, self.queue_size, self.model.embed_dim),
                "distill_step": jnp.zeros((), jnp.int32)}

    def loss(self, params, batch, rng):
        raise NotImplementedError("ALBEF trains against its momentum model and queues: use train_loss")

    def train_loss(self, params, extra, batch, rng):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"The ALBEF task needs batch keys {list(BATCH_KEYS)}; missing {missing} (add "
                             "mlm_mask(key='text') to input.pp)")
        ema = momentum_state.ema_update(extra["ema_params"], params, self.decay)
        alpha = distillation.distill_alpha(extra["distill_step"], self.alpha, self.alpha_warmup_steps)
        rngs = jax.random.split(rng, 5)
        online = functools.partial(self._apply, {"params": params}, train=True)
        momentum = functools.partial(self._apply, {"params": ema}, train=False)
        images, text = batch["image"], batch["text"]
        mask = text != PAD_ID

        image_tokens = online("encode_image", images, rng=rngs[0])
        states = online("encode_text", text, mask, rng=rngs[1])
        zimg, ztxt = online("embed_image", image_tokens), online("embed_text", states)
        scale = online("logit_scale")
        image_tokens_m = momentum("encode_image", images)
        zimg_m = momentum("embed_image", image_tokens_m)
        ztxt_m = momentum("embed_text", momentum("encode_text", text, mask))

        queue = extra["queue"]
        texts_all = jnp.concatenate([ztxt_m, queue["text"].astype(ztxt_m.dtype)])
        images_all = jnp.concatenate([zimg_m, queue["image"].astype(zimg_m.dtype)])
        sim_i2t, sim_t2i = scale * zimg @ texts_all.T, scale * ztxt @ images_all.T
        teacher_scale = jax.lax.stop_gradient(scale)
        itc, itc_metrics = distillation.itc_distill_loss(
            sim_i2t, sim_t2i, teacher_scale * zimg_m @ texts_all.T, teacher_scale * ztxt_m @ images_all.T, alpha)

        n = images.shape[0]
        negatives = matching.sample_hard_negatives(rngs[2], sim_i2t[:, :n], sim_t2i[:, :n])
        pair_images, (pair_states, pair_mask) = matching.itm_inputs(negatives, image_tokens, (states, mask))
        fused = online("fuse", pair_states, pair_mask, pair_images, rng=rngs[3])["tokens"]
        itm, itm_metrics = matching.itm_loss(online("itm", fused), matching.itm_weights(negatives))

        mlm_logits = online("mlm", batch["mlm_input"], mask, image_tokens, rng=rngs[4])
        teacher_logits = momentum("mlm", batch["mlm_input"], mask, image_tokens_m)
        mlm, mlm_metrics = distillation.mlm_distill_loss(mlm_logits, teacher_logits, batch["mlm_labels"], alpha)

        metrics = {"itc_loss": itc, "itm_loss": itm, "mlm_loss": mlm, "alpha": alpha, "temp": 1.0 / scale,
                   **itc_metrics, **itm_metrics, "mlm_accuracy": mlm_metrics["token_accuracy"],
                   "itc_i2t_top1": (jnp.argmax(sim_i2t, axis=-1) == jnp.arange(n)).mean()}
        new_extra = {"ema_params": ema, "distill_step": extra["distill_step"] + 1,
                     "queue": momentum_state.enqueue_all(queue, image=zimg_m, text=ztxt_m)}
        return mlm + itc + itm, (metrics, new_extra)

    def _apply(self, variables, method: str, *args, train: bool = False, rng: jax.Array | None = None):
        kwargs = {"train": train} if method in ("encode_image", "encode_text", "fuse", "mlm") else {}
        rngs = {"dropout": rng} if train and rng is not None else {}
        return self.model.apply(variables, *args, method=method, rngs=rngs, **kwargs)

    def model_description(self, batch):
        inputs = [base.input_spec(batch["image"]), base.input_spec(batch["text"])]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def train_flops_per_example(self, batch_shapes):
        """Online: image, text layers, the fusion layers on 3 pairs (ITM) and the whole text encoder
        with its MLM head (forward + backward); momentum: image, text layers, MLM pass (forward)."""
        parts = albef.forward_flops(self.model, tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1])
        pick = lambda prefix: sum(v for k, v in parts.items() if k.startswith(prefix))  # noqa: E731
        vision, text, fusion, head = pick("vision_"), pick("text_"), pick("fusion_"), parts["mlm_head"]
        online = vision + text + 3 * fusion + (text + fusion + head) + parts["heads"]
        momentum = vision + text + (text + fusion + head) + parts["heads"]
        return flops.TRAIN_FACTOR * online + momentum

    # --- predict functions (mmjax.evaluate.runner.PREDICT_FUNCTIONS) --------------------------

    def embed_images(self, params, images: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC image embeddings."""
        return self._embed_images({"params": params}, images)

    def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC text embeddings of token ids (padding id 0)."""
        return self._embed_texts({"params": params}, tokens)

    def image_tokens(self, params, images: jax.Array) -> jax.Array:
        """(B, 1 + patches, width): the image states the fusion layers attend to, once per image."""
        return self._image_tokens({"params": params}, images)

    def match_tokens(self, params, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
        """(B,) ITM 'match' logits of (image_tokens i, text i): ALBEF re-ranks retrieval with these."""
        return self._match({"params": params}, image_tokens, tokens)

    def predict_masked(self, params, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """(B, L) the MLM head's top token at every position of `tokens` (with [MASK]s) read against images."""
        return self._predict_masked({"params": params}, images, tokens)

    def _match_logits(self, variables, image_tokens, tokens):
        mask = tokens != PAD_ID
        states = self.model.apply(variables, tokens, mask, method="encode_text")
        fused = self.model.apply(variables, states, mask, image_tokens, method="fuse")["tokens"]
        return self.model.apply(variables, fused, method="itm")[:, 1]
