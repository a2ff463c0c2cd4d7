"""CLIP (Radford et al. 2021) and SigLIP's variant of it (Zhai et al. 2023).

A ViT image tower and a causal text tower, each followed by a bias-free projection into a
shared embedding space, plus a learnable temperature. `encode_image` / `encode_text` return
unnormalised projected embeddings (open_clip's convention); `__call__` returns a dict
(mmjax.models.outputs) of both L2-normalised ("image_embeds", "text_embeds"), "logit_scale"
(exp of the parameter, clipped at 100) and SigLIP's "logit_bias" when enabled.

SigLIP's published models differ in three optional fields: the image embedding is the tower's
pooled (MAP) output itself (`image_projection=False`), the text projection has a bias
(`text_proj_bias`), and the temperature is not clipped (`max_logit_scale=None`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import flops, layers
from mmjax.models import text, vit

MAX_LOGIT_SCALE = 100.0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def tower_configs(model: CLIP) -> tuple[dict, dict]:
    """The ViT and TextTransformer fields of a CLIP's towers, with CLIP's defaults filled in."""
    image_cfg = dict(pool="cls", pre_norm=True, patch_bias=False, ln_eps=1e-5)
    image_cfg.update(dict(model.image or {}))
    image_cfg.setdefault("dtype", model.dtype)
    if image_cfg.get("num_classes") is not None:
        raise ValueError("CLIP's image tower must not have a classifier head (num_classes)")
    text_cfg = dict(model.text or {})
    text_cfg.setdefault("dtype", model.dtype)
    return image_cfg, text_cfg


class CLIP(nn.Module):
    """Two towers and a temperature. `image` and `text` hold the towers' fields."""

    embed_dim: int = 512
    image: Any = None               # dict of vit.ViT fields, e.g. {"variant": "B/16"}
    text: Any = None                # dict of text.TextTransformer fields
    logit_scale_init: float = float(np.log(1 / 0.07))
    logit_bias_init: float | None = None   # set (SigLIP: -10) to add a learnable bias
    image_projection: bool = True   # False: the pooled image output is the embedding (SigLIP)
    text_proj_bias: bool = False    # SigLIP's text head is a Linear with a bias
    max_logit_scale: float | None = MAX_LOGIT_SCALE   # None: no clip (SigLIP, big_vision)
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        image_cfg, text_cfg = tower_configs(self)
        self.visual = vit.ViT(**image_cfg)
        self.textual = text.TextTransformer(**text_cfg)

        def proj(name, use_bias=False):
            return nn.Dense(self.embed_dim, use_bias=use_bias, dtype=self.dtype, name=name,
                            kernel_init=layers.dense_init(("embed", None), nn.initializers.lecun_normal()),
                            bias_init=layers.dense_init((None,), nn.initializers.zeros))
        self.image_proj = proj("image_proj") if self.image_projection else None
        self.text_proj = proj("text_proj", self.text_proj_bias)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(self.logit_scale_init), ()), ())
        if self.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(
                nn.initializers.constant(self.logit_bias_init), ()), ())

    def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        pooled = self.visual(images, train=train)["pooled"]
        if self.image_proj is None:
            if pooled.shape[-1] != self.embed_dim:
                raise ValueError(f"image_projection=False needs embed_dim ({self.embed_dim}) equal to the "
                                 f"image tower's pooled width ({pooled.shape[-1]})")
            return pooled.astype(jnp.float32)
        return self.image_proj(pooled).astype(jnp.float32)

    def encode_text(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        return self.text_proj(self.textual(tokens, train=train)["pooled"]).astype(jnp.float32)

    def scale(self) -> jax.Array:
        """exp(logit_scale), clipped at max_logit_scale (open_clip clamps the raw parameter)."""
        if self.max_logit_scale is None:
            return jnp.exp(self.logit_scale)
        return jnp.exp(jnp.clip(self.logit_scale, None, np.log(self.max_logit_scale)))

    def __call__(self, images: jax.Array, tokens: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """{"image_embeds", "text_embeds" (L2-normalised), "logit_scale"[, "logit_bias"]}."""
        out = {"image_embeds": l2_normalize(self.encode_image(images, train=train)),
               "text_embeds": l2_normalize(self.encode_text(tokens, train=train)),
               "logit_scale": self.scale()}
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        return out


def forward_flops(model: CLIP, image_hw: tuple[int, int], text_length: int, batch_size: int | None = None,
                  train: bool = False) -> dict[str, float]:
    """Analytic forward FLOPs per image-text pair (mmjax.flops), by part.

    With `batch_size` (the global batch), adds the pair's share of the contrastive logits:
    one row of the (B, B) similarity matrix.
    """
    image_cfg, text_cfg = tower_configs(model)
    image, txt = vit.ViT(**image_cfg), text.TextTransformer(**text_cfg)
    out = {**flops.prefixed("image_", vit.forward_flops(image, image_hw, train)),
           **flops.prefixed("text_", text.forward_flops(txt, text_length))}
    image_width = image.representation_size or image.arch()["width"]
    out["projections"] = flops.dense(1, image_width * model.image_projection + txt.width, model.embed_dim)
    out["logits"] = flops.dense(1, model.embed_dim, batch_size) if batch_size else 0.0
    return out
