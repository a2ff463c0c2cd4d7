"""ALBEF (Li et al. 2021, "Align before Fuse"), composed from mmjax's ViT and Bert.

One module holds what the official checkpoints hold (ALBEF_4M.pth / ALBEF.pth, without the
momentum copies, which are train state: mmjax/tasks/albef.py):

    visual_encoder   DeiT-style ViT-B/16 (pre-LN, LayerNorm eps 1e-6, class token, learned
                     positions, final norm on every token): mmjax's ViT with pool="none"
    text_encoder     BERT-base with the MLM head tied to the word embeddings; layers 0-5 read text
                     alone (mode "text", the unimodal encoder of ITC), layers 6-11 also
                     cross-attend to the image tokens (mode "fusion", the multimodal encoder)
    vision_proj, text_proj   the [CLS] states into the 256-d ITC space (normalised)
    itm_head         2-way image-text matching on the fused [CLS]
    temp             the learned ITC temperature, 0.07 at init, clamped to [0.001, 0.5] as the
                     official code clamps it before every step

The methods split the forward pass the way pretraining and retrieval use it: the image tokens
and the unimodal text states are computed once and reused by ITC, ITM (fused with hard-negative
pairs) and MLM. Parameter names follow the official modules; mmjax/convert/albef.py maps them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers
from mmjax.models import bert, vit

# ALBEF's configs/Pretrain.yaml + config_bert.json: ViT-B/16 at 256 pixels, BERT-base, fusion from layer 6.
VISION_DEFAULTS = dict(variant="B/16", pool="none", class_token=True, ln_eps=1e-6, act="gelu", dropout=0.0)
TEXT_DEFAULTS = dict(variant="base", vocab_size=30522, type_vocab_size=2, pool="none", dropout=0.1,
                     cross_attention_from=6)
TEMP_RANGE = (0.001, 0.5)
_NORMAL = nn.initializers.normal(0.02)


def vision_tower(fields: dict | None, dtype: layers.Dtype, name: str | None = None) -> vit.ViT:
    """ALBEF's image encoder: VISION_DEFAULTS overridden by `fields` (pool must stay "none")."""
    merged = {**VISION_DEFAULTS, **(fields or {})}
    if merged["pool"] != "none" or not merged["class_token"]:
        raise ValueError("ALBEF's image encoder returns all tokens, [CLS] first: its ViT needs pool='none' and "
                         "class_token=True")
    return vit.ViT(**merged, dtype=dtype, name=name)


def text_tower(fields: dict | None, dtype: layers.Dtype, name: str | None = None) -> bert.Bert:
    """ALBEF's BERT: text-only layers below `cross_attention_from`, fusion layers from it on."""
    merged = {**TEXT_DEFAULTS, **(fields or {})}
    fixed = dict(causal=False, cross_attention=True, cross_attention_every=1, lm_head=True)
    clash = {k: merged[k] for k in fixed if k in merged and merged[k] != fixed[k]}
    if clash:
        raise ValueError(f"ALBEF's text encoder fixes {sorted(clash)}; got {clash}")
    depth = bert.resolve_arch(merged.get("variant"), **{k: merged.get(k) for k in bert.ARCH_FIELDS})["depth"]
    if not 0 < merged["cross_attention_from"] < depth:
        raise ValueError(f"ALBEF needs text-only layers and fusion layers: cross_attention_from must be in "
                         f"[1, {depth - 1}], got {merged['cross_attention_from']}")
    return bert.Bert(**{**merged, **fixed}, dtype=dtype, name=name)


