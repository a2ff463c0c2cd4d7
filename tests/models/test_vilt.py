"""mmjax ViLT against transformers' ViltModel at the real ViLT-B/32 structure (random weights,
float32, padded text), its position-grid resampling against torch's interpolate, the heads'
shapes, scan == unrolled, and clear errors for inputs it does not take.

transformers' visual_embed draws the kept patches with torch.multinomial even at eval, which
permutes the image tokens at random (attention is permutation-equivariant, so no other output
changes); mmjax keeps raster order. The text tokens, the image [CLS] and the pooled vector are
compared as they come; the whole sequence with the draw made the identity.
"""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ViltConfig, ViltModel

from mmjax import layers
from mmjax.convert import engine
from mmjax.convert import vilt as vilt_convert
from mmjax.models import vilt
from mmjax.pretrained import abstract_params, build

TEXT_LEN = 11
VALID = np.array([[1] * TEXT_LEN, [1] * 6 + [0] * (TEXT_LEN - 6)], bool)


def _randomized(model, seed):
    """1-D parameters (norms, biases, [CLS]) away from their 1 / 0 init and a random image position
    grid, so that no mis-mapped parameter can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1 or p.shape[:-1] == (1, 1):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        # the image position grid starts at zero: random, so that a wrong resampling cannot hide
        model.embeddings.position_embeddings.copy_(torch.randn(model.embeddings.position_embeddings.shape,
                                                               generator=gen))
    return model.eval()


def _identity_draw(weights, num_samples, replacement=False, **kw):
    return torch.arange(num_samples) if not replacement and num_samples == weights.numel() else \
        torch.multinomial(weights, num_samples, replacement, **kw)


def _torch_run(ref, tokens, images, keep_order=False):
    kwargs = dict(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(VALID).long(),
                  pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    real = torch.multinomial
    with torch.no_grad(), mock.patch.object(torch, "multinomial",
                                            lambda *a, **k: _identity_draw(*a, **k) if keep_order else real(*a, **k)):
        out = ref(**kwargs)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _converted(ref):
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    plan = vilt_convert.from_hf({**ref.config.to_dict(), "architectures": ["ViltModel"]}, state)
    model = build(plan.model_class, plan.fields)
    flat = engine.to_mmjax(state, plan.table, abstract_params(model, plan.inputs))
    return model, {"params": engine.unflatten(flat)}


@pytest.fixture(scope="module")
def base():
    """ViLT-B/32 (transformers' ViltConfig defaults: 384 px, 12x12 grid, 40 text positions)."""
    torch.manual_seed(0)
    ref = _randomized(ViltModel(ViltConfig()), seed=1)
    model, variables = _converted(ref)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30522, (2, TEXT_LEN)).astype(np.int32)
    return ref, model, variables, tokens, rng.normal(size=(2, 384, 384, 3)).astype(np.float32)


def test_base_matches_transformers_with_padded_text(base):
    ref, model, variables, tokens, images = base
    assert model.arch() == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(32, 32))
    out = jax.jit(model.apply)(variables, tokens, images, VALID)
    assert out["tokens"].shape == (2, TEXT_LEN + 1 + 144, 768)
    hidden, pooled = _torch_run(ref, tokens, images)
    first = TEXT_LEN + 1                     # text tokens and the image [CLS]: untouched by the draw
    text_diff = np.abs(out["tokens"][:, :first] - hidden[:, :first]).max()
    pooled_diff = np.abs(out["pooled"] - pooled).max()
    hidden_ordered, _ = _torch_run(ref, tokens, images, keep_order=True)
    all_diff = np.abs(out["tokens"] - hidden_ordered).max()
    print(f"ViLT-B/32: text+cls {text_diff:.3g}, pooled {pooled_diff:.3g}, all tokens {all_diff:.3g}")
    assert text_diff < 2e-5 and all_diff < 2e-5 and pooled_diff < 5e-6      # measured 3.1e-6, 2.9e-6, 1.4e-6
    assert np.abs(out["tokens"][:, first:] - hidden[:, first:]).max() > 0.1   # the draw did permute


def test_other_image_size_resamples_the_grid_as_transformers(base):
    """384x512 images: 12x16 patches, the stored 12x12 grid resampled (align_corners=True)."""
    ref, model, variables, tokens, _ = base
    images = np.random.default_rng(1).normal(size=(2, 384, 512, 3)).astype(np.float32)
    out = jax.jit(model.apply)(variables, tokens, images, VALID)
    hidden, pooled = _torch_run(ref, tokens, images, keep_order=True)
    diff = max(np.abs(out["tokens"] - hidden).max(), np.abs(out["pooled"] - pooled).max())
    print(f"ViLT-B/32 at 384x512: max abs diff {diff:.3g}")
    assert diff < 2e-5                                                   # measured 3.6e-6


