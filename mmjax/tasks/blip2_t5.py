"""BLIP-2 stage 2 with Flan-T5 ("blip2_stage2_t5"; Li et al. 2023, Sec. 3.3; mmjax.models.blip2_t5.Blip2T5).

Prefix language modeling: each caption is split into two parts; the prefix follows the 32 projected
queries into the T5 encoder, the suffix is the decoder's target (T5 cross-entropy, padding not
scored). LAVIS's blip2_t5.py takes the two parts ready-made (samples["text_input"] /
["text_output"], each tokenized with its own `</s>`) and its released code has no stage-2 split;
the paper gives no rule either. Here the split is random: per example, from the step's rng, the
prefix keeps the first k words, k uniform in {0, ..., n - 1} for a caption of n words (tokens before
`</s>`), so the suffix always holds a word. Random rather than a fixed rule because both uses the
model is evaluated in are then trained: k = 0 is captioning exactly as `caption` runs it (the
encoder reads the queries and `</s>` alone, LAVIS's empty prompt), k > 0 continues a given text
(prompted generation). `loss.split="none"` keeps k = 0 (the whole caption the target: LAVIS's
captioning fine-tune with an empty prompt).

Batches: "image" and the caption as T5-tokenized "text" (words, `</s>`, right padding with 0). A
tokenizer that writes a start token first (the shapes word tokenizer standing in for T5's
SentencePiece) has it dropped: the rows are read from where an empty text's `</s>` sits. Vision and
T5 are frozen by the recipe (`optimizer.freeze`). Config::

    task = "blip2_stage2_t5"
    model = dict(vision=dict(...), qformer=dict(...), lm=dict(variant="flan-t5-xl"))
    loss = dict(split="random")     # or "none"

Predict functions: `caption` (greedy / beam search after the image and `</s>`) and `answer` (zero-shot
VQA: greedy text after the image and the tokenized "Question: {} Answer:" prompt the eval pp writes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import flops, generate
from mmjax.models import blip2_t5
from mmjax.tasks import base, blip_finetune
from mmjax.tasks.blip2 import (
    ANSWER_TOKENS,
    STAGE2_MODEL_KEYS,
    LMBridgeTask,
    _options,
    check_vocab,
    frozen_towers,
    model_fields,
)

LOSS = {"split": "random"}
SPLITS = ("random", "none")


def split_points(key: jax.Array, num_words: jax.Array) -> jax.Array:
    """(B,) int32 prefix lengths k, uniform in {0, ..., n - 1} per example (0 for an empty caption)."""
    return jnp.floor(jax.random.uniform(key, num_words.shape) * jnp.maximum(num_words, 1)).astype(jnp.int32)


def prefix_split(words: jax.Array, mask: jax.Array, k: jax.Array, eos: int, pad: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(prefix, prefix_mask, suffix, suffix_mask), each (B, L) like `words` (T5 rows: words, `</s>`,
    padding; mask True at real tokens): the prefix is the first k[b] words and `</s>`, the suffix the
    rest of the row (its words and its `</s>`) moved to the start, as T5's tokenizer writes both parts."""
    positions = jnp.arange(words.shape[1])[None, :]
    k = k[:, None]
    prefix = jnp.where(positions < k, words, jnp.where(positions == k, eos, pad))
    moved = jnp.take_along_axis(words, jnp.minimum(positions + k, words.shape[1] - 1), axis=1)
    suffix_mask = jnp.take_along_axis(mask, jnp.minimum(positions + k, words.shape[1] - 1), axis=1)
    suffix_mask &= positions + k < words.shape[1]
    return prefix.astype(words.dtype), positions <= k, jnp.where(suffix_mask, moved, pad), suffix_mask


