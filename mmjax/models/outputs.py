"""The one vocabulary of model outputs.

Every model family's `__call__` returns a plain dict whose keys come from `KEYS` below, so
tasks, evaluators and users read results by name (`out["logits"]`), never by position, and a
key means the same thing in every family. Arrays are float32 unless noted. A model returns
only the keys it computes; `check` tells a typo from a missing output.

Single-purpose methods return bare arrays: `CLIP.encode_image` / `encode_text` (unnormalised
projected embeddings), `MAE.features` (all tokens, unmasked), and the dVAE tokenizer pair
(`DVAEEncoder` codebook logits and `tokenize` ids, `DVAEDecoder` statistics and `reconstruct`).
"""

from __future__ import annotations

from collections.abc import Mapping

KEYS: dict[str, str] = {
    "logits": "scores of the model's head: (B, classes) for classifiers (ViT, BEiT fine-tuning), "
              "(B, N, vocab) per patch for BEiT's masked-token head, (B, L, vocab) per token for "
              "MLM / LM heads (BERT, ViLT, BLIP's decoder, the decoder LMs LLaMA / OPT / Qwen2 / T5, BLIP-2's "
              "LM on the text positions), (B, answers) for VQA heads",
    "pooled": "(B, D) the pooled vector a head reads: ViT's pre-logits (after `representation_size`), "
              "BEiT's normed mean of patch tokens, the text tower's end-of-text token",
    "tokens": "(B, L, D) the encoder's final token sequence (prefix tokens first): normed, except "
              "where the model norms the pooled vector instead (ViT fc_norm, BEiT fine-tuning); "
              "MAE: the [CLS] + visible tokens of the masked input; Q-Former: queries first; Perceiver "
              "resampler: (B, latents, D), or (B, T, latents, D) per media for (B, T, frames, N, D) input",
    "image_embeds": "(B, E) L2-normalised image embeddings in the shared image-text space (CLIP); "
                    "(B, queries, E), one per query, for BLIP-2",
    "text_embeds": "(B, E) L2-normalised text embeddings in the shared image-text space (CLIP)",
    "logit_scale": "() the multiplier of image-text cosine similarities, exp(learned scale) clipped (CLIP)",
    "logit_bias": "() the learned bias added to the scaled similarities (SigLIP)",
    "pred": "(B, N, patch*patch*C) per-patch pixel predictions in patchify order (MAE)",
    "mask": "(B, N) 1 where the patch was masked (hidden from the encoder), 0 where visible (MAE)",
    "ids_restore": "(B, N) int, the permutation that puts shuffled patches back in order (MAE)",
    "itm_logits": "(B, 2) image-text matching scores (no match, match) of paired images and texts (BLIP, "
                  "BLIP-2)",
    "prompt_embeds": "(B, queries, LM width) a bridge's projected queries: the soft prompt of a frozen LM (BLIP-2)",
    "encoder": "(B, L, D) an encoder-decoder LM's encoder states, which its decoder cross-attends (T5)",
}


def check(out: Mapping) -> Mapping:
    """Returns `out` after checking that every key is in the shared vocabulary."""
    unknown = sorted(set(out) - set(KEYS))
    if unknown:
        raise KeyError(f"model output keys {unknown} are not in mmjax.models.outputs.KEYS {sorted(KEYS)}")
    return out
