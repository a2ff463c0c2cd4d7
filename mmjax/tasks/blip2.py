"""BLIP-2 pretraining (Li et al. 2023, Sec. 3.2-3.3; LAVIS blip2_qformer.py, blip2_opt.py).

Stage 1 ("blip2_stage1", mmjax.models.blip2.Blip2Pretrain), the Q-Former against a frozen image
encoder, loss = itc + itm + itg as LAVIS:
* ITC: each image's 32 normalised query embeddings against each text's [CLS] embedding, the best
  query's similarity over the temperature (learned, clipped to [0.001, 0.5]), cross-entropy both
  ways over the global batch with label smoothing 0.1 (LAVIS's current code); no momentum model,
  no queue.
* ITM: queries and text share a bidirectional self-attention; N positives and 2N hard negatives
  drawn over the global batch ∝ softmax of the ITC similarities, own pair excluded
  (mmjax.losses.matching; LAVIS's current blip2_qformer.py sets the own pair to -10000 before the
  softmax and adds no floor: `loss.negative_floor` 0; earlier versions added 1e-4, set it to match
  those); the 2-way head averaged over the query outputs.
* ITG: [CLS] replaced by [DEC] (the tokenizer's vocabulary + 1), queries and text under the
  multimodal causal mask, BERT's LM head tied to the word embeddings, label smoothing 0.1.
The image encoder is frozen by the recipe (`optimizer.freeze`), not here.

Stage 2 ("blip2_stage2", mmjax.models.blip2.Blip2LM): the Q-Former's projected queries are a soft
prompt of a decoder LM (OPT); the loss is the LM's next-token cross-entropy on the text only
(`blip2.text_lm_loss`: neither the queries nor the first `loss.prompt_length` tokens, the BOS, are
scored). Vision and LM are frozen by the recipe. Config::

    task = "blip2_stage1"   # or "blip2_stage2"
    model = dict(vision=dict(...), qformer=dict(...), vocab_size=V + 1, embed_dim=256)  # stage 1
    model = dict(vision=dict(...), qformer=dict(...), lm=dict(variant="opt-2.7b"))      # stage 2
    loss = dict(itc_label_smoothing=0.1, lm_label_smoothing=0.1, negative_floor=0.0)    # stage 1
    loss = dict(prompt_length=1)                                                        # stage 2
    caption = dict(prompt="a photo of")         # stage 2: words after the BOS when captioning (optional)

Predict functions: stage 1 has `embed_images` (B, Q, E: one ITC embedding per query; the retrieval
evaluators score a text by the best query, as the paper), `embed_texts`, `image_tokens` and
`match_tokens` (ITM scores): the `retrieval` and `itm_retrieval` (ITM re-ranking) evaluators.
Stage 2 has `caption` (greedy / beam search after the soft prompt and the BOS) and `answer` (zero-shot
VQA: greedy text after the soft prompt and a "Question: {} Answer:" prompt the eval pp writes).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import flops, generate, optim
from mmjax.data import tokenizers
from mmjax.losses import language, matching
from mmjax.models import blip2
from mmjax.tasks import base, blip_finetune

STAGE1_MODEL_KEYS = ("vision", "qformer", "vocab_size", "max_len", "embed_dim", "temperature_init", "dtype")
STAGE2_MODEL_KEYS = ("vision", "qformer", "lm", "dtype")
STAGE1_LOSS = {"itc_label_smoothing": 0.1, "lm_label_smoothing": 0.1, "negative_floor": 0.0}
STAGE2_LOSS = {"prompt_length": 1}
ANSWER_TOKENS = 10        # LAVIS's zero-shot VQA max_len
ADDED_TOKENS = 1          # LAVIS adds [DEC] (the BOS of ITG) to bert-base-uncased's vocabulary


def checked_keys(given: dict, known, what: str) -> dict:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"Unknown {what} key(s) {unknown}; known: {sorted(known)}")
    return given


def model_fields(config: ml_collections.ConfigDict, known) -> dict:
    fields = checked_keys(config.model.to_dict(), known, "model")
    if "qformer" in fields:
        fields["qformer_fields"] = fields.pop("qformer")
    return fields


def _options(config: ml_collections.ConfigDict, defaults: dict) -> dict:
    return {**defaults, **checked_keys(dict(config.get("loss") or {}), defaults, "loss")}


def frozen_towers(task: base.Task, batch_shapes: dict) -> dict[str, bool]:
    """Which top-level parameter trees `optimizer.freeze` mostly freezes (a frozen tower with a
    trainable final norm, as LAVIS's ln_vision, counts as frozen): their FLOPs are forward only."""
    batch = {"image": jax.ShapeDtypeStruct(tuple(batch_shapes["image"]), jnp.float32),
             "text": jax.ShapeDtypeStruct(tuple(batch_shapes["text"]), jnp.int32)}
    params = jax.eval_shape(lambda b: nn.meta.unbox(task.init_variables(jax.random.key(0), b)), batch)["params"]
    mask = optim.trainable_mask(task.config.get("optimizer") or {}, params)
    if mask is None:
        return dict.fromkeys(params, False)
    sizes = lambda tree, keep: sum(np.prod(p.shape) for p, t in zip(  # noqa: E731
        jax.tree.leaves(params[tree]), jax.tree.leaves(mask[tree])) if keep(t))
    return {name: sizes(name, lambda t: not t) > sizes(name, bool) for name in params}


def tokenizer_for_lm(config: ml_collections.ConfigDict):
    """`input.tokenizer`, which must pad (the LM tasks' text masks are `tokens != pad`)."""
    tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(f"input.tokenizer {config.input.tokenizer.get('name')!r} has no pad_token_id")
    return tokenizer


def check_vocab(tokenizer, model: blip2.Blip2LM) -> None:
    vocab = model.language_arch()["vocab_size"]
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"The tokenizer's {tokenizer.vocab_size} ids do not fit the LM's vocab_size {vocab}")


