"""Block variants without a reference implementation, by invariants: per-modality experts (a token
never reaches another modality's expert), q/k/v/out bias patterns, parameter names of the
variants, model-level `block` overrides, and clear errors for bad descriptions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_helpers import random_params

from mmjax import layers, pretrained
from mmjax.models import text, vit

X = np.random.default_rng(0).normal(size=(2, 6, 16)).astype(np.float32)
TYPES = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 1, 0]])        # 0 = text, 1 = image


def _flat_names(params) -> set[str]:
    return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module", params=["pre", "post"])
def experts(request):
    block = layers.Block(layers.BlockConfig(num_heads=2, mlp_dim=32, norm=request.param,
                                            experts=("text", "image"), expert_norms=True))
    params = random_params(block, X, token_types=TYPES, seed=1)
    apply = jax.jit(lambda p: block.apply({"params": p}, X, token_types=TYPES))
    return params, apply


def test_expert_parameters_are_per_modality(experts):
    params, _ = experts
    assert {"mlp_text", "mlp_image", "ln2_text", "ln2_image", "ln1", "attn"} == set(params)


def test_expert_gradient_never_crosses_modalities(experts):
    """d(text tokens' outputs)/d(image expert) is exactly zero, and the other way round."""
    params, apply = experts
    weights = np.random.default_rng(2).normal(size=X.shape).astype(np.float32)
    for kind, other in ((0, "image"), (1, "text")):
        mine = np.equal(TYPES, kind)[..., None]
        grads = jax.grad(lambda p, mine=mine: (apply(p) * weights * mine).sum())(params)
        for name in (f"mlp_{other}", f"ln2_{other}"):
            assert all(not np.any(g) for g in jax.tree.leaves(grads[name])), name
        own = "text" if kind == 0 else "image"
        assert any(np.any(g) for g in jax.tree.leaves(grads[f"mlp_{own}"]))


def test_changing_one_expert_leaves_other_tokens_unchanged(experts):
    """Even an image expert full of NaNs leaves the text tokens' outputs bit-identical."""
    params, apply = experts
    before = np.asarray(apply(params))
    broken = {**params, "mlp_image": jax.tree.map(lambda x: np.full_like(x, np.nan), params["mlp_image"])}
    after = np.asarray(apply(broken))
    text_tokens = TYPES == 0
    np.testing.assert_array_equal(after[text_tokens], before[text_tokens])
    assert np.isnan(after[~text_tokens]).all()


@pytest.mark.parametrize("pattern", [(True, False, True, True), (False, False, False, False),
                                     (True, True, True, False)], ids=["eva_no_k", "none", "no_out"])
def test_attention_bias_patterns(pattern):
    """Exactly the requested projection biases exist (BLIP-2's EVA tower: q and v, no k)."""
    q, k, v, out = pattern
    block = layers.Block(layers.BlockConfig(num_heads=2, mlp_dim=32, q_bias=q, k_bias=k, v_bias=v, out_bias=out))
    attn = nn.meta.unbox(jax.eval_shape(block.init, jax.random.key(0), X))["params"]["attn"]
    have = {name for name in ("query", "key", "value", "out") if "bias" in attn[name]}
    assert have == {name for name, on in zip(("query", "key", "value", "out"), pattern) if on}


def test_variant_parameter_names():
    block = layers.Block(layers.BlockConfig(num_heads=4, num_kv_heads=2, mlp_dim=32, norm_kind="rmsnorm",
                                            mlp="swiglu", cross_attention=True, layer_scale=0.1))
    context = np.zeros((2, 3, 8), np.float32)
    params = nn.meta.unbox(jax.eval_shape(lambda: block.init(jax.random.key(0), X, context=context)))["params"]
    assert _flat_names(params) >= {"ln1/scale", "attn/query/kernel", "ln_cross/scale", "cross_attn/key/kernel",
                                   "ls_cross", "ls1", "ls2", "mlp/gate/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel"}
    assert "ln1/bias" not in _flat_names(params)                       # RMSNorm has none
    assert params["attn"]["key"]["kernel"].shape == (16, 2, 4)         # grouped-query key heads
    assert params["cross_attn"]["key"]["kernel"].shape == (8, 2, 4)    # keys from the context's width


def test_post_norm_normalises_the_output():
    block = layers.Block(layers.BlockConfig(num_heads=2, mlp_dim=32, norm="post", norm_eps=1e-12))
    params = random_params(block, X, seed=3)
    params["ln2"] = {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)}
    out = np.asarray(block.apply({"params": params}, X))
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(-1), 1.0, atol=1e-4)


def test_models_take_block_overrides():
    """A model's `block` dict overrides its derived BlockConfig, survives the JSON model fields,
    and leaves the default parameter tree untouched."""
    small = dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8)
    images = jnp.zeros((1, 16, 16, 3))
    plain = _flat_names(nn.meta.unbox(jax.eval_shape(vit.ViT(**small).init, jax.random.key(0), images)))
    model = vit.ViT(**small, block=dict(norm="post", mlp="swiglu", rotary=dict(base=100.0)))
    assert model.block_config().norm == "post" and model.block_config().rotary == layers.RotaryConfig(base=100.0)
    names = _flat_names(nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images)))
    assert names - plain == {"params/encoder/layer_0/mlp/gate/kernel", "params/encoder/layer_0/mlp/gate/bias"}
    fields = pretrained.model_fields(model)
    assert fields["block"] == {"norm": "post", "mlp": "swiglu", "rotary": {"base": 100.0}}
    tower = text.TextTransformer(vocab_size=10, context_length=4, width=16, depth=1, num_heads=2,
                                 block=dict(norm_kind="rmsnorm"))
    assert tower.block_config().causal and tower.block_config().norm_kind == "rmsnorm"


def test_bad_descriptions_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown block fields"):
        layers.block_config(dict(nrom="post"), num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="Unknown norm placement"):
        layers.BlockConfig(num_heads=2, mlp_dim=8, norm="sandwich")
    with pytest.raises(ValueError, match="Unknown norm_kind"):
        layers.BlockConfig(num_heads=2, mlp_dim=8, norm_kind="batchnorm")
    with pytest.raises(ValueError, match="Unknown activation"):
        layers.BlockConfig(num_heads=2, mlp_dim=8, mlp="reglu")
    with pytest.raises(ValueError, match="num_kv_heads"):
        layers.Block(layers.BlockConfig(num_heads=4, num_kv_heads=3, mlp_dim=8)).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="context"):
        layers.Block(layers.BlockConfig(num_heads=2, mlp_dim=8, cross_attention=True)).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="token_types"):
        layers.Block(layers.BlockConfig(num_heads=2, mlp_dim=8, experts=("a", "b"))).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="attention mask"):
        layers.Block(layers.BlockConfig(num_heads=2, mlp_dim=8)).init(jax.random.key(0), X, mask=np.ones((2, 1, 6)))
