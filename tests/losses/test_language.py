"""mmjax.losses.language: token cross-entropy against torch.nn.functional.cross_entropy
(ignore_index=-100, label smoothing 0.1 as BLIP's decoder), values and gradients; the causal
shift against BLIP/ALBEF's `logits[:, :-1]` vs `labels[:, 1:]`; the label masking of BLIP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmjax.losses import language


def _batch(b=3, length=7, vocab=11, seed=0, ignore_share=0.4):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=(b, length, vocab))).astype(np.float32)
    labels = rng.integers(0, vocab, size=(b, length))
    labels[rng.random((b, length)) < ignore_share] = -100
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_matches_torch_cross_entropy(smoothing):
    logits, labels = _batch()
    loss, metrics = language.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
    t_logits = torch.tensor(logits, requires_grad=True)
    want = F.cross_entropy(t_logits.reshape(-1, 11), torch.tensor(labels).reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)
    np.testing.assert_allclose(loss, want.item(), rtol=1e-6)
    want.backward()
    grad = jax.grad(lambda x: language.token_cross_entropy(x, jnp.asarray(labels), smoothing)[0])(jnp.asarray(logits))
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), atol=1e-7)
    scored = labels != -100
    np.testing.assert_allclose(metrics["token_accuracy"], np.mean(logits.argmax(-1)[scored] == labels[scored]))
    assert metrics["scored_tokens"] == scored.sum()


def test_per_token_sums_are_blips_per_sequence_loss():
    """BLIP's decoder with reduction='none', then .view(bs, -1).sum(1) (answer ranking in VQA)."""
    logits, labels = _batch(seed=1)
    got = language.per_token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1).sum(-1)
    want = F.cross_entropy(torch.tensor(logits).reshape(-1, 11), torch.tensor(labels).reshape(-1),
                           ignore_index=-100, label_smoothing=0.1, reduction="none").view(3, -1).sum(1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_causal_shift_matches_slicing_the_logits():
    logits, labels = _batch(seed=2, ignore_share=0.2)
    shifted = language.causal_lm_labels(jnp.asarray(labels))
    np.testing.assert_array_equal(shifted[:, :-1], labels[:, 1:])
    np.testing.assert_array_equal(shifted[:, -1], -100)
    loss, _ = language.token_cross_entropy(jnp.asarray(logits), shifted, 0.1)
    want = F.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 11), torch.tensor(labels[:, 1:]).reshape(-1),
                           ignore_index=-100, label_smoothing=0.1)
    np.testing.assert_allclose(loss, want.item(), rtol=1e-6)


def test_labels_from_tokens_masks_padding_and_the_prompt():
    """BLIP: targets = ids.masked_fill(ids == pad, -100); targets[:, :prompt_length] = -100."""
    tokens = np.array([[101, 5, 6, 7, 8, 102], [101, 9, 10, 102, 0, 0]])
    mask = (tokens != 0).astype(np.int32)
    want = np.where(tokens == 0, -100, tokens)
    want[:, :2] = -100
    np.testing.assert_array_equal(language.labels_from_tokens(jnp.asarray(tokens), jnp.asarray(mask), 2), want)


def test_nothing_scored_gives_zero_not_nan():
    logits, labels = _batch()
    loss, metrics = language.token_cross_entropy(jnp.asarray(logits), jnp.full(labels.shape, -100), 0.1)
    assert loss == 0.0 and metrics["token_accuracy"] == 0.0
    grad = jax.grad(lambda x: language.token_cross_entropy(x, jnp.full(labels.shape, -100))[0])(jnp.asarray(logits))
    assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_bfloat16_logits_are_scored_in_float32():
    logits, labels = _batch(seed=3)
    low = jnp.asarray(logits, jnp.bfloat16)
    loss, _ = language.token_cross_entropy(low, jnp.asarray(labels))
    want, _ = language.token_cross_entropy(low.astype(jnp.float32), jnp.asarray(labels))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_bad_input_is_named():
    logits, labels = _batch()
    with pytest.raises(ValueError, match=r"must be labels.shape \+ \(vocab,\)"):
        language.token_cross_entropy(jnp.asarray(logits[:, :-1]), jnp.asarray(labels))
    with pytest.raises(ValueError, match="labels must be integer"):
        language.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.float32))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        language.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 1.0)
    with pytest.raises(ValueError, match="prefix_length 9 is outside"):
        language.labels_from_tokens(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4)), 9)