def itc_loss(sim_i2t: jax.Array, label_smoothing: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BLIP-2's ITC on (images, texts) logits of the global batch (pair i is (image i, text i)):
    the mean of the image->text and text->image cross-entropies, labels smoothed as torch's."""
    n = sim_i2t.shape[0]
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.arange(n), n), label_smoothing)
    i2t = optax.softmax_cross_entropy(sim_i2t, targets).mean()
    t2i = optax.softmax_cross_entropy(sim_i2t.T, targets).mean()
    return (i2t + t2i) / 2, {"i2t_loss": i2t, "t2i_loss": t2i}


def _image_tokens(model: blip2.Blip2Pretrain, images):
    return model.encode_image(images)


def _embed_images(model: blip2.Blip2Pretrain, images):
    return model.embed_image(model.encode_image(images))


def _embed_texts(model: blip2.Blip2Pretrain, tokens, mask):
    return model.embed_text(tokens, mask)


def _match(model: blip2.Blip2Pretrain, image_tokens, tokens, mask):
    return model.match(tokens, mask, image_tokens)[:, 1]


class Blip2Stage1Task(base.Task):
    """Trains Blip2Pretrain on batches of "image" and tokenized "text" ([CLS] first; see above)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = blip2.Blip2Pretrain(**model_fields(config, STAGE1_MODEL_KEYS))
        self.tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        for attr in ("cls_token_id", "pad_token_id"):
            if getattr(self.tokenizer, attr, None) is None:
                raise ValueError(f"BLIP-2 stage 1 needs a BERT-style tokenizer with [CLS] and [PAD] (e.g. "
                                 f"'wordpiece'); input.tokenizer {config.input.tokenizer.get('name')!r} has no {attr}")
        if self.model.vocab_size != self.tokenizer.vocab_size + ADDED_TOKENS:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} must be the tokenizer's vocabulary "
                             f"{self.tokenizer.vocab_size} + 1 (LAVIS's [DEC]): set it to "
                             f"{self.tokenizer.vocab_size + ADDED_TOKENS}")
        if self.tokenizer.context_length > self.model.max_len:
            raise ValueError(f"Tokenizer context_length {self.tokenizer.context_length} exceeds the Q-Former's "
                             f"{self.model.max_len} text positions (model.max_len)")
        self.dec_token_id = self.tokenizer.vocab_size
        losses = _options(config, STAGE1_LOSS)
        self.itc_smoothing = float(losses["itc_label_smoothing"])
        self.lm_smoothing = float(losses["lm_label_smoothing"])
        self.floor = float(losses["negative_floor"])
        apply = self.model.apply
        self._image_tokens = jax.jit(functools.partial(apply, method=_image_tokens))
        self._match = jax.jit(functools.partial(apply, method=_match))
        self._embed_images = jax.jit(functools.partial(apply, method=_embed_images))
        self._embed_texts = jax.jit(functools.partial(apply, method=_embed_texts))

    def mask(self, tokens: jax.Array) -> jax.Array:
        return tokens != self.tokenizer.pad_token_id

    def init_variables(self, rng, batch):
        text = jnp.asarray(batch["text"])
        return self.model.init({"params": rng}, batch["image"], text, self.mask(text))

    def loss(self, params, batch, rng):
        text = jnp.asarray(batch["text"])
        dropout_key, negatives_key = jax.random.split(rng)
        out = self.model.apply({"params": params}, batch["image"], text, self.mask(text), negatives_key,
                               method=self.forward, rngs={"dropout": dropout_key})
        itc, itc_metrics = itc_loss(out["sim_i2t"], self.itc_smoothing)
        itm, itm_metrics = matching.itm_loss(out["itm_logits"], matching.itm_weights(out["negatives"]))
        labels = language.causal_lm_labels(language.labels_from_tokens(text, self.mask(text)))
        itg, itg_metrics = language.token_cross_entropy(out["lm_logits"], labels, self.lm_smoothing)
        metrics = {"itc_loss": itc, "itm_loss": itm, "itg_loss": itg, **itc_metrics,
                   "itm_accuracy": itm_metrics["itm_accuracy"], "itg_token_accuracy": itg_metrics["token_accuracy"],
                   "temperature": out["temperature"]}
        return itc + itm + itg, metrics

    def forward(self, model: blip2.Blip2Pretrain, images, text, mask, negatives_key) -> dict:
        """The three objectives' forward pass (the image encoded once): ITC logits, ITM logits on
        the positives and hard negatives, ITG logits."""
        image_tokens = model.encode_image(images, train=True)
        temperature = model.temperature()
        sim_i2t = blip2.itc_scores(model.embed_image(image_tokens, train=True),
                                   model.embed_text(text, mask, train=True)) / temperature
        negatives = matching.sample_hard_negatives(negatives_key, sim_i2t, sim_i2t.T, floor=self.floor)
        pair_images, (pair_text, pair_mask) = matching.itm_inputs(negatives, image_tokens, (text, mask))
        itm_logits = model.match(pair_text, pair_mask, pair_images, train=True)
        lm_logits = model.generate_logits(text.at[:, 0].set(self.dec_token_id), mask, image_tokens, train=True)
        return {"sim_i2t": sim_i2t, "negatives": negatives, "itm_logits": itm_logits, "lm_logits": lm_logits,
                "temperature": temperature}

    def train_flops_per_example(self, batch_shapes):
        hw, length = tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1]
        frozen = frozen_towers(self, batch_shapes)
        return flops.total(blip2.stage1_train_flops(self.model, hw, length, frozen["vision_model"]))

    def model_description(self, batch):
        text = batch["text"]
        inputs = [base.input_spec(batch["image"]), base.input_spec(text),
                  {"shape": [1, int(text.shape[1])], "dtype": "bool"}]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    # --- predict functions (mmjax.evaluate.runner.PREDICT_FUNCTIONS) ----------------------------

    def embed_images(self, params, images: jax.Array) -> jax.Array:
        """(B, Q, embed_dim): one normalised ITC embedding per query; the retrieval evaluators score a
        text by the best query (mmjax.evaluate.retrieval.similarities)."""
        return self._embed_images({"params": params}, images)

    def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
        """(B, embed_dim): the normalised ITC embedding of each text's [CLS]."""
        tokens = jnp.asarray(tokens)
        return self._embed_texts({"params": params}, tokens, self.mask(tokens))

    def image_tokens(self, params, images: jax.Array) -> jax.Array:
        """(B, 1 + patches, vision width): the frozen encoder's tokens the queries cross-attend to."""
        return self._image_tokens({"params": params}, images)

    def match_tokens(self, params, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
        """(B,) ITM 'match' logits of (image_tokens i, text i)."""
        tokens = jnp.asarray(tokens)
        return self._match({"params": params}, image_tokens, tokens, self.mask(tokens))


def prompt_token_mask(tokens: np.ndarray, tokenizer) -> np.ndarray:
    """(B, L) bool: the real tokens of right-padded prompts, less a closing end-of-text id that a
    tokenizer which always appends one (the shapes word tokenizer) put after the prompt: the
    answer must follow "Answer:" itself. A first token (OPT's BOS is its EOS too) is kept."""
    mask = tokens != tokenizer.pad_token_id
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is None:
        return mask
    last = mask.sum(axis=1) - 1
    rows = np.arange(len(tokens))
    closing = (last > 0) & (tokens[rows, np.maximum(last, 0)] == eot)
    mask[rows[closing], last[closing]] = False
    return mask


class LMBridgeTask(base.Task):
    """What the tasks that train a bridge into a decoder LM share (BLIP-2 stage 2, MiniGPT-4): the LM's
    tokenizer and text masks, the training FLOPs with frozen towers forward only, the model
    description, and the generation settings and compiled generators. A subclass sets `self.model`
    (a Blip2LM) after calling __init__."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.tokenizer = tokenizer_for_lm(config)
        self._generators: dict[int, generate.Generator] = {}

    @property
    def bos_token_id(self) -> int | None:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return getattr(self.tokenizer, "sot_token_id", None) if bos is None else bos

    def mask(self, tokens: jax.Array) -> jax.Array:
        return tokens != self.tokenizer.pad_token_id

    def train_flops_per_example(self, batch_shapes):
        return self._train_flops(batch_shapes, other_tokens=0)

    def _train_flops(self, batch_shapes, other_tokens: int) -> float:
        """`other_tokens`: LM positions besides the queries and the text (MiniGPT-4's BOS and prompt)."""
        hw, length = tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1] + other_tokens
        frozen = frozen_towers(self, batch_shapes)
        return flops.total(blip2.stage2_train_flops(self.model, hw, length, frozen["vision_model"],
                                                    frozen["language_model"], frozen["qformer"]))

    def model_description(self, batch):
        text = batch["text"]
        inputs = [base.input_spec(batch["image"]), base.input_spec(text),
                  {"shape": [1, int(text.shape[1])], "dtype": "bool"}]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def _generation_config(self, settings: dict) -> generate.GenerationConfig:
        eos = getattr(self.tokenizer, "eot_token_id", None)
        return generate.GenerationConfig(**{"eos_token_id": eos, "pad_token_id": self.tokenizer.pad_token_id,
                                            **settings})

    def _generator(self, total: int) -> generate.Generator:
        """The LM's compiled generator for `total` prompt + new tokens (one per length)."""
        if total not in self._generators:
            self._generators[total] = blip2.language_generator(self.model, total)
        return self._generators[total]


class Blip2Stage2Task(LMBridgeTask):
    """Trains Blip2LM on batches of "image" and LM-tokenized "text" (BOS first, right padding)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = self.build_model(config)
        check_vocab(self.tokenizer, self.model)
        self.caption_prompt = str(checked_keys(dict(config.get("caption") or {}), ("prompt",), "caption")
                                  .get("prompt") or "")
        self.prompt_length = int(_options(config, STAGE2_LOSS)["prompt_length"])
        if self.prompt_length < 0:
            raise ValueError(f"loss.prompt_length must be >= 0, got {self.prompt_length}")

    def build_model(self, config: ml_collections.ConfigDict):
        """The bridge model (a subclass swaps the Q-Former for another bridge)."""
        return blip2.Blip2LM(**model_fields(config, STAGE2_MODEL_KEYS))

    def init_variables(self, rng, batch):
        text = jnp.asarray(batch["text"])
        return self.model.init({"params": rng}, batch["image"], text, self.mask(text))

    def loss(self, params, batch, rng):
        text = jnp.asarray(batch["text"])
        mask = self.mask(text)
        out = self.model.apply({"params": params}, batch["image"], text, mask, train=True, rngs={"dropout": rng})
        loss, metrics = blip2.text_lm_loss(out["logits"], text, mask, self.prompt_length)
        return loss, {"lm_loss": loss, "token_accuracy": metrics["token_accuracy"]}

    def answer(self, params, images: jax.Array, tokens: jax.Array) -> list[str]:
        """Zero-shot VQA (the `vqa` evaluator's contract): the greedy text after the soft prompt and
        each tokenized prompt, BOS first, right-padded as the pipeline writes it; the eval pp makes
        the prompt (`tokenize(key='question', prefix='Question: ', suffix=' Answer:')`, the paper's). A
    tokenizer's end-of-text after the prompt is not part of it (see `prompt_token_mask`)."""
        tokens = np.asarray(tokens)
        mask = prompt_token_mask(tokens, self.tokenizer)
        order = np.argsort(mask, axis=1, kind="stable")        # padding first: the prompts left-padded
        prompt, prompt_mask = np.take_along_axis(tokens, order, 1), np.take_along_axis(mask, order, 1)
        config = self._generation_config({"max_new_tokens": ANSWER_TOKENS})
        out = blip2.generate_text(self.model, {"params": params}, images, jnp.asarray(prompt), config,
                                  prompt_mask=jnp.asarray(prompt_mask),
                                  generator=self._generator(config.total_length(prompt.shape[1])))
        rows = blip_finetune.decodable(out.generated, self.tokenizer)
        return [self.tokenizer.decode(row).strip() for row in rows]

    def caption(self, params, images: jax.Array, settings: dict | None = None) -> jax.Array:
        """(B·num_return_sequences, L) int32 ids generated after the soft prompt, the BOS and the
        words of `caption.prompt` (LAVIS's captioning prompt, e.g. "a photo of"; none by default),
        without them (settings: GenerationConfig fields; greedy by default)."""
        settings = dict(settings or {})
        settings.setdefault("max_new_tokens", self.tokenizer.context_length)
        config = self._generation_config(settings)
        ids = [self.bos_token_id, *self.tokenizer.encode(self.caption_prompt)] if self.caption_prompt else [
            self.bos_token_id]
        prompt = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (images.shape[0], len(ids)))
        out = blip2.generate_text(self.model, {"params": params}, images, prompt, config,
                                  generator=self._generator(config.total_length(len(ids))))
        return out.generated.astype(jnp.int32)
