"""Soft (float) targets in mmjax.losses.classification against torch / timm / optax, and the
shape and dtype errors. (Integer-label cases are in test_contrastive.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mmjax.losses import classification

N, K = 8, 7


def _soft(seed=0):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(N, K))).astype(np.float32)
    targets = rng.dirichlet(np.full(K, 0.5), size=N).astype(np.float32)
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_softmax_xent_matches_torch_and_timm(smoothing):
    from timm.loss import SoftTargetCrossEntropy
    logits, targets = _soft()
    got = float(classification.softmax_xent(jnp.asarray(logits), jnp.asarray(targets), smoothing))
    ref_torch = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets),
                                                  label_smoothing=smoothing).item()
    smoothed = targets * (1 - smoothing) + smoothing / K   # timm folds smoothing into the targets
    ref_timm = SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(smoothed)).item()
    ref_optax = float(optax.softmax_cross_entropy(logits, smoothed).mean())
    diffs = [abs(got - r) for r in (ref_torch, ref_timm, ref_optax)]
    print(f"\nsoft softmax_xent (smoothing {smoothing}) vs torch / timm / optax: max-abs-diff {max(diffs):.1e}")
    assert max(diffs) < 1e-5


def test_soft_sigmoid_xent_matches_torch():
    logits, targets = _soft(1)
    got = float(classification.sigmoid_xent(jnp.asarray(logits), jnp.asarray(targets)))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(targets), reduction="sum").item() / N
    print(f"\nsoft sigmoid_xent vs torch: abs diff {abs(got - ref):.1e}")
    assert abs(got - ref) < 1e-5


@pytest.mark.parametrize("name", ["softmax_xent", "sigmoid_xent"])
def test_one_hot_targets_equal_integer_labels(name):
    logits, _ = _soft(2)
    labels = np.arange(N) % K
    fn = classification.LOSSES[name]
    one_hot = jax.nn.one_hot(labels, K)
    np.testing.assert_allclose(fn(jnp.asarray(logits), one_hot), fn(jnp.asarray(logits), jnp.asarray(labels)),
                               rtol=1e-6)


@pytest.mark.parametrize("labels,match", [
    (jnp.zeros((N, K + 1)), "Soft .* shaped like the logits"),
    (jnp.zeros((N,)), "Soft .* shaped like the logits"),
    (jnp.zeros((N, K), jnp.int32), r"Integer labels must be shaped logits.shape\[:-1\]"),
    (jnp.zeros((N,), bool), "integer class ids or float soft targets"),
])
@pytest.mark.parametrize("name", ["softmax_xent", "sigmoid_xent"])
def test_bad_targets_raise(name, labels, match):
    with pytest.raises(ValueError, match=match):
        classification.LOSSES[name](jnp.zeros((N, K)), labels)
