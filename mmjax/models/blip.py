"""BLIP (Li et al. 2022) as transformers implements it, composed from mmjax's ViT and Bert.

Two modules, as transformers' checkpoints split them (a retrieval checkpoint holds no decoder,
a captioning one no text encoder), so each converts one-to-one with every key accounted for:

    BlipRetrieval   vision tower + image-grounded text encoder (ITM head on the fused [CLS]) +
                    ITC projections of the unimodal [CLS] tokens (BlipForImageTextRetrieval)
    BlipCaptioner   vision tower + image-grounded causal text decoder with the tied LM head
                    (BlipForConditionalGeneration); `decode_text` follows mmjax.layers' decode
                    cache convention, so mmjax.generate.FlaxDecoder(model, "decode_text") drives it
    BlipQuestionAnswering  vision tower + image-grounded question encoder + answer decoder
                    cross-attending to the question (BlipForQuestionAnswering)

The vision tower is a pre-LN ViT with a patch bias, class token, learned positions, LayerNorm eps
1e-5 and the final norm on every token (BlipVisionModel's post_layernorm): mmjax's ViT with
pool="none" expresses it exactly. The text side is post-LN BERT without token-type embeddings,
cross-attending to every image token in every layer. Pretraining's shared encoder/decoder
weights are the task's business (it can tie parameter trees); these modules hold one copy each.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import layers
from mmjax.models import bert, vit

# BLIP-base (transformers' defaults, those of Salesforce/blip-*-base): ViT-B/16 at 384 pixels and
# BERT-base with BLIP's two added tokens ([DEC] 30522 as bos, [ENC] 30523).
VISION_DEFAULTS = dict(variant="B/16", pool="none", class_token=True, ln_eps=1e-5, act="gelu", dropout=0.0)
TEXT_DEFAULTS = dict(variant="base", vocab_size=30524, type_vocab_size=0, pool="none", dropout=0.0)
_NORMAL = nn.initializers.normal(0.02)


def vision_tower(fields: dict | None, dtype: layers.Dtype, name: str | None = None) -> vit.ViT:
    """BLIP's vision tower: VISION_DEFAULTS overridden by `fields` (its pool must stay "none")."""
    merged = {**VISION_DEFAULTS, **(fields or {})}
    if merged["pool"] != "none":
        raise ValueError("BLIP's vision tower returns all tokens: its ViT needs pool='none'")
    return vit.ViT(**merged, dtype=dtype, name=name)


def text_tower(fields: dict | None, dtype: layers.Dtype, causal: bool, lm_head: bool,
               name: str | None = None) -> bert.Bert:
    """BLIP's text encoder (causal=False) or decoder: a Bert cross-attending in every layer."""
    merged = {**TEXT_DEFAULTS, **(fields or {})}
    fixed = dict(causal=causal, cross_attention=True, cross_attention_from=0, cross_attention_every=1,
                 lm_head=lm_head)
    clash = {k: merged[k] for k in fixed if k in merged and merged[k] != fixed[k]}
    if clash:
        raise ValueError(f"BLIP's text tower fixes {sorted(clash)}; got {clash}")
    return bert.Bert(**{**merged, **fixed}, dtype=dtype, name=name)


def _dense(features: int, dtype: layers.Dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=layers.dense_init(("embed", "mlp"), _NORMAL),
                    bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))


