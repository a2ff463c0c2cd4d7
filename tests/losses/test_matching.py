"""mmjax.losses.matching: hard negatives drawn with ALBEF/BLIP's distribution (softmax of the ITC
similarities, positives masked; BLIP's +1e-4 floor), from the global batch, deterministic in the
key, equal on an 8-device mesh and on one device; the 3N layout and the ITM loss against torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding
from mmjax.losses import matching


def _sims(n, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=(n, n))).astype(np.float32), (scale * rng.normal(size=(n, n))).astype(np.float32)


def _reference_probabilities(sim, positives, floor=0.0):
    """ALBEF/BLIP: weights = softmax(sim) (+ floor); masked_fill(positives, 0); torch.multinomial
    normalises the row."""
    sim = np.asarray(sim, np.float64)
    w = np.exp(sim - sim.max(1, keepdims=True))
    w = w / w.sum(1, keepdims=True) + floor
    w[positives] = 0.0
    return w / w.sum(1, keepdims=True)


def _frequencies(indices, n):
    return np.stack([np.bincount(indices[:, row], minlength=n) for row in range(n)]) / len(indices)


@pytest.mark.parametrize("floor", [0.0, 1e-4, 0.05])
@pytest.mark.parametrize("with_ids", [False, True])
def test_draws_follow_the_masked_softmax(floor, with_ids):
    n, draws = 6, 40_000
    sim_i2t, sim_t2i = _sims(n, scale=1.5)
    ids = jnp.array([0, 0, 1, 2, 2, 3]) if with_ids else None
    keys = jax.random.split(jax.random.key(0), draws)
    sample = jax.jit(jax.vmap(lambda k: matching.sample_hard_negatives(k, sim_i2t, sim_t2i, ids, floor)))
    got = sample(keys)
    positives = np.asarray(matching.positive_mask(n, ids))
    for indices, sim, pos in ((got.text_for_image, sim_i2t, positives), (got.image_for_text, sim_t2i, positives.T)):
        freq = _frequencies(np.asarray(indices), n)
        want = _reference_probabilities(sim, pos, floor)
        np.testing.assert_allclose(freq, want, atol=0.012)   # ~5 standard errors at 40k draws
        assert not np.any(freq[pos]), "a positive was drawn as a negative"
    assert np.all(got.image_found) and np.all(got.text_found)


def test_a_peaked_softmax_still_draws_a_negative():
    """The positive holds all the softmax mass in float32 (the others underflow to 0): the draw is
    still among the negatives, by their (tiny) relative weights, not the masked positive."""
    sim = jnp.array([[200.0, 0.0, 1.0], [0.0, 200.0, 1.0], [0.0, 1.0, 200.0]])
    got = jax.vmap(lambda k: matching.sample_hard_negatives(k, sim, sim))(jax.random.split(jax.random.key(1), 2000))
    freq = _frequencies(np.asarray(got.text_for_image), 3)
    assert np.all(np.diag(freq) == 0)
    np.testing.assert_allclose(freq[0, 2], np.e / (1 + np.e), atol=0.04)


def test_deterministic_in_the_key():
    sim_i2t, sim_t2i = _sims(16)
    a = matching.sample_hard_negatives(jax.random.key(3), sim_i2t, sim_t2i)
    b = matching.sample_hard_negatives(jax.random.key(3), sim_i2t, sim_t2i)
    c = matching.sample_hard_negatives(jax.random.key(4), sim_i2t, sim_t2i)
    np.testing.assert_array_equal(a.text_for_image, b.text_for_image)
    np.testing.assert_array_equal(a.image_for_text, b.image_for_text)
    assert np.any(a.text_for_image != c.text_for_image) or np.any(a.image_for_text != c.image_for_text)


def test_rows_without_a_candidate_are_flagged_and_weighted_out():
    sim_i2t, sim_t2i = _sims(4)
    ids = jnp.array([7, 7, 7, 5])              # images 0-2 are one image: only text 3 is a negative
    got = matching.sample_hard_negatives(jax.random.key(0), sim_i2t, sim_t2i, ids)
    np.testing.assert_array_equal(got.text_for_image[:3], [3, 3, 3])
    assert np.all(got.image_found)
    same = matching.sample_hard_negatives(jax.random.key(0), sim_i2t, sim_t2i, jnp.zeros(4, jnp.int32))
    assert not np.any(same.image_found) and not np.any(same.text_found)
    np.testing.assert_array_equal(matching.itm_weights(same), [1, 1, 1, 1] + [0] * 8)


def test_itm_inputs_follow_albef_layout():
    """ALBEF's model_pretrain.py: texts_all = [texts; texts[neg]], images_all = [images[neg]; images]
    after the positives."""
    n = 5
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 3, 2)).astype(np.float32)
    text_ids, text_mask = rng.integers(0, 99, size=(n, 4)), rng.integers(0, 2, size=(n, 4))
    negatives = matching.sample_hard_negatives(jax.random.key(2), *_sims(n))
    images_all, texts_all = matching.itm_inputs(negatives, images, {"ids": text_ids, "mask": text_mask})
    neg_image = [images[int(negatives.image_for_text[b])] for b in range(n)]
    neg_text = [int(negatives.text_for_image[b]) for b in range(n)]
    np.testing.assert_array_equal(images_all, np.concatenate([images, np.stack(neg_image), images]))
    np.testing.assert_array_equal(texts_all["ids"], np.concatenate([text_ids, text_ids, text_ids[neg_text]]))
    np.testing.assert_array_equal(texts_all["mask"], np.concatenate([text_mask, text_mask, text_mask[neg_text]]))


def test_sharded_sampling_and_gathering_equal_one_device():
    n, d = 16, 8
    sim_i2t, sim_t2i = _sims(n, seed=5)
    ids = jnp.array(np.arange(n) // 2)          # two captions per image
    embeds = np.random.default_rng(1).normal(size=(n, 3, d)).astype(np.float32)

    def step(key, si, st, ids, images, texts):
        negatives = matching.sample_hard_negatives(key, si, st, ids, floor=1e-4)
        return negatives, matching.itm_inputs(negatives, images, texts)

    fn = jax.jit(step)
    want = fn(jax.random.key(9), sim_i2t, sim_t2i, ids, embeds, embeds[:, 0])
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    batch = sharding.batch_sharding(mesh)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    placed = [jax.device_put(x, s) for x, s in ((sim_i2t, batch), (sim_t2i, batch), (ids, rows),
                                                (embeds, batch), (embeds[:, 0], batch))]
    assert len(placed[0].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        got = fn(jax.random.key(9), *placed)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # Negatives come from the whole global batch, not only the row's own shard of 2.
    shard_of = np.arange(n) // 2
    assert np.any(shard_of[np.asarray(got[0].text_for_image)] != shard_of)


@pytest.mark.parametrize("use_weights", [False, True])
def test_itm_loss_matches_torch_cross_entropy(use_weights):
    n = 4
    logits = np.random.default_rng(0).normal(size=(3 * n, 2)).astype(np.float32)
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)])
    weights = np.array([1] * n + [1, 0, 1, 1] + [0, 1, 1, 1], np.float32) if use_weights else None
    loss, metrics = matching.itm_loss(jnp.asarray(logits), None if weights is None else jnp.asarray(weights))
    per_pair = F.cross_entropy(torch.tensor(logits), labels, reduction="none").numpy()
    w = np.ones(3 * n) if weights is None else weights
    np.testing.assert_allclose(loss, (per_pair * w).sum() / w.sum(), rtol=1e-6)
    if weights is None:
        np.testing.assert_allclose(loss, F.cross_entropy(torch.tensor(logits), labels).item(), rtol=1e-6)
    correct = (logits.argmax(1) == labels.numpy()) * w
    np.testing.assert_allclose(metrics["itm_accuracy"], correct.sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["itm_positive_accuracy"], correct[:n].sum() / w[:n].sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["itm_negative_accuracy"], correct[n:].sum() / w[n:].sum(), rtol=1e-6)


def test_bad_input_is_named():
    sim = jnp.zeros((4, 4))
    with pytest.raises(ValueError, match=r"both be \(N, N\)"):
        matching.sample_hard_negatives(jax.random.key(0), sim[:, :3], sim[:, :3])
    with pytest.raises(ValueError, match=r"image_ids must be shaped \(N,\)"):
        matching.sample_hard_negatives(jax.random.key(0), sim, sim, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="floor must be >= 0"):
        matching.sample_hard_negatives(jax.random.key(0), sim, sim, floor=-1.0)
    with pytest.raises(ValueError, match=r"must be \(3N, 2\)"):
        matching.itm_loss(jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"weights must be shaped \(3N,\)"):
        matching.itm_loss(jnp.zeros((6, 2)), jnp.ones((5,)))
