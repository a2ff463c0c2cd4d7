"""BLIP's fine-tunes (Li et al. 2022, Sec. 5) on transformers-layout modules (mmjax.models.blip),
so a converted Salesforce/blip-* checkpoint fine-tunes here and exports back with mmjax-convert.

    blip_caption    BlipCaptioner: LM loss with label smoothing 0.1 on the caption tokens after
                    the prompt ("a picture of "; the prompt is not scored), [DEC] as bos;
                    predict `caption` (beam 3, max 20, min 5 as BLIP's COCO evaluation)
    blip_vqa        BlipQuestionAnswering: the answer decoder's LM loss of every answer of a
                    question, weighted (VQA v2's 10 answers, 0.1 each = BLIP's frequency weights);
                    predict `answer` (generated text)
    blip_retrieval  BlipRetrieval: ITC against a momentum model and queues with image-id-aware
                    targets, plus ITM with hard negatives (mmjax/tasks/blip_retrieval_finetune.py)

Config (blip_caption / blip_vqa)::

    model = dict(vision=dict(...), text=dict(...))   # the module's fields (BLIP-base by default)
    caption = dict(prompt="a picture of ", bos_token_id=30522, label_smoothing=0.1,
                   generation=dict(num_beams=3, max_length=20, min_length=5))   # blip_caption
    vqa = dict(bos_token_id=30522, enc_token_id=None, label_smoothing=0.1,
               generation=dict(num_beams=3, max_length=10, min_length=1))      # blip_vqa

The batch holds "image" and the tokenized "text" (captioning: [CLS] caption [SEP], whose [CLS] is
replaced by bos [DEC] after the prompt is inserted), or the tokenized question "text" (as the vqa
evaluator passes it) and "answer_tokens" ((B, L) one answer or (B, K, L) several, [CLS] answer
[SEP]; optional "answer_weights" (B, K), default uniform over the answers given).
The [DEC] bos of BLIP-base (30522) lies past a BERT vocabulary; a small model trained from scratch
gives its text tower one more id than the tokenizer and uses it (`bos_token_id` = tokenizer size).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import flops, generate
from mmjax.data import tokenizers
from mmjax.losses import language
from mmjax.models import bert, blip, vit
from mmjax.tasks import base

CAPTION_DEFAULTS = {"prompt": "a picture of ", "bos_token_id": 30522, "label_smoothing": 0.1,
                    "generation": {"num_beams": 3, "max_length": 20, "min_length": 5}}
VQA_DEFAULTS = {"bos_token_id": 30522, "enc_token_id": None, "label_smoothing": 0.1,
                "generation": {"num_beams": 3, "max_length": 10, "min_length": 1}}


def settings(config: ml_collections.ConfigDict, key: str, defaults: dict) -> dict:
    """config[key] over `defaults`; an unknown key is an error naming the known ones."""
    given = dict(config.get(key) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown {key} key(s) {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **given}
    if "generation" in defaults:
        merged["generation"] = dict(merged["generation"] or {})
    return merged


def text_vocab(model: Any) -> tuple[int, int]:
    """(vocab size, position embeddings) of a BLIP module's text towers."""
    fields = {**blip.TEXT_DEFAULTS, **(model.text or {})}
    return int(fields["vocab_size"]), int(fields.get("max_len", 512))


def check_token(name: str, token_id: int | None, vocab_size: int) -> int | None:
    if token_id is not None and not 0 <= int(token_id) < vocab_size:
        raise ValueError(f"{name}={token_id} is outside the text tower's vocabulary of {vocab_size} ids")
    return None if token_id is None else int(token_id)


def build_tokenizer(config: ml_collections.ConfigDict, model: Any, extra_positions: int = 0):
    """The input tokenizer, checked against the text tower: every id it makes must embed, and its
    texts (plus `extra_positions`, e.g. a prompt) must fit the position embeddings."""
    tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
    vocab, max_len = text_vocab(model)
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but the text tower embeds {vocab} "
                         "(model.text.vocab_size): use the model's own vocabulary file")
    if tokenizer.context_length + extra_positions > max_len:
        raise ValueError(f"Texts of {tokenizer.context_length} tokens (+{extra_positions} prompt) exceed the "
                         f"text tower's {max_len} position embeddings (model.text.max_len)")
    return tokenizer


