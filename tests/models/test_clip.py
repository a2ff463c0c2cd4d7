"""mmjax.models.clip / text: output shapes and normalisation, temperature, SigLIP bias, EOT
pooling under the causal mask, token checks, and an architecture parity check against a small
randomly initialised open_clip.CLIP."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from mmjax.models import clip, text

EMBED, CONTEXT, VOCAB, EOT = 64, 16, 100, 99
IMAGE_CFG = dict(width=64, depth=2, num_heads=2, mlp_dim=256, patch_size=8)
TEXT_CFG = dict(vocab_size=VOCAB, context_length=CONTEXT, width=64, depth=2, num_heads=2)


def _images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _tokens(n=3, seed=0, lengths=None):
    """Random ids in [1, EOT) with EOT (the largest id) at the end of each sequence, then zeros."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, CONTEXT, size=n) if lengths is None else lengths
    tokens = np.zeros((n, CONTEXT), np.int32)
    for i, length in enumerate(lengths):
        tokens[i, :length - 1] = rng.integers(1, EOT, size=length - 1)
        tokens[i, length - 1] = EOT
    return tokens


def _shapes(model, *args):
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))


def _random_params(model, *args, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if x.ndim == 0:                      # logit_scale / logit_bias keep their init
            return None
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if path[-1].key == "scale" else scale * noise
    shapes = _shapes(model, *args)["params"]
    params = jax.tree_util.tree_map_with_path(draw, shapes)
    params["logit_scale"] = np.float32(np.log(1 / 0.07))
    if "logit_bias" in shapes:
        params["logit_bias"] = np.float32(-10.0)
    return params


@pytest.fixture(scope="module")
def small_clip():
    model = clip.CLIP(embed_dim=EMBED, image=IMAGE_CFG, text=TEXT_CFG)
    images, tokens = _images(), _tokens()
    params = _random_params(model, images, tokens, seed=1)
    call = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    return model, params, images, tokens, call


# ---------------------------------------------------------------------------------------------
# Shapes, normalisation, temperature
# ---------------------------------------------------------------------------------------------

def test_output_shapes(small_clip):
    model, params, images, tokens, _ = small_clip
    v = {"params": params}
    assert jax.eval_shape(lambda: model.apply(v, images, method="encode_image")).shape == (3, EMBED)
    assert jax.eval_shape(lambda: model.apply(v, tokens, method="encode_text")).shape == (3, EMBED)
    out = jax.eval_shape(lambda: model.apply(v, images, tokens))
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale"}
    assert out["image_embeds"].shape == out["text_embeds"].shape == (3, EMBED) and out["logit_scale"].shape == ()
    assert params["image_proj"]["kernel"].shape == (64, EMBED)
    assert params["text_proj"]["kernel"].shape == (64, EMBED)
    # A shorter token sequence than the context is fine (position embeddings are sliced).
    assert jax.eval_shape(lambda: model.apply(v, tokens[:, :5], method="encode_text")).shape == (3, EMBED)


def test_call_outputs_are_unit_norm_and_scaled(small_clip):
    _, params, images, tokens, call = small_clip
    out = call(params, images, tokens)
    zimg, ztxt, scale = out["image_embeds"], out["text_embeds"], out["logit_scale"]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ztxt), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    assert np.abs(np.asarray(zimg)[0] - np.asarray(zimg)[1]).max() > 1e-3

    hot = dict(params, logit_scale=np.float32(np.log(1000.0)))
    np.testing.assert_allclose(float(call(hot, images, tokens)["logit_scale"]), 100.0, rtol=1e-5)
    mild = dict(params, logit_scale=np.float32(np.log(50.0)))
    np.testing.assert_allclose(float(call(mild, images, tokens)["logit_scale"]), 50.0, rtol=1e-5)


# Towers with no blocks: enough to check the temperature/bias parameters, and cheap to init.
TINY = dict(embed_dim=8, image=dict(width=8, depth=0, num_heads=1, mlp_dim=8, patch_size=16),
            text=dict(vocab_size=VOCAB, context_length=CONTEXT, width=8, depth=0, num_heads=1))


def _init_and_call(model, images, tokens):
    def fn():
        # rbg keys: the params tested here are constants, and rbg compiles much faster on CPU.
        variables = model.init(jax.random.key(0, impl="rbg"), images, tokens)
        return variables, model.apply(variables, images, tokens)
    variables, out = jax.jit(fn)()
    return nn.meta.unbox(variables["params"]), out


def test_logit_scale_init():
    params, out = _init_and_call(clip.CLIP(**TINY), _images(2), _tokens(2))
    zimg, scale = out["image_embeds"], out["logit_scale"]
    np.testing.assert_allclose(float(params["logit_scale"]), np.log(1 / 0.07), rtol=1e-6)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    assert "logit_bias" not in params
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg), axis=-1), 1.0, atol=1e-5)


