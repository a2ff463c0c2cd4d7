"""mmjax.losses.distillation: ALBEF's momentum distillation against torch written as ALBEF's
model_pretrain.py / model_retrieval.py / xbert.py state it; α = 0 is the plain loss exactly; no
gradient reaches the teacher; the ITC form agrees with contrastive_queue.itc_queue_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmjax.losses import contrastive_queue, distillation, language


def _logits(n=6, m=14, seed=0):
    rng = np.random.default_rng(seed)
    return [(3 * rng.normal(size=(n, m))).astype(np.float32) for _ in range(4)]


def _torch_itc(li2t, lt2i, ti2t, tt2i, alpha, targets):
    """ALBEF: sim_targets (one-hot, or pos_idx / pos_idx.sum(1)); soft = α·softmax(sim_m) + (1-α)·targets."""
    t = [torch.tensor(x, dtype=torch.float64) for x in (li2t, lt2i, ti2t, tt2i)]
    targets = torch.tensor(targets, dtype=torch.float64)
    i2t_targets = alpha * F.softmax(t[2], dim=1) + (1 - alpha) * targets
    t2i_targets = alpha * F.softmax(t[3], dim=1) + (1 - alpha) * targets
    loss_i2t = -torch.sum(F.log_softmax(t[0], dim=1) * i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(t[1], dim=1) * t2i_targets, dim=1).mean()
    return ((loss_i2t + loss_t2i) / 2).item()


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("with_ids", [False, True])
def test_itc_matches_albef(alpha, with_ids):
    n, m = 6, 14
    logits = _logits(n, m)
    positives = None
    targets = np.eye(n, m)
    if with_ids:   # ALBEF retrieval: idx of the batch, then the idx queue
        idx_all = np.array([0, 0, 1, 2, 3, 3, 0, 5, 6, 1, 7, 8, 9, 3])
        positives = idx_all[:n, None] == idx_all[None, :]
        targets = positives / positives.sum(1, keepdims=True)
    loss, _ = distillation.itc_distill_loss(*map(jnp.asarray, logits), alpha,
                                            None if positives is None else jnp.asarray(positives))
    np.testing.assert_allclose(loss, _torch_itc(*logits, alpha, targets), rtol=1e-5)


def test_alpha_zero_is_the_plain_loss_exactly():
    logits = [jnp.asarray(x) for x in _logits()]
    hard = distillation.contrastive_targets(logits[0].shape)
    plain = (distillation.soft_cross_entropy(logits[0], hard).mean()
             + distillation.soft_cross_entropy(logits[1], hard).mean()) / 2
    for alpha in (0.0, jnp.float32(0.0)):   # a Python zero and a traced one
        got = jax.jit(distillation.itc_distill_loss)(*logits, alpha)[0]
        np.testing.assert_array_equal(got, plain)
    np.testing.assert_allclose(plain, _torch_itc(*map(np.asarray, logits), 0.0, np.eye(6, 14)), rtol=1e-5)

    mlm_logits, labels = _mlm_batch()
    teacher = jnp.asarray(np.random.default_rng(9).normal(size=mlm_logits.shape), jnp.float32)
    want, _ = language.token_cross_entropy(mlm_logits, labels)
    for alpha in (0.0, jnp.float32(0.0)):
        got, _ = jax.jit(distillation.mlm_distill_loss)(mlm_logits, teacher, labels, alpha)
        np.testing.assert_array_equal(got, want)


def _mlm_batch(seed=0, vocab=13):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=(2, 9, vocab))).astype(np.float32)
    labels = rng.integers(0, vocab, size=(2, 9))
    labels[rng.random((2, 9)) > 0.3] = -100      # ~30% of the tokens masked and scored
    labels[0, 0] = 4
    return jnp.asarray(logits), jnp.asarray(labels)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_mlm_matches_albef_xbert(alpha):
    logits, labels = _mlm_batch(seed=1)
    teacher = np.random.default_rng(2).normal(size=logits.shape).astype(np.float32)
    loss, metrics = distillation.mlm_distill_loss(logits, jnp.asarray(teacher), labels, alpha)
    # xbert.BertForMaskedLM: CrossEntropyLoss() + loss_distill[labels != -100].mean(), mixed by α.
    t_logits = torch.tensor(np.asarray(logits), requires_grad=True)
    t_labels = torch.tensor(np.asarray(labels), dtype=torch.long)
    soft_labels = F.softmax(torch.tensor(teacher), dim=-1)
    masked_lm_loss = F.cross_entropy(t_logits.view(-1, 13), t_labels.view(-1))
    loss_distill = -torch.sum(F.log_softmax(t_logits, dim=-1) * soft_labels, dim=-1)
    loss_distill = loss_distill[t_labels != -100].mean()
    want = (1 - alpha) * masked_lm_loss + alpha * loss_distill
    np.testing.assert_allclose(loss, want.item(), rtol=1e-6)
    np.testing.assert_allclose(metrics["mlm_distill_loss"], loss_distill.item(), rtol=1e-6)
    want.backward()
    grad = jax.grad(lambda x: distillation.mlm_distill_loss(x, jnp.asarray(teacher), labels, alpha)[0])(logits)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), atol=1e-7)


def test_no_gradient_reaches_the_teacher():
    logits = [jnp.asarray(x) for x in _logits()]
    grads = jax.grad(lambda *a: distillation.itc_distill_loss(*a, 0.4)[0], argnums=(0, 1, 2, 3))(*logits)
    assert np.any(grads[0]) and np.any(grads[1])
    assert not np.any(grads[2]) and not np.any(grads[3])
    mlm_logits, labels = _mlm_batch()
    g = jax.grad(lambda t: distillation.mlm_distill_loss(mlm_logits, t, labels, 0.4)[0])(mlm_logits + 1.0)
    assert not np.any(g)


def test_itc_agrees_with_the_queue_loss():
    """contrastive_queue.itc_queue_loss(distill=α) == itc_distill_loss on the same logits."""
    rng = np.random.default_rng(4)
    unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.normal(size=s)).astype(np.float32)
    zimg, ztxt, zimg_m, ztxt_m, iq, tq = unit(8, 5), unit(8, 5), unit(8, 5), unit(8, 5), unit(16, 5), unit(16, 5)
    scale = 1 / 0.07
    want, _ = contrastive_queue.itc_queue_loss(zimg, ztxt, zimg_m, ztxt_m, iq, tq, jnp.float32(scale), distill=0.4)
    texts_all, images_all = np.concatenate([ztxt_m, tq]), np.concatenate([zimg_m, iq])
    got, _ = distillation.itc_distill_loss(scale * zimg @ texts_all.T, scale * ztxt @ images_all.T,
                                           scale * zimg_m @ texts_all.T, scale * ztxt_m @ images_all.T, 0.4)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_alpha_ramps_over_the_first_epoch_as_albef():
    np.testing.assert_allclose([distillation.distill_alpha(s, 0.4, 100) for s in (0, 25, 100, 500)],
                               [0.0, 0.1, 0.4, 0.4], rtol=1e-6)
    assert distillation.distill_alpha(0, 0.4, 0) == np.float32(0.4)


def test_bad_input_is_named():
    logits = [jnp.asarray(x) for x in _logits()]
    with pytest.raises(ValueError, match="must hold each row's own pair"):
        distillation.contrastive_targets((6, 4))
    with pytest.raises(ValueError, match="positives must be shaped like the logits"):
        distillation.itc_distill_loss(*logits, 0.4, positives=jnp.ones((6, 6), bool))
    with pytest.raises(ValueError, match="teacher logits"):
        distillation.mlm_distill_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), 0.4)