class Blip2Stage2T5Task(LMBridgeTask):
    """Trains Blip2T5 with the prefix LM loss on batches of "image" and T5-tokenized "text" (see above)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = blip2_t5.Blip2T5(**model_fields(config, STAGE2_MODEL_KEYS))
        check_vocab(self.tokenizer, self.model)
        self.split = _options(config, LOSS)["split"]
        if self.split not in SPLITS:
            raise ValueError(f"loss.split must be one of {SPLITS}, got {self.split!r}")
        self.eos = getattr(self.tokenizer, "eot_token_id", None)
        if self.eos is None:
            raise ValueError(f"input.tokenizer {config.input.tokenizer.get('name')!r} has no end-of-text id "
                             f"(T5's </s>)")
        empty = np.asarray(self.tokenizer([""]))[0]
        self.lead = int(np.argmax(empty == self.eos))     # tokens the tokenizer writes before the text (a start token)
        if empty[self.lead] != self.eos:
            raise ValueError("input.tokenizer writes no end-of-text after an empty text: T5's rows end with </s>")

    def words(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The T5 rows of `text` (a tokenizer's start token dropped) and their mask."""
        words = jnp.asarray(text)[:, self.lead:]
        return words, self.mask(words)

    def split_text(self, text: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(prefix, prefix_mask, targets, target_mask) of a batch's captions (see the module docstring)."""
        words, mask = self.words(text)
        num_words = (mask & (words != self.eos)).sum(axis=1)
        k = split_points(key, num_words) if self.split == "random" else jnp.zeros_like(num_words)
        return prefix_split(words, mask, k, self.eos, self.tokenizer.pad_token_id)

    def init_variables(self, rng, batch):
        prefix, prefix_mask, targets, target_mask = self.split_text(batch["text"], jax.random.key(0))
        return self.model.init({"params": rng}, batch["image"], prefix, prefix_mask,
                               blip2_t5.shift_right(targets), target_mask)

    def loss(self, params, batch, rng):
        split_key, dropout_key = jax.random.split(rng)
        prefix, prefix_mask, targets, target_mask = self.split_text(batch["text"], split_key)
        out = self.model.apply({"params": params}, batch["image"], prefix, prefix_mask,
                               blip2_t5.shift_right(targets), target_mask, train=True, rngs={"dropout": dropout_key})
        loss, metrics = blip2_t5.t5_lm_loss(out["logits"], targets, target_mask)
        return loss, {"lm_loss": loss, "token_accuracy": metrics["token_accuracy"],
                      "prefix_tokens": prefix_mask.sum(axis=1).mean().astype(jnp.float32)}

    def train_flops_per_example(self, batch_shapes):
        hw, length = tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1] - self.lead
        frozen = frozen_towers(self, batch_shapes)
        return flops.total(blip2_t5.stage2_train_flops(self.model, hw, length, length, frozen["vision_model"],
                                                       frozen["language_model"]))

    def model_description(self, batch):
        length = int(batch["text"].shape[1]) - self.lead
        inputs = [base.input_spec(batch["image"]), {"shape": [1, length], "dtype": "int32"},
                  {"shape": [1, length], "dtype": "bool"}, {"shape": [1, length], "dtype": "int32"}]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def _generator(self, total: int) -> generate.Generator:
        if total not in self._generators:
            self._generators[total] = blip2_t5.language_generator(self.model, total)
        return self._generators[total]

    def _generate(self, params, images, prompt, prompt_mask, settings: dict) -> jax.Array:
        config = self._generation_config(settings)
        out = blip2_t5.generate_text(self.model, {"params": params}, images, jnp.asarray(prompt), config,
                                     prompt_mask=jnp.asarray(prompt_mask),
                                     generator=self._generator(config.total_length(1)))
        return out.generated.astype(jnp.int32)

    # --- predict functions (mmjax.evaluate.runner.PREDICT_FUNCTIONS) ----------------------------

    def caption(self, params, images: jax.Array, settings: dict | None = None) -> jax.Array:
        """(B·num_return_sequences, L) int32 ids the decoder writes after the image and `</s>` (the
        empty prompt; settings: GenerationConfig fields; greedy by default)."""
        settings = dict(settings or {})
        settings.setdefault("max_new_tokens", self.tokenizer.context_length)
        prompt = np.full((images.shape[0], 1), self.eos, np.int32)
        return self._generate(params, images, prompt, np.ones(prompt.shape, bool), settings)

    def answer(self, params, images: jax.Array, tokens: jax.Array) -> list[str]:
        """Zero-shot VQA (the `vqa` evaluator's contract): the greedy text after the image and each
        tokenized prompt ("Question: {} Answer:" from the eval pp; words then </s>, right-padded, as
        LAVIS's T5 prompts: the encoder reads both ends, so no re-alignment)."""
        words, mask = self.words(tokens)
        out = self._generate(params, images, words, mask, {"max_new_tokens": ANSWER_TOKENS})
        rows = blip_finetune.decodable(out, self.tokenizer)
        return [self.tokenizer.decode(row).strip() for row in rows]
