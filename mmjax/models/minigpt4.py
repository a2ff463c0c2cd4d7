"""MiniGPT-4 (Zhu et al. 2023): BLIP-2's frozen EVA ViT-g and Q-Former, one trainable linear layer
(`language_projection`, the official `llama_proj`), and a frozen Vicuna that reads the 32 projected
queries inside a text prompt.

The LM's input is [BOS, embed(before), image queries, embed(after), embed(text)]: `before` / `after`
are the prompt's two sides of "<ImageHere>" (stage 2's "###Human: <Img>" and "</Img> Describe this
image in detail. ###Assistant: "; stage 1 has no prompt, so both are empty), and `text` is what the
model is trained to write (the caption followed by the end symbol, "###" in stage 2). Segments may be
padded anywhere (their masks say where); positions count real tokens only, so padding changes
nothing. This is the official MiniGPT-4's `prompt_wrap` + forward, with the LLaMA of
mmjax.models.decoder_lm.

Outputs: "logits" (B, P + T, vocab) over the whole sequence (P = 1 + before + queries + after;
`lm_loss` scores the text alone), "prompt_embeds" (B, Q, lm width). `chat` / `image_prefix` serve
generation: the BOS, `before` and the image are the soft prefix, `after` the token prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import generate
from mmjax.losses import language
from mmjax.models import blip2

IMAGE_PLACEHOLDER = "<ImageHere>"
STAGE2_TEMPLATE = "###Human: {} ###Assistant: "
END_SYMBOL = "###"


def split_prompt(prompt: str) -> tuple[str, str]:
    """The text before and after the image of a MiniGPT-4 prompt (exactly one "<ImageHere>")."""
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"A MiniGPT-4 prompt holds {IMAGE_PLACEHOLDER} exactly once, got {prompt!r}")
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    return before, after


def _segment(tokens: jax.Array | None, mask: jax.Array | None, batch: int) -> tuple[jax.Array, jax.Array]:
    if tokens is None:
        return jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), bool)
    tokens = jnp.broadcast_to(jnp.asarray(tokens), (batch, tokens.shape[-1]))
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), tokens.shape)
    return tokens, mask


def _positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class MiniGPT4(blip2.Blip2LM):
    """See the module docstring. `bos_token_id` starts every sequence (LLaMA's 1)."""

    lm: dict | None = None            # DecoderLM fields; None: Vicuna-7B
    bos_token_id: int = 1

    @property
    def lm_fields(self) -> dict:
        return self.lm if self.lm is not None else {"variant": "vicuna-7b"}

    def image_prefix(self, images: jax.Array, before: jax.Array | None = None, before_mask: jax.Array | None = None,
                     *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """(embeds, mask) of [BOS, before, image queries]: the soft prefix of generation."""
        return self._prefix(self.image_prompt(images, train=train), before, before_mask)

    def _prefix(self, image: jax.Array, before: jax.Array | None, before_mask: jax.Array | None
                ) -> tuple[jax.Array, jax.Array]:
        batch = image.shape[0]
        before, before_mask = _segment(before, before_mask, batch)
        bos = jnp.full((batch, 1), self.bos_token_id, jnp.int32)
        words = self.language_model.embed_tokens(jnp.concatenate([bos, before], axis=1)).astype(jnp.float32)
        embeds = jnp.concatenate([words, image], axis=1)
        mask = jnp.concatenate([jnp.ones((batch, 1), bool), before_mask, jnp.ones(image.shape[:2], bool)], axis=1)
        return embeds, mask

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 before: jax.Array | None = None, before_mask: jax.Array | None = None,
                 after: jax.Array | None = None, after_mask: jax.Array | None = None,
                 train: bool = False) -> dict[str, jax.Array]:
        """tokens (B, T) the text to write (right padding, mask True at real tokens); before / after
        (B or 1, length) the prompt's ids around the image, with optional masks."""
        batch = images.shape[0]
        image = self.image_prompt(images, train=train)
        prefix, prefix_mask = self._prefix(image, before, before_mask)
        after, after_mask = _segment(after, after_mask, batch)
        _, mask = _segment(tokens, mask, batch)
        words = self.language_model.embed_tokens(jnp.concatenate([after, tokens], axis=1))
        embeds = jnp.concatenate([prefix.astype(words.dtype), words], axis=1)
        full_mask = jnp.concatenate([prefix_mask, after_mask, mask], axis=1)
        out = self.language_model(None, full_mask, inputs_embeds=embeds, positions=_positions(full_mask), train=train)
        return {"logits": out["logits"], "prompt_embeds": image}


def lm_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy on the text alone (MiniGPT-4's targets: -100 on the BOS, the prompt
    and the image; the first text token is predicted from the last prompt position). `logits` are
    MiniGPT4's whole-sequence output, `tokens` / `mask` its text input."""
    prefix = logits.shape[1] - tokens.shape[1]
    if prefix < 1:
        raise ValueError(f"logits {logits.shape} must cover a prompt before the {tokens.shape[1]} text tokens")
    text = language.labels_from_tokens(tokens, mask)
    labels = jnp.concatenate([jnp.full((tokens.shape[0], prefix), language.IGNORE_ID, text.dtype), text], axis=1)
    return language.token_cross_entropy(logits, language.causal_lm_labels(labels))


def end_sequences(tokenizer, end_symbol: str = END_SYMBOL) -> list[tuple[int, ...]]:
    """The id sequences that spell `end_symbol` at a word's start and inside one (LLaMA: "▁###" is one
    id, 835, and "###" after other text "##" + "#", 2277 29937: the official demo's stop words);
    none for a tokenizer that drops the symbol (the shapes word tokenizer)."""
    spelled = {tuple(tokenizer.encode(end_symbol))}
    probe = tokenizer.encode("a")
    with_text = tokenizer.encode("a" + end_symbol)
    if with_text[:len(probe)] == probe:
        spelled.add(tuple(with_text[len(probe):]))
    return sorted(s for s in spelled if s)


def cut_at_end(ids: np.ndarray, sequences: list[tuple[int, ...]], pad: int) -> np.ndarray:
    """`ids` (rows of generated tokens) with each row padded from the first of `sequences` on, as
    the official demo cuts its answer at "###"."""
    ids = np.array(ids)
    for row in ids:
        ends = [i for seq in sequences for i in range(len(row) - len(seq) + 1) if tuple(row[i:i + len(seq)]) == seq]
        if ends:
            row[min(ends):] = pad
    return ids


def chat(model: MiniGPT4, variables: dict, images: jax.Array, after: jax.Array, config: generate.GenerationConfig,
         *, before: jax.Array | None = None, before_mask: jax.Array | None = None,
         after_mask: jax.Array | None = None, generator: generate.Generator | None = None
         ) -> generate.GenerationOutput:
    """MiniGPT-4's answer: tokens generated after [BOS, before, image, after] (after: the prompt
    from "</Img>" to "###Assistant: ", left-padded with `after_mask`; at least one token). The prefix
    is computed once; the LM decodes with its KV cache (build `generator` with
    `blip2.language_generator(model, ...)` to reuse its compiled program)."""
    if after.ndim != 2 or after.shape[1] < 1:
        raise ValueError(f"after must be (batch, length >= 1) prompt ids, got shape {after.shape}")
    prefix = jax.jit(lambda v, x, b, m: model.apply(v, x, b, m, method=MiniGPT4.image_prefix))(
        variables, images, before, before_mask)
    if generator is None:
        generator = blip2.language_generator(model, config.total_length(after.shape[1]))
    inputs = {"prefix_embeds": prefix[0], "prefix_mask": prefix[1]}
    return generator(variables["params"]["language_model"], after, config, prompt_mask=after_mask, inputs=inputs)