def test_siglip_variant_returns_bias():
    model = clip.CLIP(**TINY, logit_scale_init=np.log(10.0), logit_bias_init=-10.0)
    params, out = _init_and_call(model, _images(2), _tokens(2))
    np.testing.assert_allclose(float(params["logit_bias"]), -10.0)
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale", "logit_bias"}
    ztxt, scale, bias = out["text_embeds"], out["logit_scale"], out["logit_bias"]
    np.testing.assert_allclose(float(scale), 10.0, rtol=1e-5)
    np.testing.assert_allclose(float(bias), -10.0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ztxt), axis=-1), 1.0, atol=1e-5)


def test_image_tower_without_classifier():
    model = clip.CLIP(embed_dim=EMBED, image=dict(IMAGE_CFG, num_classes=10), text=TEXT_CFG)
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(model.init, jax.random.key(0), _images(1), _tokens(1))


# ---------------------------------------------------------------------------------------------
# Text tower: EOT pooling and token checks
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_tower():
    tower = text.TextTransformer(**TEXT_CFG)
    tokens = _tokens(4, seed=3, lengths=[3, 7, 12, 16])
    params = _random_params(tower, tokens, seed=4)
    params.pop("logit_scale")
    run = jax.jit(lambda p, t: (tower.apply({"params": p}, t)["pooled"],
                                text.TextTransformer(**TEXT_CFG, pool="none").apply({"params": p}, t)["tokens"]))
    return params, tokens, run


def test_argmax_pool_takes_eot_position(text_tower):
    params, tokens, run = text_tower
    pooled, encoded = (np.asarray(x) for x in run(params, tokens))
    eot = np.array([2, 6, 11, 15])
    assert (tokens[np.arange(4), eot] == EOT).all()
    np.testing.assert_allclose(pooled, encoded[np.arange(4), eot], atol=1e-6)

    # Tokens after the EOT (all smaller ids) do not change the output: causal attention.
    changed = tokens.copy()
    rng = np.random.default_rng(5)
    for i, e in enumerate(eot):
        changed[i, e + 1:] = rng.integers(1, EOT, size=CONTEXT - e - 1)
    assert (changed != tokens).any()
    np.testing.assert_allclose(np.asarray(run(params, changed)[0]), pooled, atol=1e-5)
    # ...while a token before the EOT does.
    before = tokens.copy()
    before[:, 0] = (before[:, 0] % 97) + 1
    assert np.abs(np.asarray(run(params, before)[0]) - pooled).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("tokens,match", [
    (np.zeros((2, CONTEXT), np.float32), "integer"),
    (np.zeros((CONTEXT,), np.int32), "batch, length"),
    (np.zeros((2, CONTEXT + 1), np.int32), "context length"),
])
def test_bad_tokens_raise_value_error(small_clip, tokens, match):
    model, params, *_ = small_clip
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.apply({"params": params}, tokens, method="encode_text"))


def test_unknown_text_pool():
    with pytest.raises(ValueError, match="pool"):
        jax.eval_shape(text.TextTransformer(**TEXT_CFG, pool="mean").init, jax.random.key(0),
                       _tokens(1))


# ---------------------------------------------------------------------------------------------
# Architecture parity with open_clip
# ---------------------------------------------------------------------------------------------

def _open_clip_to_mmjax(state: dict, model: clip.CLIP, images, tokens) -> dict:
    """open_clip.CLIP weights as mmjax CLIP params, through the conversion engine's open_clip table."""
    from mmjax.convert import clip as convert_clip
    from mmjax.convert import engine
    expected = engine.flatten(_shapes(model, images, tokens)["params"])
    flat = engine.to_mmjax({k: v.detach().numpy() for k, v in state.items()}, convert_clip.OPEN_CLIP_TABLE, expected)
    return engine.unflatten(flat)


def test_architecture_parity_with_open_clip():
    import open_clip
    torch.manual_seed(0)
    ref = open_clip.CLIP(
        embed_dim=EMBED,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=64, heads=2, layers=2),
    ).eval()
    # LayerNorm params and biases start at 1/0: move them so a mis-mapping cannot hide.
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    images, tokens = _images(4, seed=7), _tokens(4, seed=8, lengths=[2, 5, 9, 16])
    with torch.no_grad():
        want_img = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=False).numpy()
        want_txt = ref.encode_text(torch.from_numpy(tokens).long(), normalize=False).numpy()

    model = clip.CLIP(embed_dim=EMBED, image=IMAGE_CFG, text=TEXT_CFG)
    params = _open_clip_to_mmjax(ref.state_dict(), model, images, tokens)

    enc = jax.jit(lambda p, x, t: (model.apply({"params": p}, x, method="encode_image"),
                                   model.apply({"params": p}, t, method="encode_text")))
    got_img, got_txt = (np.asarray(x) for x in enc(params, images, tokens))
    d_img, d_txt = float(np.abs(got_img - want_img).max()), float(np.abs(got_txt - want_txt).max())
    print(f"open_clip CLIP vs mmjax CLIP: encode_image max abs diff {d_img:.3g} "
          f"(max |x| {np.abs(want_img).max():.3g}), encode_text max abs diff {d_txt:.3g} "
          f"(max |x| {np.abs(want_txt).max():.3g})")
    assert np.abs(want_img).max() > 0.1 and np.abs(want_txt).max() > 0.1
    assert d_img <= 1e-4 and d_txt <= 1e-4
