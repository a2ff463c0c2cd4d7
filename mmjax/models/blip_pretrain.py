"""BLIP's pretraining model (Li et al. 2022, Sec. 3.1; salesforce/BLIP models/blip_pretrain.py):
the multimodal mixture of encoder-decoder.

    vision_model   ViT (mmjax.models.blip.vision_tower), all tokens
    text_encoder   bidirectional Bert cross-attending to the image in every layer; mode="text"
                   skips the cross-attention (the unimodal encoder of ITC), mode="full" is the
                   image-grounded encoder of ITM
    text_decoder   the causal image-grounded decoder with the tied LM head, which SHARES EVERY
                   WEIGHT WITH THE ENCODER EXCEPT ITS SELF-ATTENTION (BLIP's
                   tie_encoder_decoder_weights(..., '/attention'): embeddings, cross-attention,
                   MLP and their norms are shared; self-attention, its norm `ln1` and the LM head
                   are the decoder's own)
    vision_proj, text_proj (embed_dim 256), itm_head, temp (0.07, clamped to [0.001, 0.5])

Sharing: the parameter tree holds each shared leaf once, under text_encoder; text_decoder holds
only its own leaves (`DECODER_OWN`). The decoder is the same Bert as BlipCaptioner's, wrapped in
`nn.map_variables`: before it runs, `assemble_decoder` puts the encoder's shared leaves beside
its own (and at init, its own are created fresh). One stored leaf used twice gets the sum of both
uses' gradients, as tied torch parameters do. `expand` turns these parameters into the one-copy
layouts of mmjax.models.blip (BlipRetrieval + BlipCaptioner, which `mmjax-convert` exports).

Tokens: BLIP adds [DEC] (bos of the decoder) and [ENC] (first token of the ITM encoder) after a
tokenizer vocabulary of V: the model's vocab_size is V + 2, [DEC] = V, [ENC] = V + 1 (30522 + 2).
The task swaps them in for [CLS]; this module takes the ids it is given.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mmjax import flops
from mmjax.models import bert, blip, vit

DECODER_OWN_LAYER_KEYS = ("attn", "ln1")   # per layer: self-attention and its post-LN
DECODER_OWN_TOP_KEYS = ("lm_head",)
ADDED_TOKENS = 2                            # [DEC], [ENC]


def is_decoder_own(path: tuple[str, ...]) -> bool:
    """Whether a (flattened) decoder parameter path is the decoder's own, not shared with the encoder."""
    if path[0] in DECODER_OWN_TOP_KEYS:
        return True
    return path[0] == "encoder" and any(k in path for k in DECODER_OWN_LAYER_KEYS)


def _flat(tree: Any) -> dict:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def decoder_own(decoder_params: Any) -> dict:
    """The decoder's own leaves of a full decoder tree (what BlipPretrain stores under text_decoder)."""
    return traverse_util.unflatten_dict({p: v for p, v in _flat(decoder_params).items() if is_decoder_own(p)})


def assemble_decoder(own: Any, encoder_params: Any) -> dict:
    """The decoder's full parameter tree: the encoder's shared leaves plus `own` (which may be
    empty at init: the missing own leaves are then created by the decoder)."""
    shared = {p: v for p, v in _flat(encoder_params).items() if not is_decoder_own(p)}
    return traverse_util.unflatten_dict({**shared, **_flat(own)})


def special_tokens(vocab_size: int) -> dict[str, int]:
    """BLIP's added ids for a model vocabulary of `vocab_size` = tokenizer vocabulary + 2."""
    return {"dec": vocab_size - 2, "enc": vocab_size - 1}


