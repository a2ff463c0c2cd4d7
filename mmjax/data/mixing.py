"""Mixup and CutMix on a device batch (timm's `Mixup` in "batch" mode), driven by the step rng.

One λ per batch, and every example is mixed with its partner in the flipped batch (example i
with example B-1-i). With probability `prob` the batch is mixed at all; then, when both alphas
are set, with probability `switch_prob` CutMix (λ ~ Beta(cutmix_alpha, cutmix_alpha); a box of
area about (1-λ)·H·W is pasted from the partner and λ is corrected to the box's clipped area)
instead of mixup (λ ~ Beta(mixup_alpha, mixup_alpha); a convex blend). The targets are the
one-hot, optionally label-smoothed labels blended with the same λ. Everything is jnp, so it
runs inside the jitted step and shards with the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mixup:
    """The settings, with timm's / MAE's / BEiT's fine-tuning values as defaults. An alpha of 0
    turns that kind of mixing off; at least one must be positive."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    prob: float = 1.0

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha", "switch_prob", "prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"mixup.{name} must be a non-negative number, got {value!r}")
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup needs mixup_alpha > 0 or cutmix_alpha > 0 (remove the block to turn it off)")
        for name in ("switch_prob", "prob"):
            if getattr(self, name) > 1:
                raise ValueError(f"mixup.{name} is a probability, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Mixup:
        """From a config block such as `dict(mixup_alpha=0.8, cutmix_alpha=1.0)`; unknown keys
        are an error that lists the known ones."""
        config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"Unknown mixup key(s) {unknown}; known: {known}")
        return cls(**config)


def sample_params(rng: jax.Array, mixup: Mixup) -> tuple[jax.Array, jax.Array]:
    """(λ before the CutMix correction, use_cutmix) for one batch; λ = 1 means no mixing."""
    k_apply, k_switch, k_lam = jax.random.split(rng, 3)
    apply = jax.random.uniform(k_apply) < mixup.prob
    if mixup.mixup_alpha > 0 and mixup.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < mixup.switch_prob
    else:
        use_cutmix = jnp.asarray(mixup.cutmix_alpha > 0)
    # One draw for both candidates (a disabled kind's alpha is a placeholder, never used):
    # one Beta sampler compiles in half the time of two.
    alphas = jnp.asarray([mixup.mixup_alpha or 1.0, mixup.cutmix_alpha or 1.0], jnp.float32)
    lam_mix, lam_cut = jax.random.beta(k_lam, alphas, alphas)
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    return lam, apply & use_cutmix


def cutmix_box(lam: jax.Array, center: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(y_lo, y_hi, x_lo, x_hi) of a box with sides int(side · sqrt(1-λ)) centred at `center`
    (y, x), clipped to the image (timm's `rand_bbox`, margin 0)."""
    ratio = jnp.sqrt(1.0 - lam)
    bounds = []
    for axis, side in enumerate(size):
        cut = jnp.floor(side * ratio).astype(jnp.int32)
        bounds += [jnp.clip(center[axis] - cut // 2, 0, side), jnp.clip(center[axis] + (cut + 1) // 2, 0, side)]
    return jnp.stack(bounds)


def mix_targets(labels: jax.Array, num_classes: int, lam: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Float (B, classes) targets: smoothed one-hot labels blended with the flipped batch's."""
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"mixup needs integer labels shaped (batch,), got {labels.dtype} {labels.shape}")
    off = label_smoothing / num_classes
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - label_smoothing) + off
    return targets * lam + targets[::-1] * (1.0 - lam)


def mix(images: jax.Array, labels: jax.Array, num_classes: int, lam: jax.Array, use_cutmix: jax.Array,
        center: jax.Array, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixes NHWC `images` with their flipped batch for given parameters; returns
    (images, soft targets (B, classes), the λ the targets use)."""
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"mixup needs NHWC images and one label per image, got {images.shape} and {labels.shape}")
    height, width = images.shape[1:3]
    y_lo, y_hi, x_lo, x_hi = cutmix_box(lam, center, (height, width))
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
    partner = images[::-1]
    pasted = jnp.where(inside[None, :, :, None], partner, images)
    blend = lam.astype(images.dtype)
    blended = images * blend + partner * (1 - blend)
    lam = jnp.where(use_cutmix, 1.0 - inside.sum() / (height * width), lam)
    return (jnp.where(use_cutmix, pasted, blended), mix_targets(labels, num_classes, lam, label_smoothing), lam)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, mixup: Mixup,
              label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Mixup or CutMix of a batch with random parameters: (images, soft targets (B, classes))."""
    k_params, k_center = jax.random.split(rng)
    lam, use_cutmix = sample_params(k_params, mixup)
    center = jax.random.randint(k_center, (2,), 0, jnp.asarray(images.shape[1:3]))
    images, targets, _ = mix(images, labels, num_classes, lam, use_cutmix, center, label_smoothing)
    return images, targets
