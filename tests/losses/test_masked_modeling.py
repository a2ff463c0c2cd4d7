"""Masked-modeling losses: MAE's pixel loss and BEiT's token loss, checked by hand and against
the reference formulas (torch's unbiased variance and CrossEntropyLoss over masked tokens)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax.losses import masked_modeling


def _data(seed=0):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(3, 10, 12)).astype(np.float32)
    target = rng.normal(size=(3, 10, 12)).astype(np.float32)
    mask = (rng.uniform(size=(3, 10)) < 0.6).astype(np.float32)
    return pred, target, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mim_pixels_matches_mae_reference_formula(norm_pix):
    pred, target, mask = _data()
    t = torch.from_numpy(target)
    if norm_pix:       # models_mae.py: (target - mean) / (var + 1e-6) ** 0.5 with torch's unbiased var
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((torch.from_numpy(pred) - t) ** 2).mean(-1)
    expected = float((per_patch * torch.from_numpy(mask)).sum() / torch.from_numpy(mask).sum())
    loss, metrics = masked_modeling.mim_pixels(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask),
                                               norm_pix=norm_pix)
    assert abs(float(loss) - expected) < 1e-5
    assert abs(float(metrics["masked_share"]) - mask.mean()) < 1e-6


def test_mim_pixels_ignores_visible_patches_and_handles_no_mask():
    pred, target, mask = _data(1)
    changed = pred.copy()
    changed[mask == 0] += 100.0           # visible patches do not count
    a, _ = masked_modeling.mim_pixels(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    b, _ = masked_modeling.mim_pixels(jnp.asarray(changed), jnp.asarray(target), jnp.asarray(mask))
    assert abs(float(a) - float(b)) < 1e-5
    zero, _ = masked_modeling.mim_pixels(jnp.asarray(pred), jnp.asarray(target), jnp.zeros((3, 10)))
    assert float(zero) == 0.0
    with pytest.raises(ValueError, match="pred .* and target"):
        masked_modeling.mim_pixels(jnp.asarray(pred), jnp.asarray(target[..., :6]), jnp.asarray(mask))
    with pytest.raises(ValueError, match="mask"):
        masked_modeling.mim_pixels(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask[:, :5]))


def test_mim_tokens_matches_cross_entropy_over_masked_tokens():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 7))
    mask = rng.uniform(size=(2, 7)) < 0.5
    mask[0, 0] = True
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits[mask]), torch.from_numpy(targets[mask]))
    loss, metrics = masked_modeling.mim_tokens(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert abs(float(loss) - float(expected)) < 1e-5
    accuracy = (logits.argmax(-1) == targets)[mask].mean()
    assert abs(float(metrics["masked_accuracy"]) - accuracy) < 1e-6
    with pytest.raises(ValueError, match="do not match targets"):
        masked_modeling.mim_tokens(jnp.asarray(logits), jnp.asarray(targets[:, :3]), jnp.asarray(mask))