@pytest.mark.parametrize("grid", [(3, 5), (8, 2), (1, 4), (4, 4)])
def test_grid_resampling_is_torchs_align_corners_bilinear(grid):
    table = np.random.default_rng(0).normal(size=(1, 16, 6)).astype(np.float32)
    got = np.asarray(vilt.resample_grid(table, (4, 4), grid))
    spatial = torch.from_numpy(table).transpose(1, 2).reshape(1, 6, 4, 4)
    want = torch.nn.functional.interpolate(spatial, size=grid, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(got, want.flatten(2).transpose(1, 2).numpy(), atol=1e-6)


TINY = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=48, patch_size=16, image_size=64, vocab_size=50,
            max_len=8)


@pytest.mark.parametrize("head,shape", [("none", None), ("mlm", (2, 5, 50)), ("itm", (2, 2)),
                                        ("retrieval", (2, 1)), ("vqa", (2, 7))])
def test_heads_shapes(head, shape):
    tokens, images = np.ones((2, 5), np.int32), np.zeros((2, 64, 64, 3), np.float32)
    model = vilt.ViLT(**TINY, head=head, num_answers=7)
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), tokens, images), tokens, images))
    assert out.get("logits") is None if shape is None else out["logits"].shape == shape
    assert out["tokens"].shape == (2, 5 + 1 + 16, 32) and out["pooled"].shape == (2, 32)


def test_scan_equals_unrolled():
    rng = np.random.default_rng(0)
    tokens, images = rng.integers(0, 50, (2, 5)).astype(np.int32), rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    model = vilt.ViLT(**TINY, head="mlm")
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens, images))
    out = jax.jit(model.apply)(variables, tokens, images, VALID[:, :5])
    params = dict(variables["params"])
    params["encoder"] = layers.to_scanned(params["encoder"], layers.Stack(model.block_config(), 2))
    again = jax.jit(vilt.ViLT(**TINY, head="mlm", scan=True).apply)({"params": params}, tokens, images,
                                                                     VALID[:, :5])
    for key in out:
        np.testing.assert_allclose(again[key], out[key], atol=2e-6)


@pytest.mark.parametrize("tokens,images,mask,match", [
    (np.ones((2, 5), np.float32), np.zeros((2, 64, 64, 3), np.float32), None, "integer token ids"),
    (np.ones((2, 9), np.int32), np.zeros((2, 64, 64, 3), np.float32), None, "exceed ViLT's 8 text positions"),
    (np.ones((2, 5), np.int32), np.zeros((2, 60, 64, 3), np.float32), None, "not divisible by the patch size"),
    (np.ones((2, 5), np.int32), np.zeros((2, 3, 64, 64), np.float32), None, "NHWC"),
    (np.ones((2, 5), np.int32), np.zeros((3, 64, 64, 3), np.float32), None, "one image per text"),
    (np.ones((2, 5), np.int32), np.zeros((2, 64, 64, 3), np.float32), np.ones((2, 4), bool), "text mask"),
])
def test_bad_inputs_are_named(tokens, images, mask, match):
    model = vilt.ViLT(**TINY)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.PRNGKey(0), tokens, images, mask)


def test_unknown_head_is_named():
    model = vilt.ViLT(**TINY, head="nlvr2")
    with pytest.raises(ValueError, match="Unknown ViLT head 'nlvr2'"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), np.ones((1, 4), np.int32), np.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("head", ["mlm", "vqa"])
def test_forward_flops_match_xla(head):
    """Wide enough that matmuls dominate; XLA also counts norms, softmax and GELU (a few %)."""
    from mmjax import flops

    model = vilt.ViLT(variant=None, width=256, depth=2, num_heads=4, mlp_dim=1024, patch_size=8, image_size=64,
                      vocab_size=100, max_len=16, head=head, num_answers=300)
    tokens, images = jax.ShapeDtypeStruct((4, 16), jnp.int32), jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens, images)
    cost = jax.jit(model.apply).lower(variables, tokens, images).compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = 4 * flops.total(vilt.forward_flops(model, 16, (64, 64)))
    print(f"ViLT {head}: XLA / analytic = {xla / analytic:.4f}")
    assert 1.0 <= xla / analytic < 1.06
