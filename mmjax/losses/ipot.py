"""ViLT's word–patch alignment (WPA, Kim et al. 2021, Sec. 3.2): optimal transport by IPOT.

For every image–text pair the text token states and the image patch states of the fusion
transformer are matched by an approximate optimal-transport plan T (the Inexact Proximal point
method for Optimal Transport, Xie et al. 2019, as UNITER uses): cosine cost C[i, j] = 1 - cos(text
i, patch j), uniform marginals over the valid tokens of each side, and the Wasserstein distance
estimate trace(C · Tᵀ) = Σ C ⊙ T. ITM pairs that match should align cheaply, so the WPA loss is
the mean distance of the positive pairs minus that of the negatives (sums over the batch, divided
by its size), weighted 0.1 in pretraining.

As ViLT: β = 0.5, 50 outer iterations with one inner (k = 1) Sinkhorn-like update each; the plan
is computed without gradient (a constant), the distance is differentiated through the cost only.
Invalid positions (padding, the [CLS] tokens and the text's final [SEP], which ViLT leaves out)
are masked, so shapes stay fixed under jit. The proximal step multiplies the previous plan into
exp(-C/β), as the algorithm and ViLT do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PAD_OFFSET = 1e4    # ViLT adds it to a masked row's denominator so that its scaling vanishes


def cosine_cost(x: jax.Array, y: jax.Array, eps: float = 1e-5) -> jax.Array:
    """(B, M, N) cosine distance 1 - cos(x_i, y_j) of (B, M, D) and (B, N, D) (norms floored at eps,
    as torch's F.normalize)."""
    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)
    return 1.0 - jnp.einsum("bmd,bnd->bmn", unit(x), unit(y), precision="highest")


def ipot_plan(cost: jax.Array, x_valid: jax.Array, y_valid: jax.Array, beta: float = 0.5,
              iterations: int = 50, inner: int = 1) -> jax.Array:
    """(B, M, N) transport plan between the M x-tokens and N y-tokens of each pair (IPOT).

    x_valid (B, M), y_valid (B, N) bool: the tokens that take part; each valid side has the uniform
    marginal 1/count. The plan is 0 wherever either side is invalid. No gradient flows through it.
    """
    cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
    x_valid, y_valid = x_valid.astype(bool), y_valid.astype(bool)
    if cost.ndim != 3 or x_valid.shape != cost.shape[:2] or y_valid.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(f"ipot_plan: cost (B, M, N) {cost.shape} needs x_valid (B, M) and y_valid (B, N); got "
                         f"{x_valid.shape} and {y_valid.shape}")
    if beta <= 0 or iterations < 1 or inner < 1:
        raise ValueError(f"ipot_plan needs beta > 0, iterations >= 1 and inner >= 1; got {beta}, {iterations}, "
                         f"{inner}")
    joint = x_valid[:, :, None] & y_valid[:, None, :]
    x_len = jnp.maximum(x_valid.sum(-1, keepdims=True), 1).astype(jnp.float32)    # (B, 1)
    y_len = jnp.maximum(y_valid.sum(-1, keepdims=True), 1).astype(jnp.float32)
    x_pad = jnp.where(x_valid, 0.0, _PAD_OFFSET)
    y_pad = jnp.where(y_valid, 0.0, _PAD_OFFSET)
    kernel = jnp.where(joint, jnp.exp(-cost / beta), 0.0)
    plan = joint.astype(jnp.float32)
    sigma = jnp.where(x_valid, 1.0 / x_len, 0.0)                                   # (B, M)

    def outer(_, carry):
        plan, sigma = carry
        q = kernel * plan

        def scale(_, scales):
            _, sigma = scales
            delta = 1.0 / (y_len * jnp.einsum("bmn,bm->bn", q, sigma, precision="highest") + y_pad)
            sigma = 1.0 / (x_len * jnp.einsum("bmn,bn->bm", q, delta, precision="highest") + x_pad)
            return delta, sigma

        delta, sigma = jax.lax.fori_loop(0, inner, scale, (jnp.zeros_like(y_pad), sigma))
        return sigma[:, :, None] * q * delta[:, None, :], sigma

    plan, _ = jax.lax.fori_loop(0, iterations, outer, (plan, sigma))
    return jax.lax.stop_gradient(jnp.where(joint, plan, 0.0))


def ot_distance(x: jax.Array, y: jax.Array, x_valid: jax.Array, y_valid: jax.Array, beta: float = 0.5,
                iterations: int = 50, inner: int = 1) -> jax.Array:
    """(B,) IPOT distance Σ C ⊙ T between the x- and y-token states of each pair; gradients reach
    x and y through the cosine cost only."""
    cost = cosine_cost(x.astype(jnp.float32), y.astype(jnp.float32))
    cost = jnp.where(x_valid[:, :, None].astype(bool) & y_valid[:, None, :].astype(bool), cost, 0.0)
    plan = ipot_plan(cost, x_valid, y_valid, beta, iterations, inner)
    return jnp.sum(cost * plan, axis=(1, 2))


def text_alignment_mask(text_mask: jax.Array) -> jax.Array:
    """(B, L) bool: the text tokens ViLT aligns, the valid ones less [CLS] (first) and the last
    valid token ([SEP])."""
    valid = text_mask.astype(bool)
    length = valid.sum(-1, keepdims=True)
    position = jnp.arange(valid.shape[-1])[None]
    return valid & (position > 0) & (position != length - 1)


def wpa_loss(distance: jax.Array, is_match: jax.Array) -> jax.Array:
    """ViLT's WPA loss (before its 0.1 weight): (Σ positives' distances - Σ negatives') / B.

    `is_match` (B,) bool or 0/1: the ITM label of each pair; `weights` are the caller's."""
    if distance.shape != is_match.shape or distance.ndim != 1:
        raise ValueError(f"wpa_loss needs (B,) distances and ITM labels, got {distance.shape} and {is_match.shape}")
    sign = jnp.where(is_match.astype(bool), 1.0, -1.0)
    return jnp.sum(sign * distance) / distance.shape[0]
