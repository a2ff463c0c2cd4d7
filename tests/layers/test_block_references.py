"""The block's variants against transformers' layers with random weights copied in (float32):
BertLayer (post-LN, causal self-attention with padding, cross-attention with its own padding
mask), LlamaDecoderLayer (RMSNorm, SwiGLU, grouped-query attention, rotary with linear scaling,
causal + padding) and T5LayerFF (T5's RMS norm, gated tanh-GELU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_weights
from transformers import BertConfig, LlamaConfig, T5Config
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.t5.modeling_t5 import T5LayerFF

from mmjax import layers

WIDTH, HEADS, MLP = 32, 4, 48
VALID = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)       # right-padded second example
CONTEXT_VALID = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (biases and norm scales included), so that no zero or one hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name.lower() else 0.2 * noise)
    return module.eval()


def _additive(allowed: np.ndarray) -> torch.Tensor:
    """A boolean (B, 1, Q, K) mask as transformers' eager attention adds it to the logits."""
    return torch.from_numpy(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))


def _check_tree(block: layers.Block, params: dict, *args, **kwargs) -> None:
    """The copied parameters have exactly the tree and shapes the block creates."""
    want = nn.meta.unbox(jax.eval_shape(lambda *a: block.init(jax.random.key(0), *a, **kwargs), *args))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, want)


def _report(name: str, got, want) -> float:
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"\n{name}: max abs diff {diff:.2e}")
    return diff


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 6, WIDTH)).astype(np.float32),
            rng.normal(size=(2, 5, WIDTH)).astype(np.float32))


def test_bert_layer_post_ln_with_cross_attention(inputs):
    x, context = inputs
    config = BertConfig(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=MLP, is_decoder=True,
                        add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")
    ref = _randomize(BertLayer(config), seed=1)
    causal = np.tril(np.ones((6, 6), bool))[None, None]
    with torch.no_grad():
        want = ref(torch.from_numpy(x), attention_mask=_additive(causal & VALID[:, None, None, :]),
                   encoder_hidden_states=torch.from_numpy(context),
                   encoder_attention_mask=_additive(CONTEXT_VALID[:, None, None, :])).numpy()
    block = layers.Block(layers.BlockConfig(num_heads=HEADS, mlp_dim=MLP, norm="post", norm_eps=config.layer_norm_eps,
                                            causal=True, cross_attention=True))
    params = torch_weights.bert_layer(ref, HEADS)
    kwargs = dict(mask=jnp.asarray(VALID), context=context, context_mask=jnp.asarray(CONTEXT_VALID))
    _check_tree(block, params, x, **kwargs)
    got = jax.jit(lambda p: block.apply({"params": p}, x, **kwargs))(params)
    assert _report("BertLayer (post-LN, causal + padding, cross-attention)", got, want) <= 1e-5


def test_llama_decoder_layer(inputs):
    x, _ = inputs
    config = LlamaConfig(hidden_size=WIDTH, intermediate_size=MLP, num_attention_heads=HEADS, num_key_value_heads=2,
                         rms_norm_eps=1e-6, max_position_embeddings=64, attn_implementation="eager",
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    ref = _randomize(LlamaDecoderLayer(config, layer_idx=0), seed=2)
    positions = torch.arange(6)[None]
    causal = np.tril(np.ones((6, 6), bool))[None, None]
    with torch.no_grad():
        cos_sin = LlamaRotaryEmbedding(config)(torch.from_numpy(x), positions)
        want = ref(torch.from_numpy(x), attention_mask=_additive(causal & VALID[:, None, None, :]),
                   position_ids=positions, position_embeddings=cos_sin).numpy()
    block = layers.Block(layers.BlockConfig(
        num_heads=HEADS, num_kv_heads=2, mlp_dim=MLP, norm_kind="rmsnorm", norm_eps=1e-6, mlp="swiglu",
        mlp_bias=False, q_bias=False, k_bias=False, v_bias=False, out_bias=False, causal=True,
        rotary=dict(base=500.0, scaling="linear", factor=2.0)))
    params = torch_weights.llama_layer(ref, HEADS, 2)
    _check_tree(block, params, x)
    assert params["attn"]["key"]["kernel"].shape == (WIDTH, 2, 8)      # grouped: 2 key/value heads
    got = jax.jit(lambda p: block.apply({"params": p}, x, mask=jnp.asarray(VALID)))(params)
    assert _report("LlamaDecoderLayer (RMSNorm, SwiGLU, GQA 4/2, rotary linear x2)", got, want) <= 1e-5


def test_t5_gated_gelu_feed_forward(inputs):
    """T5LayerFF is x + FF(RMSNorm(x)): the pre-norm block's feed-forward half. The block's
    attention output kernel is zeroed (no out bias), so its attention half adds exactly zero."""
    x, _ = inputs
    config = T5Config(d_model=WIDTH, d_ff=MLP, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      layer_norm_epsilon=1e-6)
    assert config.dense_act_fn == "gelu_new"           # the tanh approximation
    ref = _randomize(T5LayerFF(config), seed=3)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    block = layers.Block(layers.BlockConfig(num_heads=HEADS, mlp_dim=MLP, norm_kind="rmsnorm", mlp="geglu",
                                            mlp_bias=False, q_bias=False, k_bias=False, v_bias=False,
                                            out_bias=False))
    own = nn.meta.unbox(block.init(jax.random.key(0), x))["params"]
    params = {**own, **torch_weights.t5_feed_forward(ref)}
    params["attn"]["out"]["kernel"] = np.zeros_like(params["attn"]["out"]["kernel"])
    _check_tree(block, params, x)
    got = block.apply({"params": params}, x)
    assert _report("T5LayerFF (RMS norm, gated tanh-GELU)", got, want) <= 1e-5
    assert np.abs(np.asarray(got) - x).max() > 1e-2          # the feed-forward half does something
