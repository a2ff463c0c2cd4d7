"""The ALBEF model (mmjax/models/albef.py): its split forward pass is the whole pass, its outputs
use the shared vocabulary, bad structures are refused and its analytic FLOPs match XLA's count.
Sharded training (fsdp_tp, 8 CPU devices) equal to one device: tests/tasks/test_albef_task.py.
Parity with the reference layout (timm ViT + transformers BERT layers, tiny and real size):
tests/convert/test_albef_official.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import flops
from mmjax.models import albef, outputs

VISION = dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
TEXT = dict(variant=None, width=32, depth=4, num_heads=2, mlp_dim=64, vocab_size=64, max_len=12,
            cross_attention_from=2, dropout=0.0)


def _model(**kw):
    return albef.Albef(vision=VISION, text={**TEXT, **kw.pop("text", {})}, embed_dim=16, **kw)


def _inputs():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(5, 64, (3, 8)).astype(np.int32)
    tokens[:, 0] = 2
    tokens[2, 5:] = 0
    return images, tokens, tokens != 0


@pytest.fixture(scope="module")
def model_and_variables():
    model = _model()
    images, tokens, mask = _inputs()
    return model, jax.jit(model.init)(jax.random.key(0), images, tokens, mask)


def test_split_forward_equals_the_whole_text_encoder(model_and_variables):
    model, variables = model_and_variables
    images, tokens, mask = _inputs()
    out = outputs.check(model.apply(variables, images, tokens, mask))
    assert {k: v.shape for k, v in out.items()} == {
        "image_embeds": (3, 16), "text_embeds": (3, 16), "logit_scale": (), "itm_logits": (3, 2), "logits": (3, 8, 64)}
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-6)
    image_tokens = model.apply(variables, images, method="encode_image")
    assert image_tokens.shape == (3, 17, 32)
    whole = model.apply(variables, tokens, mask, image_tokens, method="mlm")      # mode "full": layers 0-3
    np.testing.assert_allclose(whole, out["logits"], atol=1e-5)
    states = model.apply(variables, tokens, mask, method="encode_text")          # layers 0-1, then 2-3
    fused = model.apply(variables, states, mask, image_tokens, method="fuse")["tokens"]
    np.testing.assert_allclose(model.apply(variables, fused, method="itm"), out["itm_logits"], atol=1e-5)
    # The text embedding never sees the image; the fused [CLS] does.
    other = model.apply(variables, images[::-1].copy(), tokens, mask)
    np.testing.assert_allclose(other["text_embeds"], out["text_embeds"], atol=1e-6)
    assert not np.allclose(other["itm_logits"], out["itm_logits"], atol=1e-4)


def test_temperature_is_clamped():
    model = _model(temperature_init=1e-5)
    images, tokens, mask = _inputs()
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens, mask)
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), variables)["params"]
    params["temp"] = jnp.float32(2.0)
    assert float(model.apply({"params": params}, method="logit_scale")) == pytest.approx(2.0)   # 1 / 0.5
    params["temp"] = jnp.float32(-1.0)
    assert float(model.apply({"params": params}, method="logit_scale")) == pytest.approx(1000.0)


@pytest.mark.parametrize("text, vision, match", [
    (dict(cross_attention_from=0), {}, "cross_attention_from must be in"),
    (dict(cross_attention_from=4), {}, "cross_attention_from must be in"),
    (dict(causal=True), {}, "fixes"),
    ({}, dict(pool="cls"), "pool='none'"),
])
def test_bad_structures_are_refused(text, vision, match):
    model = albef.Albef(vision={**VISION, **vision}, text={**TEXT, **text}, embed_dim=16)
    images, tokens, mask = _inputs()
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, jax.random.key(0), images, tokens, mask)


def test_forward_flops_match_xla():
    wide = dict(width=128, mlp_dim=512)      # wide enough that norms and softmaxes are a small share
    model = albef.Albef(vision={**VISION, **wide}, text={**TEXT, **wide}, embed_dim=16)
    images, tokens, mask = _inputs()
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens, mask)
    cost = jax.jit(model.apply).lower(variables, images, tokens, mask).compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = 3 * flops.total(albef.forward_flops(model, (32, 32), 8))
    assert analytic == pytest.approx(xla, rel=0.05), (analytic, xla)