def image_forward_flops(model: Any, image_hw: tuple[int, int]) -> tuple[dict[str, float], int, int]:
    """(vision tower forward FLOPs of one image by part, its tokens, their width) of a BLIP module."""
    vision = blip.vision_tower(model.vision, model.dtype)
    return vit.forward_flops(vision, image_hw), vit.tokens_seen(vision, image_hw), vision.arch()["width"]


def generation_config(defaults: dict, overrides: dict | None, tokenizer) -> generate.GenerationConfig:
    """GenerationConfig of the task's defaults, then the caller's `overrides`; stops at [SEP]."""
    fields = {"eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id, **defaults,
              **dict(overrides or {})}
    return generate.GenerationConfig(**fields)


def decodable(ids: jax.Array, tokenizer) -> np.ndarray:
    """Generated ids with those past the tokenizer's vocabulary (a [DEC] bos of a model that adds
    it) set to padding, so `tokenizer.decode` reads every row."""
    ids = np.asarray(ids)
    return np.where(ids < tokenizer.vocab_size, ids, tokenizer.pad_token_id).astype(np.int32)


class _Generation:
    """Generators of one module method, one per cache length (each compiles once per shape)."""

    def __init__(self, module: Any, method: str):
        self.decoder = generate.FlaxDecoder(module, method=method)
        self._by_length: dict[int, generate.Generator] = {}

    def __call__(self, params: Any, prompt: jax.Array, config: generate.GenerationConfig,
                 inputs: dict[str, jax.Array]) -> generate.GenerationOutput:
        length = config.total_length(prompt.shape[1])
        if length not in self._by_length:
            self._by_length[length] = generate.Generator(self.decoder, max_length=length)
        return self._by_length[length](params, prompt, config, inputs=inputs)


