"""BEiT's blockwise masking in JAX: budget, determinism, and the same distribution as the
reference generator (transformers' FlavaMaskingGenerator, a port of BEiT's MaskingGenerator)."""

import random

import jax
import numpy as np
import pytest

from mmjax.data import masking

SAMPLES = 1000
_masks = jax.jit(lambda key: masking.block_masks(key, SAMPLES))


@pytest.fixture(scope="module")
def ours():
    return np.asarray(_masks(jax.random.key(0)))


@pytest.fixture(scope="module")
def reference():
    from transformers.models.flava.image_processing_flava import FlavaMaskingGenerator
    random.seed(0)
    generate = FlavaMaskingGenerator(input_size=14, total_mask_patches=75, mask_group_min_patches=16,
                                     mask_group_min_aspect_ratio=0.3)
    return np.stack([generate().numpy().reshape(-1).astype(bool) for _ in range(SAMPLES)])


def test_budget_shape_and_determinism(ours):
    assert ours.shape == (SAMPLES, 196) and ours.dtype == bool
    counts = ours.sum(1)
    assert counts.max() <= 75 and counts.min() >= 16
    np.testing.assert_array_equal(ours, np.asarray(_masks(jax.random.key(0))))
    assert not np.array_equal(ours, np.asarray(_masks(jax.random.key(1))))
    with pytest.raises(ValueError, match="num_masking_patches"):
        masking.block_mask(jax.random.key(0), (4, 4), num_masking_patches=17)


def test_same_distribution_as_beit_reference(ours, reference):
    """Mask sizes, how often the full 75 is reached, and where masks fall match the reference."""
    counts, ref_counts = ours.sum(1), reference.sum(1)
    print(f"\nblock masks: mean size {counts.mean():.2f} (reference {ref_counts.mean():.2f}), "
          f"full 75 in {np.mean(counts == 75):.3f} (reference {np.mean(ref_counts == 75):.3f})")
    assert abs(counts.mean() - ref_counts.mean()) < 0.5
    assert abs(np.mean(counts == 75) - np.mean(ref_counts == 75)) < 0.06
    # Per-position masking frequency, pooled over 2x2 cells (σ ≈ 0.008 per cell at 1000 samples).
    def cells(masks):
        return masks.reshape(-1, 7, 2, 7, 2).mean(axis=(0, 2, 4))
    assert np.abs(cells(ours) - cells(reference)).max() < 0.05
    # Blocks are rectangles of at least 16 patches: masked runs along a row are long (≈1.6 for
    # random masking of the same share).
    def mean_run_length(masks):
        rows = masks.reshape(-1, 14, 14)
        starts = rows[..., 0].sum() + (rows[..., 1:] & ~rows[..., :-1]).sum()
        return rows.sum() / starts
    print(f"mean masked run length {mean_run_length(ours):.2f} (reference {mean_run_length(reference):.2f})")
    assert abs(mean_run_length(ours) - mean_run_length(reference)) < 0.3
