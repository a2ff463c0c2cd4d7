"""ViLT's word–patch alignment by IPOT (mmjax/losses/ipot.py) against two independent references:

* the paper's algorithm (Xie et al. 2019, Algorithm 1) in float64 numpy, run on each example's
  valid tokens only (no masks at all), so the masked, fixed-shape version must agree with it;
* ViLT's padded formulation (vilt/modules/objectives.py: plan laid out image × text, padding
  handled by zero-filled kernels and a 1e4 offset in the denominators), restated in torch;
plus invariants: a constant cost gives the uniform plan, the text marginal is exact, padding
changes nothing, no gradient flows through the plan, and the loss's sign convention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax.losses import ipot

BETA, ITERATIONS = 0.5, 50


def paper_ipot(cost: np.ndarray, beta: float = BETA, iterations: int = ITERATIONS) -> np.ndarray:
    """Algorithm 1 of the IPOT paper with uniform marginals, one inner step: cost (n, m) of the n
    source points (ViLT passes the image patches) and m targets (the words) -> plan (n, m)."""
    n, m = cost.shape
    mu, nu = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    kernel = np.exp(-cost / beta)
    plan, b = np.ones((n, m)), np.full(m, 1.0 / m)
    for _ in range(iterations):
        q = kernel * plan
        a = mu / (q @ b)
        b = nu / (q.T @ a)
        plan = a[:, None] * q * b[None, :]
    return plan


def paper_distance(x: np.ndarray, y: np.ndarray) -> float:
    xn = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-5)
    yn = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-5)
    cost = 1.0 - yn @ xn.T      # patches x words
    return float(np.sum(cost * paper_ipot(cost)))


def vilt_style_distance(txt, img, txt_pad, img_pad, beta=BETA, iterations=ITERATIONS):
    """ViLT's padded computation (text x on rows, the plan stored image × text), in torch."""
    txt, img = torch.tensor(txt, dtype=torch.float64), torch.tensor(img, dtype=torch.float64)
    txt_pad, img_pad = torch.tensor(txt_pad), torch.tensor(img_pad)
    cost = 1 - torch.nn.functional.normalize(txt, dim=-1, eps=1e-5) @ \
        torch.nn.functional.normalize(img, dim=-1, eps=1e-5).transpose(1, 2)
    joint_pad = txt_pad[:, :, None] | img_pad[:, None, :]
    cost = cost.masked_fill(joint_pad, 0)
    b, m, n = cost.shape
    x_len = (m - txt_pad.sum(1)).double()[:, None, None]
    y_len = (n - img_pad.sum(1)).double()[:, None, None]
    sigma = (torch.ones(b, m, dtype=torch.float64) / x_len[:, :, 0]).masked_fill(txt_pad, 0).view(b, m, 1)
    plan = torch.ones(b, n, m, dtype=torch.float64).masked_fill(joint_pad.transpose(1, 2), 0)
    kernel = torch.exp(-cost.transpose(1, 2) / beta).masked_fill(joint_pad.transpose(1, 2), 0)
    x_off, y_off = (txt_pad.double() * 1e4)[:, None], (img_pad.double() * 1e4)[:, None]
    for _ in range(iterations):
        q = kernel * plan
        delta = 1 / (y_len * (q @ sigma.view(b, m, 1)).view(b, 1, n) + y_off)
        sigma = 1 / (x_len * (delta @ q) + x_off)
        plan = delta.view(b, n, 1) * q * sigma
    plan = plan.masked_fill(joint_pad.transpose(1, 2), 0)
    return torch.diagonal(cost @ plan, dim1=1, dim2=2).sum(-1).numpy()


def _inputs(seed=0, b=3, m=7, n=9, d=8):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(b, m, d)).astype(np.float32), rng.normal(size=(b, n, d)).astype(np.float32)
    x_valid = np.arange(m)[None] < np.array([7, 4, 2])[:b, None]
    y_valid = np.arange(n)[None] < np.array([9, 9, 5])[:b, None]
    return x, y, x_valid, y_valid