class BlipCaptionTask(base.Task):
    """BLIP's captioning fine-tune (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = blip.BlipCaptioner(**config.model.to_dict())
        cfg = settings(config, "caption", CAPTION_DEFAULTS)
        vocab, _ = text_vocab(self.model)
        self.bos_token_id = check_token("caption.bos_token_id", cfg["bos_token_id"], vocab)
        self.label_smoothing = float(cfg["label_smoothing"])
        self.prompt = str(cfg["prompt"] or "")
        probe = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        self.prompt_ids = np.asarray(probe.encode(self.prompt) if self.prompt.strip() else [], np.int32)
        self.tokenizer = build_tokenizer(config, self.model, extra_positions=len(self.prompt_ids))
        self.generation = cfg["generation"]
        generation_config(self.generation, None, self.tokenizer)    # invalid defaults fail here
        self._encode = jax.jit(functools.partial(self.model.apply, method="encode_images"))
        self._generate = _Generation(self.model, "decode_text")

    @property
    def prefix_length(self) -> int:
        """Positions before the caption's first scored token: bos and the prompt."""
        return 1 + len(self.prompt_ids)

    def decoder_inputs(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[CLS] caption [SEP] pad ids (B, L) -> ([DEC] prompt caption [SEP] pad, its mask),
        BLIP's decoder input: the prompt and the caption tokenized as one text, [CLS] -> bos."""
        text = jnp.asarray(text)
        if text.ndim != 2 or not jnp.issubdtype(text.dtype, jnp.integer):
            raise ValueError(f"blip_caption expects tokenized captions (batch, length) in 'text', got "
                             f"{text.dtype} {text.shape}")
        head = np.concatenate([[self.bos_token_id], self.prompt_ids]).astype(np.int32)
        head = jnp.broadcast_to(jnp.asarray(head, text.dtype), (text.shape[0], head.size))
        tokens = jnp.concatenate([head, text[:, 1:]], axis=1)
        mask = jnp.concatenate([jnp.ones(head.shape, bool), text[:, 1:] != self.tokenizer.pad_token_id], axis=1)
        return tokens, mask

    def init_variables(self, rng, batch):
        tokens, mask = self.decoder_inputs(batch["text"])
        return self.model.init({"params": rng}, batch["image"], tokens, mask)

    def loss(self, params, batch, rng):
        tokens, mask = self.decoder_inputs(batch["text"])
        out = self.model.apply({"params": params}, batch["image"], tokens, mask, train=True, rngs={"dropout": rng})
        labels = language.causal_lm_labels(language.labels_from_tokens(tokens, mask, self.prefix_length))
        loss, metrics = language.token_cross_entropy(out["logits"], labels, self.label_smoothing)
        return loss, metrics

    def train_flops_per_example(self, batch_shapes):
        """The vision tower and the decoder (bos + prompt + caption, cross-attending to every image
        token, LM head on every position), forward and backward."""
        parts, image_tokens, image_width = image_forward_flops(self.model, tuple(batch_shapes["image"][1:3]))
        decoder = blip.text_tower(self.model.text, self.model.dtype, causal=True, lm_head=True)
        length = batch_shapes["text"][1] - 1 + self.prefix_length
        parts = {**flops.prefixed("vision_", parts),
                 **flops.prefixed("decoder_", bert.forward_flops(decoder, length, image_tokens, image_width))}
        return flops.TRAIN_FACTOR * flops.total(parts)

    def model_description(self, batch):
        tokens, mask = jax.eval_shape(self.decoder_inputs, batch["text"])
        return {"module": self.model, "inputs": [base.input_spec(batch["image"]), base.input_spec(tokens),
                                                 base.input_spec(mask)], "params_key": None}

    def caption(self, params, images: jax.Array, settings: dict | None = None) -> jax.Array:
        """(B, L) int32 caption ids after the prompt (pad after [SEP]), by the task's generation
        settings (BLIP's COCO evaluation: beam 3, max length 20, min length 5, prompt included)
        overridden by `settings` (GenerationConfig fields); read with task.tokenizer.decode."""
        config = generation_config(self.generation, settings, self.tokenizer)
        context = self._encode({"params": params}, images)
        head = np.concatenate([[self.bos_token_id], self.prompt_ids]).astype(np.int32)
        prompt = jnp.asarray(np.broadcast_to(head, (images.shape[0], head.size)))
        out = self._generate(params, prompt, config, {"context": context})
        generated = out.generated
        if config.num_return_sequences > 1:      # the best of each example's returned sequences
            generated = generated[::config.num_return_sequences]
        return jnp.asarray(decodable(generated, self.tokenizer))


class BlipVqaTask(base.Task):
    """BLIP's VQA fine-tune, answers generated as text (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = blip.BlipQuestionAnswering(**config.model.to_dict())
        cfg = settings(config, "vqa", VQA_DEFAULTS)
        vocab, _ = text_vocab(self.model)
        self.bos_token_id = check_token("vqa.bos_token_id", cfg["bos_token_id"], vocab)
        self.enc_token_id = check_token("vqa.enc_token_id", cfg["enc_token_id"], vocab)
        self.label_smoothing = float(cfg["label_smoothing"])
        self.tokenizer = build_tokenizer(config, self.model)
        self.generation = cfg["generation"]
        generation_config(self.generation, None, self.tokenizer)
        self._encode = jax.jit(functools.partial(self.model.apply, method="encode_question"))
        self._generate = _Generation(self.model, "decode_text")

    def question_inputs(self, question: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Question ids and mask; [CLS] -> [ENC] when `vqa.enc_token_id` is set (BLIP's code)."""
        mask = question != self.tokenizer.pad_token_id
        if self.enc_token_id is not None:
            question = question.at[:, 0].set(self.enc_token_id)
        return question, mask

    def answer_inputs(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(answers (B, K, L) with bos for [CLS], their mask, weights (B, K))."""
        answers = jnp.asarray(batch["answer_tokens"])
        if answers.ndim == 2:
            answers = answers[:, None]
        if answers.ndim != 3:
            raise ValueError(f"'answer_tokens' must be tokenized (B, L) or (B, K, L), got shape {answers.shape}")
        mask = answers != self.tokenizer.pad_token_id
        # An answer slot holds a word: "" padding (vqa_folder pads answer lists) tokenizes to [CLS] [SEP].
        special = (answers == getattr(self.tokenizer, "cls_token_id", -1)) | (answers == self.tokenizer.sep_token_id)
        given = (mask & ~special).any(axis=-1)
        weights = batch.get("answer_weights")
        if weights is None:
            weights = given / jnp.maximum(given.sum(axis=-1, keepdims=True), 1)
        elif weights.shape != given.shape:
            raise ValueError(f"answer_weights {weights.shape} must be (B, K) = {given.shape}")
        answers = jnp.where(given[..., None], answers.at[..., 0].set(self.bos_token_id), answers)
        return answers, mask, jnp.where(given, weights, 0.0).astype(jnp.float32)

    def init_variables(self, rng, batch):
        question, qmask = self.question_inputs(batch["text"])
        answers, amask, _ = self.answer_inputs(batch)
        return self.model.init({"params": rng}, batch["image"], question, qmask, answers[:, 0], amask[:, 0])

    def loss(self, params, batch, rng):
        """Σ_k weight_k · (token CE summed over answer k) per question, averaged over questions:
        BLIP_VQA's `(weights * loss).sum() / batch`, with one question encoding per question."""
        question, qmask = self.question_inputs(batch["text"])
        answers, amask, weights = self.answer_inputs(batch)
        b, k, length = answers.shape
        states = self.model.apply({"params": params}, batch["image"], question, qmask, train=True,
                                  rngs={"dropout": rng}, method="encode_question")
        repeat = lambda x: jnp.repeat(x, k, axis=0)
        flat, flat_mask = answers.reshape(b * k, length), amask.reshape(b * k, length)
        logits = self.model.apply({"params": params}, flat, mask=flat_mask, context=repeat(states),
                                  context_mask=repeat(qmask), train=True, rngs={"dropout": rng},
                                  method="decode_text")["logits"]
        labels = language.causal_lm_labels(language.labels_from_tokens(flat, flat_mask, 1))
        per_answer = language.per_token_cross_entropy(logits, labels, self.label_smoothing).sum(-1).reshape(b, k)
        loss = (per_answer * weights).sum() / b
        scored = (labels != language.IGNORE_ID).reshape(b, k, length)
        correct = ((jnp.argmax(logits, -1).reshape(b, k, length) == labels.reshape(b, k, length)) | ~scored)
        exact = (correct.all(-1) * weights).sum() / jnp.maximum(weights.sum(), 1e-9)
        return loss, {"answer_exact_match": exact}

    def train_flops_per_example(self, batch_shapes):
        """The vision tower, the question encoder (cross-attending to the image) and the answer
        decoder on each of the K answer slots (cross-attending to the question), forward and backward;
        padded answer slots are computed too, so they count."""
        parts, image_tokens, image_width = image_forward_flops(self.model, tuple(batch_shapes["image"][1:3]))
        answers = tuple(batch_shapes["answer_tokens"])
        slots, answer_length = (1, answers[1]) if len(answers) == 2 else answers[1:3]
        question_length = batch_shapes["text"][1]
        encoder = blip.text_tower(self.model.text, self.model.dtype, causal=False, lm_head=False)
        decoder = blip.text_tower(self.model.text, self.model.dtype, causal=True, lm_head=True)
        decoded = bert.forward_flops(decoder, answer_length, question_length, encoder.arch()["width"])
        parts = {**flops.prefixed("vision_", parts),
                 **flops.prefixed("encoder_", bert.forward_flops(encoder, question_length, image_tokens, image_width)),
                 **flops.prefixed("decoder_", {k: slots * v for k, v in decoded.items()})}
        return flops.TRAIN_FACTOR * flops.total(parts)

    def model_description(self, batch):
        answers = batch["answer_tokens"]
        if len(answers.shape) == 3:      # the module decodes one answer per question
            answers = jax.ShapeDtypeStruct((answers.shape[0], answers.shape[2]), answers.dtype)
        inputs = [base.input_spec(batch["image"]), base.input_spec(batch["text"]),
                  base.input_spec(batch["text"], bool), base.input_spec(answers)]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def answer(self, params, images: jax.Array, tokens: jax.Array) -> list[str]:
        """The generated answer to each tokenized question (the decoder attends to the question's
        real tokens only, as BLIP's code; transformers also attends to its padding)."""
        question, qmask = self.question_inputs(jnp.asarray(tokens))
        states = self._encode({"params": params}, images, question, qmask)
        config = generation_config(self.generation, None, self.tokenizer)
        prompt = jnp.full((images.shape[0], 1), self.bos_token_id, jnp.int32)
        out = self._generate(params, prompt, config, {"context": states, "context_mask": qmask})
        generated = out.generated[::config.num_return_sequences]
        return [text.strip() for text in self.tokenizer.decode(decodable(generated, self.tokenizer))]

__all__ = ["BlipCaptionTask", "BlipVqaTask"]
