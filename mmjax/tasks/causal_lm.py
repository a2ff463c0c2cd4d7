"""Language-model pretraining: a decoder-only LM (mmjax.models.decoder_lm.DecoderLM) trained with the
next-token cross-entropy on tokenized text, every real token after the first scored.

It makes the frozen LM the bridge models plug into when no published one fits (the shapes demos:
experiments/lm/shapes.py writes the LM that BLIP-2 stage 2, MiniGPT-4 and the Perceiver resampler
bridge then keep frozen). Config::

    task = "causal_lm"
    model = dict(kind="llama", width=128, depth=2, num_heads=4, mlp_dim=344, vocab_size=V, max_len=64)
    input = dict(pp="...|tokenize(key='document', out='text')|keep('text')", tokenizer=dict(...))

The tokenizer must pad (the loss mask is `text != pad`) and should start each text with a BOS.
Predict function: `complete(params, tokens)` greedily continues left-aligned prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import flops, generate
from mmjax.losses import language
from mmjax.models import blip2, decoder_lm
from mmjax.tasks import base
from mmjax.tasks import blip2 as blip2_tasks


class CausalLMTask(base.Task):
    """Trains DecoderLM on batches of LM-tokenized "text" (BOS first, right padding)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = decoder_lm.DecoderLM(**config.model.to_dict())
        self.tokenizer = blip2_tasks.tokenizer_for_lm(config)
        vocab = self.model.arch()["vocab_size"]
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"The tokenizer's {self.tokenizer.vocab_size} ids do not fit model.vocab_size {vocab}")

    def mask(self, tokens: jax.Array) -> jax.Array:
        return tokens != self.tokenizer.pad_token_id

    def init_variables(self, rng, batch):
        text = jnp.asarray(batch["text"])
        return self.model.init({"params": rng}, text, self.mask(text))

    def loss(self, params, batch, rng):
        text = jnp.asarray(batch["text"])
        mask = self.mask(text)
        logits = self.model.apply({"params": params}, text, mask, train=True, rngs={"dropout": rng})["logits"]
        labels = language.causal_lm_labels(language.labels_from_tokens(text, mask))
        loss, metrics = language.token_cross_entropy(logits, labels)
        return loss, {"lm_loss": loss, "token_accuracy": metrics["token_accuracy"]}

    def train_flops_per_example(self, batch_shapes):
        parts = blip2.decoder_lm_flops(self.model, batch_shapes["text"][1])
        return flops.TRAIN_FACTOR * flops.total(parts)

    def model_description(self, batch):
        text = batch["text"]
        inputs = [base.input_spec(text), {"shape": [1, int(text.shape[1])], "dtype": "bool"}]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def complete(self, params, tokens: jax.Array, max_new_tokens: int = 16) -> jax.Array:
        """(B, max_new_tokens) greedy continuations of right-padded prompts (BOS first), stopping at
        the tokenizer's end-of-text id."""
        tokens = jnp.asarray(tokens)
        mask = self.mask(tokens)
        config = generate.GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                           eos_token_id=getattr(self.tokenizer, "eot_token_id", None))
        order = jnp.argsort(mask, axis=1, stable=True)          # padding first: left-padded prompts
        prompt, prompt_mask = jnp.take_along_axis(tokens, order, 1), jnp.take_along_axis(mask, order, 1)
        generator = generate.Generator(generate.FlaxDecoder(self.model), config.total_length(tokens.shape[1]))
        return generator(params, prompt, config, prompt_mask=prompt_mask).generated
