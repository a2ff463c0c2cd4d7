"""Masked image modeling losses: pixel regression (MAE) and visual-token prediction (BEiT).

Pure functions on arrays. Both average over masked positions only; a batch with no masked
position gives loss 0 rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _check_masked(name: str, per_position: jax.Array, mask: jax.Array) -> jax.Array:
    if mask.shape != per_position.shape:
        raise ValueError(f"{name}: mask {mask.shape} does not match the positions {per_position.shape}")
    return mask.astype(jnp.float32)


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-patch (x - mean) / sqrt(var + eps) with the unbiased variance, MAE's `norm_pix_loss`."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + eps)


def mim_pixels(pred: jax.Array, target: jax.Array, mask: jax.Array, *, norm_pix: bool = True,
               eps: float = 1e-6) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MAE loss: per-patch mean squared error, averaged over masked patches (mask 1 = masked).

    pred, target: (B, N, patch²·C) (target from `mae.patchify`); mask: (B, N).
    `norm_pix` regresses per-patch normalised pixels, as the MAE paper's best setting.
    """
    if pred.shape != target.shape:
        raise ValueError(f"mim_pixels: pred {pred.shape} and target {target.shape} differ")
    target = normalize_patches(target, eps) if norm_pix else target
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    weights = _check_masked("mim_pixels", per_patch, mask)
    masked = weights.sum()
    loss = (per_patch * weights).sum() / jnp.maximum(masked, 1.0)
    return loss, {"masked_share": masked / weights.size}


def mim_tokens(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BEiT loss: cross-entropy of visual-token logits at the masked positions.

    logits: (B, N, vocab); targets: (B, N) token ids; mask: (B, N), True = masked. The mean runs
    over all masked positions of the batch, as BEiT's `CrossEntropyLoss(logits[mask], labels)`.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"mim_tokens: logits {logits.shape} do not match targets {targets.shape}")
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = _check_masked("mim_tokens", xent, mask)
    masked = jnp.maximum(weights.sum(), 1.0)
    loss = (xent * weights).sum() / masked
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return loss, {"masked_accuracy": (correct * weights).sum() / masked,
                  "masked_share": weights.sum() / weights.size}
