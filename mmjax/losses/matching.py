"""Image–text matching (ITM): hard negatives drawn from contrastive similarities, and the loss.

ALBEF (Li et al. 2021, Sec. 3.2) and BLIP (Li et al. 2022, Sec. 3.2) train a binary "does this
text describe this image" head on the fusion encoder. Random negatives are too easy, so for every
image they draw one text of the batch with probability ∝ softmax(ITC similarity), never its own
caption (nor, with image ids, any caption of the same image), and likewise an image for every
text. Each step then scores N positives and 2N negatives, laid out as ALBEF's model_pretrain.py:

    rows [0, N):   (image i,              text i)               label 1
    rows [N, 2N):  (negative image of i,  text i)               label 0
    rows [2N, 3N): (image i,              negative text of i)   label 0

Pure functions on global arrays. Sampling is `jax.random.categorical` on globally shaped
logits, whose values depend only on the key and the shapes (threefry is partitionable), so a
batch sharded over the data axes draws the same negatives as on one device — from the whole
global batch, as BLIP's `negative_all_rank`, with XLA doing the gathers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class HardNegatives(NamedTuple):
    """Indices into the batch. `*_found` is False for a row with no candidate at all (every item
    of the batch shares its image id); its index is then arbitrary and should not train ITM."""

    text_for_image: jax.Array      # (N,) the negative text of image i
    image_for_text: jax.Array      # (N,) the negative image of text i
    image_found: jax.Array         # (N,) bool
    text_found: jax.Array          # (N,) bool


def positive_mask(n: int, image_ids: jax.Array | None = None) -> jax.Array:
    """(N, N) bool: True where text j belongs to image i (the diagonal; with ids, equal ids)."""
    if image_ids is None:
        return jnp.eye(n, dtype=bool)
    if image_ids.shape != (n,):
        raise ValueError(f"image_ids must be shaped (N,) = ({n},), got {image_ids.shape}")
    return image_ids[:, None] == image_ids[None, :]


def _draw(key: jax.Array, sim: jax.Array, positives: jax.Array, floor: float) -> tuple[jax.Array, jax.Array]:
    """One index per row of `sim` with probability ∝ softmax(sim) + floor, positives excluded."""
    log_weights = jax.nn.log_softmax(jax.lax.stop_gradient(sim).astype(jnp.float32), axis=-1)
    if floor:
        log_weights = jnp.logaddexp(log_weights, jnp.log(jnp.float32(floor)))
    found = ~jnp.all(positives, axis=-1)
    log_weights = jnp.where(positives, -jnp.inf, log_weights)
    log_weights = jnp.where(found[:, None], log_weights, 0.0)   # no candidate: any index, flagged
    return jax.random.categorical(key, log_weights, axis=-1), found


def sample_hard_negatives(key: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array,
                          image_ids: jax.Array | None = None, floor: float = 0.0) -> HardNegatives:
    """Draws a negative text for every image and a negative image for every text.

    sim_i2t[i, j]: similarity of image i to text j; sim_t2i[j, i]: of text j to image i; both
    (N, N) over the global batch (ALBEF passes the batch block of its queue similarities,
    `sim[:, :N]`). `image_ids` (N,) also excludes other captions of the same image (ALBEF/BLIP
    retrieval fine-tuning). `floor` is added to the softmax weights before masking, as BLIP's
    pretraining does (1e-4), so a very peaked softmax still leaves every negative reachable.
    Deterministic in `key`; no gradient flows through the similarities.
    """
    if sim_i2t.ndim != 2 or sim_i2t.shape[0] != sim_i2t.shape[1] or sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_i2t and sim_t2i must both be (N, N) over the batch; got {sim_i2t.shape} and "
                         f"{sim_t2i.shape} (pass the batch block sim[:, :N] of similarities against a queue)")
    if floor < 0:
        raise ValueError(f"floor must be >= 0, got {floor}")
    positives = positive_mask(sim_i2t.shape[0], image_ids)
    key_text, key_image = jax.random.split(key)
    text_for_image, image_found = _draw(key_text, sim_i2t, positives, floor)
    image_for_text, text_found = _draw(key_image, sim_t2i, positives.T, floor)
    return HardNegatives(text_for_image, image_for_text, image_found, text_found)


def itm_inputs(negatives: HardNegatives, images: Any, texts: Any) -> tuple[Any, Any]:
    """The 3N (image, text) pairs in ALBEF's layout (module docstring) from batch pytrees.

    `images` and `texts` are pytrees of arrays with leading batch dim N (e.g. image tokens; text
    ids, embeddings and attention mask); returns both with leading dim 3N.
    """
    def pick(tree, index):
        return jax.tree.map(lambda x: jnp.take(x, index, axis=0), tree)

    def cat(*trees):
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)

    images_all = cat(images, pick(images, negatives.image_for_text), images)
    texts_all = cat(texts, texts, pick(texts, negatives.text_for_image))
    return images_all, texts_all


def itm_labels(n: int) -> jax.Array:
    """(3N,) int32: 1 for the N positives, 0 for the 2N negatives (ALBEF's layout)."""
    return jnp.concatenate([jnp.ones((n,), jnp.int32), jnp.zeros((2 * n,), jnp.int32)])


def itm_weights(negatives: HardNegatives) -> jax.Array:
    """(3N,) float: 1 for every pair, 0 for negatives drawn from a row that had no candidate."""
    ones = jnp.ones_like(negatives.image_found, jnp.float32)
    return jnp.concatenate([ones, negatives.text_found.astype(jnp.float32),
                            negatives.image_found.astype(jnp.float32)])


def itm_loss(logits: jax.Array, weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """2-way cross-entropy of ITM logits (3N, 2) in ALBEF's layout, mean over the pairs.

    Class 1 = "matches". `weights` (3N,) (e.g. `itm_weights`) drops pairs from the mean.
    Metrics: accuracy over all pairs, and separately on positives and negatives.
    """
    if logits.ndim != 2 or logits.shape[-1] != 2 or logits.shape[0] % 3:
        raise ValueError(f"ITM logits must be (3N, 2): N positives then 2N negatives; got {logits.shape}")
    n = logits.shape[0] // 3
    labels = itm_labels(n)
    weights = jnp.ones((3 * n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    if weights.shape != (3 * n,):
        raise ValueError(f"weights must be shaped (3N,) = ({3 * n},), got {weights.shape}")
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    total = jnp.maximum(weights.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * weights
    negative_weight = jnp.maximum(weights[n:].sum(), 1.0)
    return (xent * weights).sum() / total, {
        "itm_accuracy": correct.sum() / total,
        "itm_positive_accuracy": correct[:n].sum() / jnp.maximum(weights[:n].sum(), 1.0),
        "itm_negative_accuracy": correct[n:].sum() / negative_weight,
    }
