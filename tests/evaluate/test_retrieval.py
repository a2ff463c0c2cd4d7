"""mmjax.evaluate.retrieval.recall_at_k on constructed embeddings whose rankings are known."""

import numpy as np
import pytest

from mmjax.evaluate.retrieval import recall_at_k, similarities


def _gaussian(n, d=64, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def _angles(degrees):
    rad = np.deg2rad(np.asarray(degrees, float))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_identity_embeddings_are_perfect():
    emb = _gaussian(7)
    out = recall_at_k(emb, emb.copy(), ks=(1, 5, 10))
    assert out == {f"{d}_r{k}": 1.0 for k in (1, 5, 10) for d in ("i2t", "t2i")}
    # Scale does not matter (embeddings are normalised).
    assert recall_at_k(3.0 * np.eye(5), 0.5 * np.eye(5), ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}


def test_ranks_known_by_geometry():
    """Images at 0°, 30°, ..., 150°; caption j sits at image j's angle + 40°.

    Caption j (t2i): image j+1 is 10° away, j+2 20°, its own image j 40° → rank 2 for j ≤ 3;
    caption 4 has only image 5 closer (rank 1); caption 5's own image is closest (rank 0).
    Image i (i2t): caption i is 40° away; captions i-1 (10°) and i-2 (20°) are closer, when they
    exist → rank 0, 1, 2, 2, 2, 2.
    """
    theta = np.arange(6) * 30
    out = recall_at_k(_angles(theta), _angles(theta + 40), ks=(1, 2, 3, 4))
    assert out["t2i_r1"] == pytest.approx(1 / 6)
    assert out["t2i_r2"] == pytest.approx(2 / 6)
    assert out["t2i_r3"] == 1.0 and out["t2i_r4"] == 1.0
    assert out["i2t_r1"] == pytest.approx(1 / 6)
    assert out["i2t_r2"] == pytest.approx(2 / 6)
    assert out["i2t_r3"] == 1.0 and out["i2t_r4"] == 1.0


def test_shuffled_captions():
    """Caption j is a copy of image perm[j]: with the default mapping only fixed points of perm
    are found at rank 0; passing text_to_image=perm makes retrieval perfect again."""
    perm = np.array([1, 0, 2, 4, 5, 3])                       # fixed point: 2 only
    images = _gaussian(6, seed=1)
    texts = images[perm]
    out = recall_at_k(images, texts, ks=(1,))
    assert out == {"i2t_r1": pytest.approx(1 / 6), "t2i_r1": pytest.approx(1 / 6)}
    fixed = recall_at_k(images, texts, ks=(1, 5), text_to_image=perm)
    assert all(v == 1.0 for v in fixed.values())
    assert recall_at_k(images, texts, ks=(6,)) == {"i2t_r6": 1.0, "t2i_r6": 1.0}


def test_shuffled_two_level_ranks():
    """Caption j = 3·e_perm[j] + 2·e_j: its own image is second (rank 1) unless perm[j] == j,
    and for image i the caption perm⁻¹(i) outranks caption i the same way."""
    perm = np.array([2, 0, 1, 3, 4])                          # fixed points 3 and 4
    images = np.eye(5)
    texts = 3.0 * np.eye(5)[perm] + 2.0 * np.eye(5)
    out = recall_at_k(images, texts, ks=(1, 2))
    assert out["t2i_r1"] == pytest.approx(2 / 5) and out["i2t_r1"] == pytest.approx(2 / 5)
    assert out["t2i_r2"] == 1.0 and out["i2t_r2"] == 1.0


def test_multiple_captions_per_image():
    rng = np.random.default_rng(2)
    images = _gaussian(3, d=32, seed=3)
    owner = np.array([0, 0, 1, 1, 2, 2])
    texts = images[owner] + 0.1 * rng.normal(size=(6, 32))
    assert all(v == 1.0 for v in recall_at_k(images, texts, ks=(1,), text_to_image=owner).values())

    # Caption 1 (of image 0) is replaced by an exact copy of image 2: caption 1 misses at R@1
    # (t2i 5/6), and image 2's best caption is now caption 1, which is not its own (i2t 2/3);
    # image 0 still has caption 0 at rank 0.
    texts[1] = images[2]
    out = recall_at_k(images, texts, ks=(1, 2, 3), text_to_image=owner)
    assert out["t2i_r1"] == pytest.approx(5 / 6) and out["t2i_r3"] == 1.0
    assert out["i2t_r1"] == pytest.approx(2 / 3) and out["i2t_r2"] == 1.0


def test_image_without_captions_misses_at_small_k():
    images = _gaussian(3, seed=4)
    owner = np.array([0, 0, 1, 1])
    out = recall_at_k(images, images[owner], ks=(1, 3), text_to_image=owner)
    assert out["i2t_r1"] == pytest.approx(2 / 3) and out["i2t_r3"] == pytest.approx(2 / 3)
    assert out["t2i_r1"] == 1.0


def test_image_without_captions_never_hits_i2t():
    """recall_at_k defines an image without captions as a miss at every K (its first hit is
    at rank "infinity") that still counts in the i2t denominator; it is not rejected. So at
    K=10, beyond the 4 captions, i2t is 2/3, not 1; t2i is unaffected."""
    images = _gaussian(3, seed=4)
    owner = np.array([0, 0, 1, 1])
    out = recall_at_k(images, images[owner], ks=(1, 10), text_to_image=owner)
    assert out == {"i2t_r1": pytest.approx(2 / 3), "i2t_r10": pytest.approx(2 / 3),
                   "t2i_r1": 1.0, "t2i_r10": 1.0}


@pytest.mark.parametrize("mapping", [np.array([0, 1, 2]), np.array([0, 1, 2, 5]),
                                     np.array([[0, 1], [2, 3]])])
def test_bad_mapping_raises(mapping):
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(np.eye(4), np.eye(4), text_to_image=mapping)


def test_negative_mapping_raises():
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(np.eye(4), np.eye(4), text_to_image=np.array([0, 1, 2, -1]))


def test_several_embeddings_per_image_score_a_text_by_the_best_one():
    """BLIP-2's ITC at test time: image 0's second query matches text 1, image 1's first text 0."""
    images = np.array([[[1.0, 0.0], [0.0, 2.0]], [[0.6, 0.8], [-1.0, 0.0]]])     # (2 images, 2 queries, 2)
    texts = np.array([[0.6, 0.8], [0.0, 1.0]])
    np.testing.assert_allclose(similarities(images, texts), [[0.8, 1.0], [1.0, 0.8]])
    assert recall_at_k(images, texts, ks=(1,)) == {"i2t_r1": 0.0, "t2i_r1": 0.0}