class BlipPretrain(blip.BlipRetrieval):
    """BLIP's pretraining model (module docstring). Inherits BlipRetrieval's towers, projections,
    ITM head and methods (encode_image_tokens, embed_image, encode_text, match) and adds the shared
    decoder (`decode_text`, BlipCaptioner's signature, so mmjax.generate can drive it).

    `__call__(images, tokens, mask)` (used to initialise) returns BlipRetrieval's outputs plus the
    decoder's "logits" (B, L, vocab) for the same tokens.
    """

    learn_temperature: bool = True

    def setup(self):
        super().setup()
        fields = {**blip.TEXT_DEFAULTS, **(self.text or {})}
        if fields.get("scan"):
            raise ValueError("BlipPretrain shares layers between encoder and decoder by name: use scan=False")

        def trans_in(variables):
            encoder = self.text_encoder.variables.get("params", {})
            return {**variables, "params": assemble_decoder(variables.get("params", {}), encoder)}

        def trans_out(variables):
            if "params" not in variables:
                return variables
            return {**variables, "params": decoder_own(variables["params"])}

        shared_decoder = nn.map_variables(bert.Bert, "params", trans_in, trans_out, mutable=True)
        decoder = blip.text_tower(self.text, self.dtype, causal=True, lm_head=True)
        self.text_decoder = shared_decoder(**{f: getattr(decoder, f) for f in _bert_fields()}, name="text_decoder")

    def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        out = super().__call__(images, tokens, mask, train=train)
        image_tokens = self.encode_image_tokens(images, train=train)
        out["logits"] = self.decode_text(tokens, mask=mask, context=image_tokens, train=train)["logits"]
        return out

    def decode_text(self, tokens: jax.Array, *, mask: jax.Array | None = None, context: jax.Array | None = None,
                    context_mask: jax.Array | None = None, positions: jax.Array | None = None,
                    decode: bool = False, train: bool = False) -> dict[str, jax.Array]:
        """The shared decoder ({"logits", "tokens"}); decode=True follows Bert's cache convention."""
        return self.text_decoder(tokens, mask, context, context_mask, positions=positions, decode=decode,
                                 train=train)

    def decode_caption(self, tokens: jax.Array, *, mask: jax.Array | None = None,
                       context: jax.Array | None = None, positions: jax.Array | None = None,
                       decode: bool = False) -> jax.Array:
        """decode_text's logits with [DEC] / [ENC] ruled out: they are model-only inputs that the
        tokenizer cannot decode (the generation method of the caption predict function)."""
        logits = self.decode_text(tokens, mask=mask, context=context, positions=positions, decode=decode)["logits"]
        added = jnp.arange(logits.shape[-1]) >= logits.shape[-1] - ADDED_TOKENS
        return jnp.where(added, jnp.finfo(logits.dtype).min, logits)


def _bert_fields() -> tuple[str, ...]:
    return tuple(f for f in bert.Bert.__dataclass_fields__ if f not in ("parent", "name"))


def expand(params: Any, *, temperature: bool = False) -> dict[str, dict]:
    """{"retrieval": BlipRetrieval params, "captioner": BlipCaptioner params} of BlipPretrain
    params: each one-copy layout gets its own copy of the shared leaves (mmjax.models.blip;
    `mmjax-convert` exports those to transformers). temperature: keep `temp` in the retrieval
    params (a BlipRetrieval with learn_temperature=True; transformers has none)."""
    missing = sorted({"vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"}
                     - set(params))
    if missing:
        raise ValueError(f"Not BlipPretrain parameters: {missing} missing (it holds {sorted(params)})")
    retrieval = {k: v for k, v in params.items() if k != "text_decoder" and (temperature or k != "temp")}
    decoder = assemble_decoder(params["text_decoder"], params["text_encoder"])
    return {"retrieval": retrieval, "captioner": {"vision_model": params["vision_model"], "text_decoder": decoder}}


def forward_flops(model: BlipPretrain, image_hw: tuple[int, int], length: int) -> dict[str, float]:
    """Analytic forward FLOPs of one pretraining example (mmjax.flops), by part: the image tower,
    the unimodal text encoder, the image-grounded encoder on the 3 ITM pairs (one positive, two
    hard negatives), the decoder with its LM head, and the ITC / ITM heads."""
    vision = blip.vision_tower(model.vision, model.dtype)
    encoder = blip.text_tower(model.text, model.dtype, causal=False, lm_head=False)
    decoder = blip.text_tower(model.text, model.dtype, causal=True, lm_head=True)
    width, image_width = encoder.arch()["width"], vision.arch()["width"]
    image_tokens = vit.tokens_seen(vision, image_hw, False)
    unimodal = bert.forward_flops(encoder.clone(cross_attention=False), length)
    fused = bert.forward_flops(encoder, length, image_tokens, image_width)
    out = flops.prefixed("vision", vit.forward_flops(vision, image_hw))
    out.update(flops.prefixed("text", unimodal))
    out.update(flops.prefixed("itm_encoder", {k: 3 * v for k, v in fused.items()}))
    out.update(flops.prefixed("decoder", bert.forward_flops(decoder, length, image_tokens, image_width)))
    out["heads"] = (flops.dense(1, image_width, model.embed_dim) + flops.dense(1, width, model.embed_dim)
                    + 3 * flops.dense(1, width, 2))
    return out


def momentum_forward_flops(model: BlipPretrain, image_hw: tuple[int, int], length: int) -> dict[str, float]:
    """Forward FLOPs of the momentum towers on one example: image tower, unimodal text, projections."""
    parts = forward_flops(model, image_hw, length)
    kept = {k: v for k, v in parts.items() if k.startswith(("vision", "text"))}
    encoder = blip.text_tower(model.text, model.dtype, causal=False, lm_head=False)
    vision = blip.vision_tower(model.vision, model.dtype)
    kept["heads"] = (flops.dense(1, vision.arch()["width"], model.embed_dim)
                     + flops.dense(1, encoder.arch()["width"], model.embed_dim))
    return kept


__all__ = ["BlipPretrain", "assemble_decoder", "decoder_own", "expand", "forward_flops", "is_decoder_own",
           "momentum_forward_flops", "special_tokens"]