def _normalize(x: jax.Array) -> jax.Array:
    """L2 normalisation as torch's F.normalize (eps 1e-12 on the norm)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class BlipRetrieval(nn.Module):
    """BLIP's image-text retrieval model (see the module docstring).

    `__call__(images, tokens, mask)` pairs images[i] with tokens[i] and returns "itm_logits"
    (B, 2: no match / match, the fused [CLS] through the ITM head) and the normalised ITC
    embeddings "image_embeds", "text_embeds" (B, embed_dim) of the unimodal [CLS] tokens;
    `image_embeds @ text_embeds.T` is transformers' `use_itm_head=False` score. With
    `learn_temperature` (BLIP pretraining; transformers has no such parameter) also
    "logit_scale" = 1 / temp, temp clipped to [0.001, 0.5] as the official code does.
    """

    vision: dict | None = None     # ViT fields over VISION_DEFAULTS
    text: dict | None = None       # Bert fields over TEXT_DEFAULTS
    embed_dim: int = 256           # image_text_hidden_size
    learn_temperature: bool = False
    temperature_init: float = 0.07
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        self.vision_model = vision_tower(self.vision, self.dtype)
        self.text_encoder = text_tower(self.text, self.dtype, causal=False, lm_head=False)
        self.vision_proj = _dense(self.embed_dim, self.dtype)
        self.text_proj = _dense(self.embed_dim, self.dtype)
        self.itm_head = _dense(2, self.dtype)
        if self.learn_temperature:
            self.temp = self.param("temp", nn.initializers.constant(self.temperature_init), ())

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        """images (B, H, W, 3) normalised; tokens (B, L) ids ([CLS] first); mask (B, L) True at real tokens."""
        image_tokens = self.encode_image_tokens(images, train=train)
        out = {"itm_logits": self.match(tokens, mask, image_tokens, train=train),
               "image_embeds": self.embed_image(image_tokens)}
        if self.is_initializing():   # Bert refuses mode="text" while initialising: create text_proj alone
            width = self.text_encoder.arch()["width"]
            out["text_embeds"] = _normalize(self.text_proj(jnp.zeros((tokens.shape[0], width), self.dtype)))
        else:
            out["text_embeds"] = self.encode_text(tokens, mask, train=train)
        if self.learn_temperature:
            out["logit_scale"] = 1.0 / jnp.clip(self.temp, 0.001, 0.5)
        return out

    def encode_image_tokens(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, 1 + patches, vision width): the vision tower's normed tokens, [CLS] first."""
        return self.vision_model(images, train=train)["tokens"]

    def embed_image(self, image_tokens: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC embedding of the image [CLS] token."""
        return _normalize(self.vision_proj(image_tokens[:, 0].astype(self.dtype)))

    def encode_text(self, tokens: jax.Array, mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """(B, embed_dim) normalised ITC embedding of the unimodal text [CLS] (no cross-attention)."""
        states = self.text_encoder(tokens, mask, mode="text", train=train)["tokens"]
        return _normalize(self.text_proj(states[:, 0].astype(self.dtype)))

    def match(self, tokens: jax.Array, mask: jax.Array | None, image_tokens: jax.Array,
              image_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """(B, 2) ITM logits of text i against image_tokens i (ITM re-ranking pairs them freely)."""
        states = self.text_encoder(tokens, mask, image_tokens, image_mask, train=train)["tokens"]
        return self.itm_head(states[:, 0].astype(self.dtype)).astype(jnp.float32)


class BlipCaptioner(nn.Module):
    """BLIP's image-grounded text decoder (see the module docstring).

    `__call__(images, tokens, mask)` returns "logits" (B, L, vocab): next-token scores of a
    causal decoder reading the text (bos [DEC] first) and cross-attending to all image tokens.
    """

    vision: dict | None = None     # ViT fields over VISION_DEFAULTS
    text: dict | None = None       # Bert fields over TEXT_DEFAULTS
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        self.vision_model = vision_tower(self.vision, self.dtype)
        self.text_decoder = text_tower(self.text, self.dtype, causal=True, lm_head=True)

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        context = self.encode_images(images, train=train)
        return {"logits": self.decode_text(tokens, mask=mask, context=context, train=train)["logits"]}

    def encode_images(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, 1 + patches, vision width): the tokens the decoder cross-attends to."""
        return self.vision_model(images, train=train)["tokens"]

    def decode_text(self, tokens: jax.Array, *, mask: jax.Array | None = None, context: jax.Array | None = None,
                    context_mask: jax.Array | None = None, positions: jax.Array | None = None,
                    decode: bool = False, train: bool = False) -> dict[str, jax.Array]:
        """The text decoder alone ({"logits", "tokens"}); decode=True: Bert's cache convention
        (the first call gives the `context`, later calls none: its keys/values are cached)."""
        return self.text_decoder(tokens, mask, context, context_mask, positions=positions, decode=decode,
                                 train=train)


class BlipQuestionAnswering(nn.Module):
    """BLIP's VQA model (BlipForQuestionAnswering): the image-grounded text encoder reads the
    question against the image; the answer decoder cross-attends to the question's states.

    `__call__(images, tokens, mask, answer_tokens, answer_mask)` returns "logits" (B, A, vocab)
    of the answer decoder (bos [DEC] first). Generation: `encode_question`, then `decode_text`
    with context = its states (transformers' generate lets the decoder attend to every question
    position, padding included: pass no context_mask for its answers).
    """

    vision: dict | None = None     # ViT fields over VISION_DEFAULTS
    text: dict | None = None       # Bert fields over TEXT_DEFAULTS (encoder and decoder alike)
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        self.vision_model = vision_tower(self.vision, self.dtype)
        self.text_encoder = text_tower(self.text, self.dtype, causal=False, lm_head=False)
        self.text_decoder = text_tower(self.text, self.dtype, causal=True, lm_head=True)

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None, answer_tokens: jax.Array,
                 answer_mask: jax.Array | None = None, *, train: bool = False) -> dict[str, jax.Array]:
        question = self.encode_question(images, tokens, mask, train=train)
        return {"logits": self.decode_text(answer_tokens, mask=answer_mask, context=question, context_mask=mask,
                                           train=train)["logits"]}

    def encode_question(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                        train: bool = False) -> jax.Array:
        """(B, L, text width): the question's states, fused with the image."""
        image_tokens = self.vision_model(images, train=train)["tokens"]
        return self.text_encoder(tokens, mask, image_tokens, train=train)["tokens"]

    def decode_text(self, tokens: jax.Array, *, mask: jax.Array | None = None, context: jax.Array | None = None,
                    context_mask: jax.Array | None = None, positions: jax.Array | None = None,
                    decode: bool = False, train: bool = False) -> dict[str, jax.Array]:
        """The answer decoder alone; see BlipCaptioner.decode_text."""
        return self.text_decoder(tokens, mask, context, context_mask, positions=positions, decode=decode,
                                 train=train)
