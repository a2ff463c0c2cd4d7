"""Contrastive image–text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

`clip_loss` and `siglip_loss` are written on the *global* batch: under `jax.jit` with the batch
sharded over the data axes, XLA inserts the all-gathers, so the loss (and its gradient) over a
sharded batch equals the loss over the same batch on one device. Inputs are L2-normalised
embeddings (N, D); row i of the images matches row i of the texts.

For very large batches, two memory-efficient forms compute the same values and gradients:
`clip_loss_local` (each data shard scores its own rows against the gathered embeddings, open_clip's
`--local-loss --gather-with-grad`) and `siglip_loss_chunked` (a loop over chunks of the texts, so
no (N, N) logits exist at once, not even in the backward pass). `LOSSES` maps
(`loss.name`, `loss.impl`) in a config to the function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

BATCH_AXES = ("data", "fsdp")   # the mesh axes that mmjax.sharding splits batches over


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


def _batch_axes() -> tuple[tuple[str, ...], int]:
    """The context mesh's batch axes (set by `jax.set_mesh`) and the number of batch shards."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    return axes, shards


def clip_loss_local(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict]:
    """`clip_loss` with per-shard logits: (N/shards, N) per device instead of (N, N).

    Under `jax.set_mesh`, a shard_map over the batch axes gives each data shard its own rows;
    it gathers the texts (the gather's transpose sends their gradients back to their shard),
    scores its images against all of them, and gets text→image from the same block by
    all-reducing per-column log-sum-exps. Without a mesh, or with one batch shard, this is
    `clip_loss`.
    """
    _check(zimg, ztxt)
    axes, shards = _batch_axes()
    if shards == 1:
        return clip_loss(zimg, ztxt, scale)
    n = zimg.shape[0]
    if n % shards:
        raise ValueError(f"Batch of {n} does not split into {shards} batch shards")

    def local(zi, zt, s):
        rows = zi.shape[0]
        labels = jax.lax.axis_index(axes) * rows + jnp.arange(rows)
        logits = clip_logits(zi, jax.lax.all_gather(zt, axes, tiled=True), s)    # (rows, N)
        positives = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        i2t = jnp.sum(jax.nn.logsumexp(logits, axis=1) - positives)
        # text→image needs each column's log-sum-exp over every shard's rows: combine the
        # shards' partial sums (shifted by the global column max, which needs no gradient).
        shift = jax.lax.pmax(jax.lax.stop_gradient(logits).max(axis=0), axes)
        column_lse = jnp.log(jax.lax.psum(jnp.exp(logits - shift).sum(axis=0), axes)) + shift
        t2i = jnp.sum(column_lse[labels] - positives)   # this shard's texts are columns `labels`
        correct = (jnp.argmax(logits, axis=1) == labels).sum()
        return jax.lax.psum((i2t, t2i, correct), axes)

    batch = PartitionSpec(axes)
    i2t, t2i, correct = jax.shard_map(local, in_specs=(batch, batch, PartitionSpec()),
                                      out_specs=PartitionSpec())(zimg, ztxt, scale)
    i2t, t2i = i2t / n, t2i / n
    return (i2t + t2i) / 2, {"i2t_loss": i2t, "t2i_loss": t2i, "batch_i2t_top1": correct / n}


def siglip_loss_chunked(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array,
                        num_chunks: int | None = None) -> tuple[jax.Array, dict]:
    """`siglip_loss` as a loop over `num_chunks` chunks of the texts: (N, N/chunks) logits at a time.

    Each chunk's loss is rematerialised (`jax.checkpoint`), so the backward pass keeps only the
    chunk's embeddings, never its logits. Under a mesh the image rows stay sharded, so a device
    holds (N/shards, N/chunks) logits. `num_chunks` defaults to the number of batch shards.
    """
    _check(zimg, ztxt)
    n, dim = zimg.shape
    num_chunks = num_chunks or _batch_axes()[1]
    if n % num_chunks:
        raise ValueError(f"Batch of {n} does not split into {num_chunks} text chunks")
    size = n // num_chunks
    rows = jnp.arange(n)

    @jax.checkpoint
    def chunk_loss(zt, first):
        logits = clip_logits(zimg, zt, scale, bias)                       # (N, size)
        signs = jnp.where(rows[:, None] == first + jnp.arange(size)[None], 1.0, -1.0)
        return -jnp.sum(jax.nn.log_sigmoid(signs * logits)), logits.max(1), first + logits.argmax(1)

    def body(carry, chunk):
        total, best, best_col = carry
        loss, chunk_best, chunk_col = chunk_loss(*chunk)
        better = chunk_best > best        # strict: the first maximum wins, as in jnp.argmax
        return (total + loss, jnp.where(better, chunk_best, best), jnp.where(better, chunk_col, best_col)), None

    chunks = (ztxt.reshape(num_chunks, size, dim), jnp.arange(num_chunks) * size)
    init = (jnp.zeros((), jnp.float32), jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
    (total, _, best_col), _ = jax.lax.scan(body, init, chunks)
    return total / n, {"batch_i2t_top1": (best_col == rows).mean()}


# (loss.name, loss.impl) -> loss function; the "full" forms materialise the (N, N) logits.
LOSSES = {
    ("clip", "full"): clip_loss,
    ("clip", "local"): clip_loss_local,
    ("siglip", "full"): siglip_loss,
    ("siglip", "chunked"): siglip_loss_chunked,
}
