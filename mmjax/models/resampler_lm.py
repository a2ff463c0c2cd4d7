"""A Perceiver-resampler bridge into a frozen decoder LM: image encoder -> Perceiver resampler
(mmjax.models.perceiver_resampler, Flamingo's) -> a linear projection -> soft prompt before the text
of mmjax.models.decoder_lm.DecoderLM, the way BLIP-2's Blip2LM feeds its Q-Former's queries.

Flamingo itself feeds the resampled tokens to gated cross-attention layers inside the LM (a later
family); this prefix form is the one IDEFICS-2 and many LLaVA-style models use, and it lets the
resampler and the Q-Former be compared on the same task with the same frozen towers (the shapes
demos). `__call__`, `image_prompt`, `lm_fields` and `language_arch` are Blip2LM's, so the bridge
tasks (mmjax.tasks.blip2.LMBridgeTask) and `blip2.generate_text` serve both.

Parameters: vision_model (a ViT, every token out), resampler, language_projection, language_model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers
from mmjax.models import blip2, decoder_lm, vit
from mmjax.models import perceiver_resampler as resampler_lib


class ResamplerLM(nn.Module):
    """Images -> num_latents soft-prompt tokens -> a decoder LM's logits on the text (see above)."""

    vision: dict | None = None        # vit.ViT fields (pool is "none": the resampler reads every token)
    resampler_fields: dict | None = None   # PerceiverResampler fields besides width (the vision width)
    lm: dict | None = None            # DecoderLM fields
    dtype: layers.Dtype = jnp.float32

    @property
    def lm_fields(self) -> dict:
        return self.lm or {}

    @nn.nowrap
    def language_arch(self) -> dict:
        return decoder_lm.DecoderLM(**self.lm_fields).arch()

    @nn.nowrap
    def vision_tower(self) -> vit.ViT:
        return vit.ViT(**{**(self.vision or {}), "pool": "none"}, dtype=self.dtype)

    def setup(self):
        self.vision_model = self.vision_tower()
        width = self.vision_model.arch()["width"]
        self.resampler = resampler_lib.PerceiverResampler(width, **(self.resampler_fields or {}), dtype=self.dtype)
        self.language_projection = blip2._dense(self.language_arch()["embed_dim"], self.dtype,
                                                "language_projection")
        self.language_model = decoder_lm.DecoderLM(**self.lm_fields, dtype=self.dtype)

    def image_prompt(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """(B, num_latents, LM width) float32: the resampled image tokens as LM input embeddings."""
        latents = self.resampler(self.vision_model(images, train=train)["tokens"])["tokens"]
        return self.language_projection(latents.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        prompt = self.image_prompt(images, train=train)
        out = self.language_model.after_prefix(tokens, prefix_mask=jnp.ones(prompt.shape[:2], bool),
                                               prefix_embeds=prompt, mask=mask, train=train)
        return {**out, "prompt_embeds": prompt}


def resampler_flops(model: resampler_lib.PerceiverResampler, media_tokens: int) -> float:
    """Forward FLOPs of the resampler on one image's `media_tokens`: per layer the latents' queries,
    keys and values of media + latents, attention, output projection and feed-forward."""
    a, w = model.arch(), model.width
    inner, latents = a["num_heads"] * a["head_dim"], a["num_latents"]
    keys = media_tokens + latents
    layer = (flops.dense(latents, w, inner) + 2 * flops.dense(keys, w, inner) + flops.attention(latents, keys, inner)
             + flops.dense(latents, inner, w) + 2 * flops.dense(latents, w, model.mlp_dim or 4 * w))
    return a["depth"] * layer


def train_flops(model: ResamplerLM, image_hw: tuple[int, int], length: int, vision_frozen: bool = True,
                lm_frozen: bool = True) -> dict[str, float]:
    """Training FLOPs of one example by part, as blip2.stage2_train_flops counts them: a frozen tower
    forward only (the frozen LM's activation gradients still flow to the soft prompt)."""
    tower = model.vision_tower()
    vision = vit.forward_flops(tower, image_hw)
    width = tower.arch()["width"]
    sampler = resampler_lib.PerceiverResampler(width, **(model.resampler_fields or {}))
    latents = sampler.arch()["num_latents"]
    lm = decoder_lm.DecoderLM(**model.lm_fields)
    language = blip2.decoder_lm_flops(lm, latents + length)
    return {**{f"vision_{k}": (1.0 if vision_frozen else flops.TRAIN_FACTOR) * v for k, v in vision.items()},
            "resampler": flops.TRAIN_FACTOR * resampler_flops(sampler, vit.tokens_seen(tower, image_hw)),
            "projection": flops.TRAIN_FACTOR * flops.dense(latents, width, model.language_arch()["embed_dim"]),
            "lm_linear": (2.0 if lm_frozen else flops.TRAIN_FACTOR) * language["linear"],
            "lm_attention": flops.TRAIN_FACTOR * language["attention"]}
