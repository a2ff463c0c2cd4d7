"""BLIP-2 with a Flan-T5 language model (Li et al. 2023, Sec. 3.3), as transformers'
Blip2ForConditionalGeneration with a T5 text_config and LAVIS's blip2_t5.

    Blip2T5     the vision tower, queries and Q-Former of mmjax.models.blip2, `language_projection`
                to the T5 width, and mmjax.models.t5.T5: the projected queries followed by the
                prompt's token embeddings are the encoder's input (mask: ones for the queries, then
                the prompt's), the decoder reads the target tokens shifted right after T5's decoder
                start token (0, the pad id) and gives the logits
    t5_lm_loss  T5's cross-entropy on the target tokens, padding ignored (transformers' labels
                with -100 at padding, LAVIS's targets)
    generate_text   greedy / beam text after the image and a prompt: the encoder runs once, the
                    decoder alone decodes with its cache (mmjax.generate, T5.decode)
    stage2_train_flops  training FLOPs of one example with frozen towers forward only

The prompt is T5-tokenized text: words then `</s>`, right-padded; an empty prompt (captioning) is
`</s>` alone, as LAVIS's tokenizer writes "" and transformers' Blip2Processor an empty text.
Outputs: "logits" (B, T, vocab) and "tokens" (the decoder's final states) at the target positions,
"encoder" (B, Q + P, width) the encoder states, "prompt_embeds" (B, Q, width) the projected queries.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, generate, layers
from mmjax.losses import language
from mmjax.models import blip2, t5

DECODER_START = 0     # T5's decoder_start_token_id (its pad id)


def shift_right(targets: jax.Array, start: int = DECODER_START) -> jax.Array:
    """Decoder input ids of `targets`: the start token, then the targets but the last (transformers'
    T5 _shift_right; padding after the targets stays padding as long as pad is 0)."""
    targets = jnp.asarray(targets)
    return jnp.concatenate([jnp.full((targets.shape[0], 1), start, targets.dtype), targets[:, :-1]], axis=1)


class Blip2T5(blip2._QueryTower):
    """BLIP-2 stage 2 with an encoder-decoder LM (see the module docstring).

    `__call__(images, prompt, prompt_mask, decoder_tokens, decoder_mask)`: prompt (B, P) ids and mask
    (True at real tokens; None: all real) follow the queries into the encoder; decoder_tokens (B, T)
    are transformers' decoder_input_ids (`shift_right(targets)`), decoder_mask their key mask.
    Whether a tower is frozen is the task's business: this module only composes.
    """

    lm: dict | None = None            # T5 fields, e.g. {"variant": "flan-t5-xl"}

    @property
    def lm_fields(self) -> dict:
        return self.lm or {}

    @nn.nowrap
    def language_arch(self) -> dict:
        return t5.T5(**self.lm_fields).arch()

    def setup(self):
        self.setup_towers(text_ffn=False)
        self.language_projection = blip2._dense(self.language_arch()["width"], self.dtype, "language_projection")
        self.language_model = t5.T5(**self.lm_fields, dtype=self.dtype)

    def __call__(self, images: jax.Array, prompt: jax.Array, prompt_mask: jax.Array | None = None,
                 decoder_tokens: jax.Array | None = None, decoder_mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        if decoder_tokens is None:
            raise ValueError("Blip2T5 needs decoder_tokens (the targets shifted right: shift_right(targets))")
        enc = self.encode(images, prompt, prompt_mask, train=train)
        out = self.language_model.decode(decoder_tokens, mask=decoder_mask, context=enc["context"],
                                         context_mask=enc["context_mask"], train=train)
        return {**out, "encoder": enc["context"], "prompt_embeds": enc["prompt_embeds"]}

    def image_prompt(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, Q, T5 width) float32: the projected queries (Blip2ForConditionalGeneration.get_image_features)."""
        states = self.query_states(self.encode_image(images, train=train), train=train)
        return self.language_projection(states.astype(self.dtype)).astype(jnp.float32)

    def encode(self, images: jax.Array, prompt: jax.Array, prompt_mask: jax.Array | None = None, *,
               train: bool = False) -> dict[str, jax.Array]:
        """The decoder's cross-attention input: "context" (B, Q + P, width) the T5 encoder's states
        over [queries, prompt embeddings], "context_mask" (B, Q + P), "prompt_embeds" (B, Q, width)."""
        queries = self.image_prompt(images, train=train)
        batch, num_queries = queries.shape[:2]
        prompt = jnp.asarray(prompt)
        prompt_mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
        words = self.language_model.shared(prompt).astype(self.dtype)
        embeds = jnp.concatenate([queries.astype(self.dtype), words], axis=1)
        mask = jnp.concatenate([jnp.ones((batch, num_queries), bool), prompt_mask], axis=1)
        context = self.language_model.encode(mask=mask, inputs_embeds=embeds, train=train)["tokens"]
        return {"context": context, "context_mask": mask, "prompt_embeds": queries}


