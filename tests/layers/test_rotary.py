"""Rotary position embedding against transformers' implementations: LLaMA's dynamic NTK scaling
past the trained length, GPT-NeoX's partial rotation, and the relative-position property."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

from mmjax import layers

HEADS, HEAD_DIM = 2, 16


def _ours(q: np.ndarray, positions: np.ndarray, config: layers.RotaryConfig) -> np.ndarray:
    """Ours on torch's (B, heads, L, D) layout."""
    out = layers.apply_rotary(jnp.asarray(q.transpose(0, 2, 1, 3)), jnp.asarray(positions), config)
    return np.asarray(out).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("length", [12, 40], ids=["within", "beyond"])
def test_dynamic_scaling_matches_llama(length):
    """Up to the trained length (16) dynamic scaling changes nothing; beyond it the base grows."""
    config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, max_position_embeddings=16,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    q = np.random.default_rng(0).normal(size=(1, HEADS, length, HEAD_DIM)).astype(np.float32)
    positions = np.arange(length)[None]
    with torch.no_grad():
        cos, sin = LlamaRotaryEmbedding(config)(torch.from_numpy(q), torch.from_numpy(positions))
        want = llama_apply(torch.from_numpy(q), torch.from_numpy(q), cos, sin)[0].numpy()
    rotary = layers.RotaryConfig(scaling="dynamic", factor=2.0, max_positions=16)
    got = _ours(q, positions, rotary)
    diff = np.abs(got - want).max()
    print(f"\ndynamic rotary, {length} positions: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    plain = _ours(q, positions, layers.RotaryConfig())
    assert (np.abs(plain - got).max() > 1e-3) == (length > 16)


def test_partial_rotation_matches_gpt_neox():
    config = GPTNeoXConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, rope_parameters={
        "rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.25})
    q = np.random.default_rng(1).normal(size=(2, HEADS, 7, HEAD_DIM)).astype(np.float32)
    positions = np.stack([np.arange(7), np.arange(3, 10)])          # per-example positions
    with torch.no_grad():
        cos, sin = GPTNeoXRotaryEmbedding(config)(torch.from_numpy(q), torch.from_numpy(positions))
        want = neox_apply(torch.from_numpy(q), torch.from_numpy(q), cos, sin)[0].numpy()
    got = _ours(q, positions, layers.RotaryConfig(base=1000.0, fraction=0.25))
    assert np.abs(got - want).max() <= 1e-5
    np.testing.assert_array_equal(got[..., 4:], q[..., 4:])          # 3/4 of each head passes through


def test_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, HEAD_DIM)), jnp.float32) for _ in range(2))
    config = layers.RotaryConfig(scaling="linear", factor=4.0)
    score = lambda i, j: float((layers.apply_rotary(q, jnp.array([[i]]), config)
                                * layers.apply_rotary(k, jnp.array([[j]]), config)).sum())
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_bad_rotary_configs():
    with pytest.raises(ValueError, match="max_positions"):
        layers.RotaryConfig(scaling="dynamic")
    with pytest.raises(ValueError, match="Unknown rotary scaling"):
        layers.RotaryConfig(scaling="yarn")
    with pytest.raises(ValueError, match="fraction"):
        layers.RotaryConfig(fraction=0.0)
