"""Contrastive image–text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both are written on the *global* batch: under `jax.jit` with the batch sharded over the data
axes, XLA inserts the all-gathers, so the loss (and its gradient) over a sharded batch equals
the loss over the same batch on one device. Inputs are L2-normalised embeddings (N, D);
row i of the images matches row i of the texts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _check(zimg: jax.Array, ztxt: jax.Array) -> None:
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(f"Expected image and text embeddings of the same (N, D) shape, got "
                         f"{zimg.shape} and {ztxt.shape}")


def clip_logits(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                bias: jax.Array | None = None) -> jax.Array:
    """(N, N) image-to-text logits in float32."""
    logits = scale * jnp.einsum("id,td->it", zimg.astype(jnp.float32), ztxt.astype(jnp.float32))
    return logits if bias is None else logits + bias


def clip_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy over the batch."""
    _check(zimg, ztxt)
    logits = clip_logits(zimg, ztxt, scale)
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    accuracy = (jnp.argmax(logits, axis=1) == labels).mean()
    return (i2t + t2i) / 2, {"i2t_loss": i2t, "t2i_loss": t2i, "batch_i2t_top1": accuracy}


def siglip_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                bias: jax.Array) -> tuple[jax.Array, dict]:
    """Sigmoid loss: every pair is a binary problem (+1 on the diagonal, -1 elsewhere).

    Normalised by the batch size, as in the SigLIP paper: -1/N Σ_i Σ_j log σ(z_ij · logit_ij).
    """
    _check(zimg, ztxt)
    logits = clip_logits(zimg, ztxt, scale, bias)
    n = logits.shape[0]
    signs = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n
    accuracy = (jnp.argmax(logits, axis=1) == jnp.arange(n)).mean()
    return loss, {"batch_i2t_top1": accuracy}