def test_distance_equals_the_papers_algorithm_on_the_valid_tokens():
    x, y, x_valid, y_valid = _inputs()
    got = np.asarray(jax.jit(ipot.ot_distance)(x, y, x_valid, y_valid))
    want = [paper_distance(x[i][x_valid[i]].astype(np.float64), y[i][y_valid[i]].astype(np.float64))
            for i in range(len(x))]
    print("max |mmjax - paper| =", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_distance_equals_vilts_padded_formulation():
    x, y, x_valid, y_valid = _inputs(seed=1)
    got = np.asarray(ipot.ot_distance(x, y, x_valid, y_valid))
    want = vilt_style_distance(x.astype(np.float64), y.astype(np.float64), ~x_valid, ~y_valid)
    print("max |mmjax - vilt-style| =", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_constant_cost_gives_the_uniform_plan_on_the_valid_block():
    _, _, x_valid, y_valid = _inputs()
    cost = jnp.full(x_valid.shape + y_valid.shape[-1:], 0.3)
    plan = np.asarray(ipot.ipot_plan(cost, x_valid, y_valid))
    for i in range(len(plan)):
        m, n = x_valid[i].sum(), y_valid[i].sum()
        block = plan[i][np.ix_(x_valid[i], y_valid[i])]
        np.testing.assert_allclose(block, 1.0 / (m * n), rtol=1e-5)
        assert plan[i].sum() == pytest.approx(1.0, rel=1e-5)
        assert np.all(plan[i][~x_valid[i]] == 0) and np.all(plan[i][:, ~y_valid[i]] == 0)


def test_plan_has_the_uniform_text_marginal_and_zero_on_padding():
    x, y, x_valid, y_valid = _inputs(seed=2)
    plan = np.asarray(ipot.ipot_plan(ipot.cosine_cost(x, y), x_valid, y_valid))
    for i in range(len(plan)):
        np.testing.assert_allclose(plan[i].sum(1)[x_valid[i]], 1.0 / x_valid[i].sum(), rtol=1e-5)
        assert np.all(plan[i][~x_valid[i]] == 0) and np.all(plan[i][:, ~y_valid[i]] == 0)


def test_padding_values_change_nothing():
    x, y, x_valid, y_valid = _inputs(seed=3)
    x2, y2 = x.copy(), y.copy()
    x2[~x_valid], y2[~y_valid] = 1e3, -7.0
    np.testing.assert_allclose(ipot.ot_distance(x2, y2, x_valid, y_valid), ipot.ot_distance(x, y, x_valid, y_valid),
                               rtol=1e-6)


def test_no_gradient_flows_through_the_plan():
    x, y, x_valid, y_valid = _inputs(seed=4)
    plan = ipot.ipot_plan(ipot.cosine_cost(x, y), x_valid, y_valid)
    grad = jax.grad(lambda x: ipot.ot_distance(x, y, x_valid, y_valid).sum())(x)
    want = jax.grad(lambda x: jnp.sum(ipot.cosine_cost(x, y) * plan))(x)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[~x_valid] == 0) and np.abs(np.asarray(grad)).sum() > 0


def test_text_alignment_mask_drops_cls_and_the_last_real_token():
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    want = np.array([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(ipot.text_alignment_mask(mask), want)


def test_wpa_loss_is_positives_minus_negatives_over_the_batch():
    distance = jnp.array([1.0, 2.0, 4.0, 8.0])
    assert float(ipot.wpa_loss(distance, jnp.array([1, 0, 1, 0]))) == pytest.approx((1 + 4 - 2 - 8) / 4)
    with pytest.raises(ValueError, match="ITM labels"):
        ipot.wpa_loss(distance, jnp.array([1, 0]))


def test_bad_shapes_and_settings_are_named():
    cost = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="x_valid"):
        ipot.ipot_plan(cost, jnp.ones((2, 4), bool), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="beta"):
        ipot.ipot_plan(cost, jnp.ones((2, 3), bool), jnp.ones((2, 4), bool), beta=0.0)
