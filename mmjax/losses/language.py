"""Token cross-entropy for masked (MLM) and causal language modeling.

Labels follow the PyTorch/transformers convention: -100 marks a position that is not scored
(unmasked tokens for MLM; padding and prompt tokens for captioning). Label smoothing ε mixes the
one-hot target with the uniform distribution, (1 - ε)·onehot + ε/V, exactly as
`torch.nn.functional.cross_entropy(label_smoothing=ε, ignore_index=-100)` (BLIP's decoder uses
ε = 0.1). Means run over the scored tokens of the whole batch; a batch with none gives loss 0,
not NaN as in torch. Shapes stay fixed under jit: the causal shift moves the labels, not logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_ID = -100


def _check(logits: jax.Array, labels: jax.Array) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} must be labels.shape + (vocab,); labels are {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer token ids (with {IGNORE_ID} for ignored), got {labels.dtype}")


def causal_lm_labels(labels: jax.Array, ignore_id: int = IGNORE_ID) -> jax.Array:
    """Next-token targets: position t is scored against token t + 1; the last position is ignored.

    Same loss as transformers' `logits[:, :-1]` against `labels[:, 1:]`, but logits keep their
    length. `labels` (B, L) are the input ids with unscored positions already set to `ignore_id`.
    """
    if labels.ndim < 1:
        raise ValueError(f"labels must have a sequence axis, got shape {labels.shape}")
    pad = jnp.full(labels.shape[:-1] + (1,), ignore_id, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)


def labels_from_tokens(tokens: jax.Array, mask: jax.Array, prefix_length: int = 0,
                       ignore_id: int = IGNORE_ID) -> jax.Array:
    """Token ids with padding (`mask` 0) and the first `prefix_length` tokens (a prompt such as
    BLIP's "a picture of ") set to `ignore_id`: the labels BLIP's decoder is trained on."""
    if mask.shape != tokens.shape:
        raise ValueError(f"mask {mask.shape} must match tokens {tokens.shape}")
    if not 0 <= prefix_length <= tokens.shape[-1]:
        raise ValueError(f"prefix_length {prefix_length} is outside the sequence length {tokens.shape[-1]}")
    scored = mask.astype(bool) & (jnp.arange(tokens.shape[-1]) >= prefix_length)
    return jnp.where(scored, tokens, jnp.asarray(ignore_id, tokens.dtype))


def per_token_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                            ignore_id: int = IGNORE_ID) -> jax.Array:
    """Cross-entropy of every position (float32, shaped like `labels`), 0 where ignored.

    Summing over the sequence gives BLIP's per-answer loss (`reduction="none"` then `.sum(1)`).
    """
    _check(logits, labels)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    scored = labels != ignore_id
    safe = jnp.where(scored, labels, 0)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    return jnp.where(scored, nll, 0.0)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                        ignore_id: int = IGNORE_ID) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over the scored tokens, and their top-1 accuracy.

    logits (..., V), labels (...) with `ignore_id` where unscored. For MLM pass the masked
    positions' original ids; for causal LM pass `causal_lm_labels(labels)`.
    """
    per_token = per_token_cross_entropy(logits, labels, label_smoothing, ignore_id)
    scored = (labels != ignore_id).astype(jnp.float32)
    count = jnp.maximum(scored.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * scored
    return per_token.sum() / count, {"token_accuracy": correct.sum() / count, "scored_tokens": scored.sum()}