def normalize(x: jax.Array) -> jax.Array:
    """L2 normalisation as torch's F.normalize (eps 1e-12 on the norm), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _dense(features: int, dtype: layers.Dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=layers.dense_init(("embed", "mlp"), _NORMAL),
                    bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))


class Albef(nn.Module):
    """ALBEF's pretraining model (see the module docstring).

    `__call__(images, tokens, mask)` pairs images[i] with tokens[i] and returns the normalised
    ITC embeddings "image_embeds", "text_embeds" (B, embed_dim), "logit_scale" (1 / clamped temp),
    "itm_logits" (B, 2: no match / match, the fused [CLS]) and "logits" (B, L, vocab: the MLM
    head on the fused states, meaningful where `tokens` hold [MASK]).
    """

    vision: dict | None = None     # ViT fields over VISION_DEFAULTS
    text: dict | None = None       # Bert fields over TEXT_DEFAULTS
    embed_dim: int = 256
    temperature_init: float = 0.07
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        self.visual_encoder = vision_tower(self.vision, self.dtype)
        self.text_encoder = text_tower(self.text, self.dtype)
        self.vision_proj = _dense(self.embed_dim, self.dtype)
        self.text_proj = _dense(self.embed_dim, self.dtype)
        self.itm_head = _dense(2, self.dtype)
        self.temp = self.param("temp", nn.initializers.constant(self.temperature_init), ())

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        """images (B, H, W, 3) normalised; tokens (B, L) ids ([CLS] first); mask (B, L) True at real tokens."""
        image_tokens = self.encode_image(images, train=train)
        if self.is_initializing():   # Bert creates its parameters in mode "full" only
            out = self.text_encoder(tokens, mask, image_tokens, mode="full", train=train)
            states, fused, logits = out["tokens"], out["tokens"], out["logits"]
        else:
            states = self.encode_text(tokens, mask, train=train)
            out = self.text_encoder(states, mask, image_tokens, mode="fusion", train=train)
            fused, logits = out["tokens"], out["logits"]
        return {"image_embeds": self.embed_image(image_tokens), "text_embeds": self.embed_text(states),
                "logit_scale": self.logit_scale(), "itm_logits": self.itm(fused), "logits": logits}

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, 1 + patches, vision width): the image encoder's normed tokens, [CLS] first."""
        return self.visual_encoder(images, train=train)["tokens"]

    def encode_text(self, tokens: jax.Array, mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """(B, L, text width): the unimodal text states (the layers before the fusion layers)."""
        return self.text_encoder(tokens, mask, mode="text", train=train)["tokens"]

    def fuse(self, states: jax.Array, mask: jax.Array | None, image_tokens: jax.Array,
             image_mask: jax.Array | None = None, *, train: bool = False) -> dict[str, jax.Array]:
        """The fusion layers on unimodal text states against image tokens: {"tokens", "logits"}."""
        return self.text_encoder(states, mask, image_tokens, image_mask, mode="fusion", train=train)

    def mlm(self, tokens: jax.Array, mask: jax.Array | None, image_tokens: jax.Array, *,
            train: bool = False) -> jax.Array:
        """(B, L, vocab) MLM logits of (masked) token ids read against image tokens: all layers."""
        return self.text_encoder(tokens, mask, image_tokens, mode="full", train=train)["logits"]

    def embed_image(self, image_tokens: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC embedding of the image [CLS] token."""
        return normalize(self.vision_proj(image_tokens[:, 0].astype(self.dtype)))

    def embed_text(self, states: jax.Array) -> jax.Array:
        """(B, embed_dim) normalised ITC embedding of the unimodal text [CLS] state."""
        return normalize(self.text_proj(states[:, 0].astype(self.dtype)))

    def itm(self, fused: jax.Array) -> jax.Array:
        """(B, 2) ITM logits (no match, match) of fused states."""
        return self.itm_head(fused[:, 0].astype(self.dtype)).astype(jnp.float32)

    def logit_scale(self) -> jax.Array:
        """1 / temp, the temperature clamped to [0.001, 0.5] (ALBEF clamps it in place each step)."""
        return 1.0 / jnp.clip(self.temp.astype(jnp.float32), *TEMP_RANGE)


def forward_flops(model: Albef, image_hw: tuple[int, int], length: int) -> dict[str, float]:
    """Analytic FLOPs of one `__call__` per example, by part: the image encoder, the unimodal
    text layers, the fusion layers with their cross-attention and the MLM head, projections."""
    vision, text = vision_tower(model.vision, model.dtype), text_tower(model.text, model.dtype)
    v_width, arch = vision.arch()["width"], text.arch()
    width, first = arch["width"], text.cross_attention_from
    image_tokens = vit.tokens_seen(vision, image_hw)
    parts = flops.prefixed("vision_", vit.forward_flops(vision, image_hw))
    parts.update(flops.transformer_blocks(length, width, first, arch["mlp_dim"], name="text_blocks"))
    fusion = arch["depth"] - first
    parts.update(flops.transformer_blocks(length, width, fusion, arch["mlp_dim"], name="fusion_blocks"))
    parts["fusion_cross_linear"] = fusion * (2 * flops.dense(length, width, width)
                                             + 2 * flops.dense(image_tokens, v_width, width))
    parts["fusion_cross_attention"] = fusion * flops.attention(length, image_tokens, width)
    parts["mlm_head"] = flops.dense(length, width, width) + flops.dense(length, width, text.vocab_size)
    parts["heads"] = flops.dense(1, v_width, model.embed_dim) + flops.dense(1, width, model.embed_dim) \
        + flops.dense(1, width, 2)
    return parts
