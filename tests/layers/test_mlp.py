"""mmjax.layers.Mlp against NumPy with the module's own (random) kernels: exact GELU and the
gated kinds."""

import jax
import numpy as np
import pytest
from layer_helpers import as_float64, random_params
from scipy.special import erf

from mmjax import layers

ATOL = 2e-5


def test_mlp_matches_numpy_exact_gelu():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    module = layers.Mlp(mlp_dim=48)
    params = random_params(module, x, seed=8)
    got = np.asarray(module.apply({"params": params}, x))
    p = as_float64(params)
    h = x.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
    # The tanh approximation is measurably different at these magnitudes: "gelu" is exact.
    approx = layers.Mlp(mlp_dim=48, act="gelu_tanh").apply({"params": params}, x)
    assert np.abs(np.asarray(approx) - want).max() > 1e-5

    with pytest.raises(ValueError, match="Unknown activation"):
        layers.activation("gelu2")


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_mlp_matches_numpy(kind):
    """fc2(act(gate(x)) * fc1(x)): SiLU gate (LLaMA) or tanh-GELU gate (T5 v1.1), no biases."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    module = layers.Mlp(mlp_dim=24, act=kind, use_bias=False)
    params = random_params(module, x, seed=12)
    assert set(params) == {"gate", "fc1", "fc2"} and "bias" not in params["gate"]
    p = as_float64(params)
    gate = x.astype(np.float64) @ p["gate"]["kernel"]
    if kind == "swiglu":
        gate = gate / (1 + np.exp(-gate))
    else:
        gate = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
    want = (gate * (x @ p["fc1"]["kernel"])) @ p["fc2"]["kernel"]
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x)), want, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown activation"):
        layers.Mlp(mlp_dim=8, act="swiglu2").init(jax.random.key(0), x)
