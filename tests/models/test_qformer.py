"""The Q-Former's routing, which the parity tests (tests/convert/test_hf_blip2.py) see only through
transformers' masks: text reaches the image only through the queries, queries hidden from the text
(ITG's multimodal causal mask) are the query-only result, text alone (ITC) ignores the image; BLIP-2's
retrieval model gives the same outputs sharded fsdp_tp as on one device; misuse gets clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharded_equality

from mmjax import sharding
from mmjax.models import blip2, qformer

Q, T, W = 4, 3, 32          # queries, text tokens, width
TINY_VISION = dict(variant=None, width=32, depth=1, num_heads=4, mlp_dim=48, patch_size=8)
TINY_QFORMER = dict(width=W, depth=2, num_heads=4, mlp_dim=48, num_queries=Q)


def _random_variables(model, *inputs, seed=0):
    """(boxed shapes, random variables) without compiling `init` (threefry's compilation takes
    seconds on XLA:CPU): N(0, 0.3) everywhere, norm scales around 1."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
        return x + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else x
    return boxed, jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(boxed))


@pytest.fixture(scope="module")
def tower():
    model = qformer.QFormer(**TINY_QFORMER, text_ffn=True)
    rng = np.random.default_rng(0)
    embeds = jnp.asarray(rng.normal(size=(2, Q + T, W)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)
    return model, _random_variables(model, embeds, None, context)[1], embeds, context


def _mask(queries_see_text: bool, text_sees_queries: bool) -> jnp.ndarray:
    m = np.ones((1, 1, Q + T, Q + T), bool)
    m[..., :Q, Q:] = queries_see_text
    m[..., Q:, :Q] = text_sees_queries
    return jnp.asarray(m)


@pytest.fixture(scope="module")
def routed(tower):
    """The Q-Former's outputs under the masks and contexts the tests compare (one compilation)."""
    model, variables, embeds, context = tower
    other = context[::-1]

    @jax.jit
    def run(variables):
        apply = lambda *args, **kw: model.apply(variables, *args, **kw)["tokens"]  # noqa: E731
        return {"alone": apply(embeds[:, :Q], None, context),
                "itg": apply(embeds, _mask(False, True), context),
                "full": apply(embeds, None, context), "full_other": apply(embeds, None, other),
                "cut": apply(embeds, _mask(True, False), context),
                "cut_other": apply(embeds, _mask(True, False), other),
                "text": apply(embeds[:, Q:], None, None, num_queries=0)}
    return run(variables)


def test_queries_hidden_from_text_give_the_query_only_result(routed):
    np.testing.assert_allclose(routed["itg"][:, :Q], routed["alone"], atol=1e-6)
    assert float(jnp.abs(routed["full"][:, :Q] - routed["alone"]).max()) > 1e-3   # with the text in view they differ


def test_text_sees_the_image_only_through_the_queries(routed):
    np.testing.assert_allclose(routed["cut"][:, Q:], routed["cut_other"][:, Q:], atol=1e-6)   # no cross-attention
    assert float(jnp.abs(routed["full"][:, Q:] - routed["full_other"][:, Q:]).max()) > 1e-3  # via the queries
    assert routed["text"].shape == (2, T, W)


def test_misuse_is_refused(tower):
    model, variables, embeds, context = tower
    with pytest.raises(ValueError, match="pass `context`"):
        model.apply(variables, embeds)
    with pytest.raises(ValueError, match="no text feed-forward"):
        qformer.QFormer(**TINY_QFORMER).init(jax.random.key(0), embeds, None, context)
    with pytest.raises(ValueError, match="num_queries 9 does not fit"):
        model.apply(variables, embeds, None, context, num_queries=9)


def test_retrieval_fsdp_tp_matches_one_device():
    """Parameters placed by their logical axes under fsdp_tp on the 8 simulated devices (heads and
    vocabulary over `tensor`, the rest over `fsdp`, the batch over `data` x `fsdp`) give the
    one-device outputs."""
    model = blip2.Blip2Retrieval(vision=TINY_VISION, qformer_fields=TINY_QFORMER, vocab_size=64, max_len=8,
                                 embed_dim=16)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 64, (4, 5)), jnp.int32)
    valid = jnp.asarray(np.arange(5) < np.array([[5], [5], [3], [4]]))
    boxed, variables = _random_variables(model, images, tokens, valid, seed=2)
    forward = jax.jit(lambda variables, *batch: model.apply(variables, *batch))
    want = forward(variables, images, tokens, valid)
    mesh, rules = sharding.make_mesh(sharded_equality.FSDP_TP, jax.devices()), sharding.get_rules("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        placed = jax.device_put(variables, sharding.logical_shardings(boxed, mesh, rules))
        word = placed["params"]["embeddings"]["word"]["embedding"]
        heads = placed["params"]["qformer"]["layer_0"]["cross_attn"]["key"]["kernel"]
        assert word.sharding.spec[0] == "tensor" and heads.sharding.spec[1] == "tensor"
        assert sharding.unsharded_fraction(placed) < 0.05
        batch = jax.device_put((images, tokens, valid), sharding.batch_sharding(mesh))
        got = forward(placed, *batch)
    for key in ("itm_logits", "image_embeds", "text_embeds"):
        np.testing.assert_allclose(got[key], want[key], atol=2e-6, err_msg=key)
