"""Momentum distillation (ALBEF, Li et al. 2021, Sec. 3.3): soften noisy web-text targets with the
momentum model's own predictions, weighted by α (0.4 in the paper).

ITC: targets = α·softmax(teacher similarities) + (1 - α)·hard targets, where the hard targets are
one-hot on each row's own pair, or uniform over the row's positives when several captions share
an image (ALBEF/BLIP retrieval fine-tuning: `pos / pos.sum(1)`). MLM: (1 - α)·CE(labels) +
α·CE(softmax(teacher logits)) over the masked tokens, as ALBEF's xbert `BertForMaskedLM`. The soft
term is a cross-entropy, not a KL: they differ by the teacher's entropy, which has no gradient.
The teacher never receives a gradient. With α = 0 both losses equal the plain ones exactly.

`mmjax.losses.contrastive_queue.itc_queue_loss(distill=α)` applies the same ITC targets against
its queue; these functions take logits, so any pairing (queue or not, image ids or not) can use them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.losses import language


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-Σ_c targets·log_softmax(logits) along the last axis (float32), one value per row."""
    if logits.shape != targets.shape:
        raise ValueError(f"soft_cross_entropy: logits {logits.shape} and targets {targets.shape} differ")
    return -jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) * targets.astype(jnp.float32), axis=-1)


def distill_targets(hard_targets: jax.Array, teacher_logits: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """α·softmax(teacher_logits) + (1 - α)·hard_targets, the teacher treated as a constant."""
    if hard_targets.shape != teacher_logits.shape:
        raise ValueError(f"hard targets {hard_targets.shape} and teacher logits {teacher_logits.shape} differ")
    teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    return alpha * teacher + (1.0 - alpha) * hard_targets.astype(jnp.float32)


def contrastive_targets(shape: tuple[int, int], positives: jax.Array | None = None) -> jax.Array:
    """Hard ITC targets (N, M): one-hot on column i for row i (the batch block comes first, then
    any queue), or each row's `positives` (N, M bool) normalised to sum to one."""
    n, m = shape
    if positives is None:
        if m < n:
            raise ValueError(f"logits (N={n}, M={m}) must hold each row's own pair: M >= N")
        return jnp.eye(n, m, dtype=jnp.float32)
    if positives.shape != (n, m):
        raise ValueError(f"positives must be shaped like the logits {(n, m)}, got {positives.shape}")
    positives = positives.astype(jnp.float32)
    return positives / jnp.maximum(positives.sum(axis=-1, keepdims=True), 1.0)


def itc_distill_loss(logits_i2t: jax.Array, logits_t2i: jax.Array, teacher_i2t: jax.Array,
                     teacher_t2i: jax.Array, alpha: float | jax.Array,
                     positives: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ALBEF's ITC with momentum distillation, the mean of both directions.

    logits_*: the online similarities / temperature (N, M), M = N + queue; teacher_*: the
    momentum model's, same shape. `positives` (N, M): ALBEF/BLIP retrieval's same-image mask,
    used for both directions; default one-hot on column i.
    """
    if logits_i2t.ndim != 2 or logits_t2i.shape != logits_i2t.shape:
        raise ValueError(f"logits_i2t and logits_t2i must both be (N, M); got {logits_i2t.shape} and "
                         f"{logits_t2i.shape}")
    hard = contrastive_targets(logits_i2t.shape, positives)
    i2t = soft_cross_entropy(logits_i2t, distill_targets(hard, teacher_i2t, alpha)).mean()
    t2i = soft_cross_entropy(logits_t2i, distill_targets(hard, teacher_t2i, alpha)).mean()
    return (i2t + t2i) / 2, {"i2t_loss": i2t, "t2i_loss": t2i}


def mlm_distill_loss(logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha: float | jax.Array,
                     ignore_id: int = language.IGNORE_ID) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(1 - α)·token CE + α·soft CE against softmax(teacher_logits), each a mean over the scored
    (masked) tokens. logits, teacher_logits (..., V); labels (...) with `ignore_id` elsewhere."""
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {teacher_logits.shape} must match the logits {logits.shape}")
    hard, metrics = language.token_cross_entropy(logits, labels, ignore_id=ignore_id)
    teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    scored = (labels != ignore_id).astype(jnp.float32)
    soft = (soft_cross_entropy(logits, teacher) * scored).sum() / jnp.maximum(scored.sum(), 1.0)
    return (1.0 - alpha) * hard + alpha * soft, {**metrics, "mlm_hard_loss": hard, "mlm_distill_loss": soft}


def distill_alpha(step: jax.Array | int, alpha: float, warmup_steps: int) -> jax.Array:
    """ALBEF's schedule: α ramps linearly from 0 over the first epoch (`warmup_steps`), then stays."""
    if warmup_steps <= 0:
        return jnp.float32(alpha)
    return alpha * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