def t5_lm_loss(logits: jax.Array, targets: jax.Array, target_mask: jax.Array, label_smoothing: float = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the decoder's logits against `targets` (position t predicts target t),
    padding (`target_mask` False) not scored; metrics: "token_accuracy", "scored_tokens"."""
    labels = language.labels_from_tokens(targets, target_mask)
    return language.token_cross_entropy(logits, labels, label_smoothing)


def generate_text(model: Blip2T5, variables: dict, images: jax.Array, prompt: jax.Array,
                  config: generate.GenerationConfig, *, prompt_mask: jax.Array | None = None,
                  generator: generate.Generator | None = None) -> generate.GenerationOutput:
    """Tokens the decoder writes after its start token, given the image and `prompt` (captioning:
    `</s>` alone; VQA: "Question: ... Answer:</s>", right-padded), as transformers'
    Blip2ForConditionalGeneration.generate: the encoder runs once, then the decoder decodes with
    its cache. Pass a `generator` (built with `language_generator`) to reuse its compiled program."""
    mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    enc = jax.jit(lambda v, x, p, m: model.apply(v, x, p, m, method=Blip2T5.encode))(variables, images, prompt, mask)
    if generator is None:
        generator = language_generator(model, config.total_length(1))
    start = jnp.full((images.shape[0], 1), DECODER_START, jnp.int32)
    return generator(variables["params"]["language_model"], start, config,
                     inputs={"context": enc["context"], "context_mask": enc["context_mask"]})


def language_generator(model: Blip2T5, max_length: int, **kwargs) -> generate.Generator:
    """A Generator of `model`'s T5 decoder (max_length counts the start token and the new tokens;
    kwargs: mesh, rules); its inputs are `encode`'s "context" and "context_mask"."""
    lm = t5.T5(**model.lm_fields, dtype=model.dtype)
    return generate.Generator(generate.FlaxDecoder(lm, method="decode"), max_length, **kwargs)


# --- analytic FLOPs (mmjax.flops) ------------------------------------------------------------------

def t5_flops(lm: t5.T5, encoder_tokens: int, decoder_tokens: int) -> dict[str, float]:
    """Forward FLOPs of T5 by part: "encoder_linear", "encoder_attention", "decoder_linear" (with the
    cross-attention's query / output and the head), "cross_kv" (the cross-attention's keys and values
    of the encoder states), "decoder_attention" (self and cross), and "first_self" / "first_self_attention"
    / "first_cross_query" / "first_cross_attention", the parts of the first decoder layer inside
    those totals (with a frozen LM they see no gradient or a partial one: stage2_train_flops)."""
    a = lm.arch()
    w, m, inner = a["width"], a["mlp_dim"], a["num_heads"] * a["head_dim"]
    mlp = (3 if lm.mlp in layers.GATED else 2)
    n_e, n_d = encoder_tokens, decoder_tokens
    encoder_layer = 4 * flops.dense(n_e, w, inner) + mlp * flops.dense(n_e, w, m)
    decoder_layer = 6 * flops.dense(n_d, w, inner) + mlp * flops.dense(n_d, w, m)
    return {"encoder_linear": a["encoder_depth"] * encoder_layer,
            "encoder_attention": a["encoder_depth"] * flops.attention(n_e, n_e, inner),
            "decoder_linear": a["decoder_depth"] * decoder_layer + flops.dense(n_d, w, a["vocab_size"]),
            "cross_kv": a["decoder_depth"] * 2 * flops.dense(n_e, w, inner),
            "decoder_attention": a["decoder_depth"] * (flops.attention(n_d, n_d, inner)
                                                       + flops.attention(n_d, n_e, inner)),
            "first_self": 4 * flops.dense(n_d, w, inner), "first_self_attention": flops.attention(n_d, n_d, inner),
            "first_cross_query": flops.dense(n_d, w, inner),
            "first_cross_attention": flops.attention(n_d, n_e, inner)}


def stage2_train_flops(model: Blip2T5, image_hw: tuple[int, int], prompt_length: int, target_length: int,
                       vision_frozen: bool = True, lm_frozen: bool = True) -> dict[str, float]:
    """Training FLOPs of one example by part: the image encoder (frozen: forward only), the Q-Former
    and projection (x3), and T5 on queries + `prompt_length` encoder tokens and `target_length`
    decoder tokens. Frozen, T5's weight gradients are skipped but the activation gradients flow back
    to the queries (2x its matmuls with weights, 3x its attention), except in the first decoder
    layer's self-attention (its input, the target embeddings, sees no trainable parameter: forward
    only) and its cross-attention query (forward only; the scores' gradient reaches the keys: 2.5x)."""
    vision, image_tokens, image_width = blip2._vision(model, image_hw)
    arch, q = model.qformer_arch(), model.qformer_arch()["num_queries"]
    qformer = blip2.qformer_flops(arch, q, 0, image_tokens, image_width)
    projection = flops.dense(q, arch["width"], model.language_arch()["width"])
    f = t5_flops(t5.T5(**model.lm_fields), q + prompt_length, target_length)
    if lm_frozen:
        linear = (2.0 * (f["encoder_linear"] + f["decoder_linear"] + f["cross_kv"])
                  - f["first_self"] - f["first_cross_query"])
        attention = (flops.TRAIN_FACTOR * (f["encoder_attention"] + f["decoder_attention"])
                     - 2.0 * f["first_self_attention"] - 0.5 * f["first_cross_attention"])
    else:
        linear = flops.TRAIN_FACTOR * (f["encoder_linear"] + f["decoder_linear"] + f["cross_kv"])
        attention = flops.TRAIN_FACTOR * (f["encoder_attention"] + f["decoder_attention"])
    return {**{f"vision_{k}": (1.0 if vision_frozen else flops.TRAIN_FACTOR) * v for k, v in vision.items()},
            "qformer": flops.TRAIN_FACTOR * qformer, "projection": flops.TRAIN_FACTOR * projection,
            "lm_linear": linear, "lm_attention": attention}
