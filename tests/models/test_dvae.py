"""mmjax.models.dvae: the DALL-E dVAE tokenizer at its real size against `transformers`'
FlavaImageCodebook and OpenAI's `dall_e` Encoder / Decoder (same logits, same token ids)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from references import require

from mmjax.models import dvae

dall_e = require("dall_e")

# ---------------------------------------------------------------------------------------------
# Copying reference weights (what the conversion tables will do). Conv weights OIHW → HWIO.
#   dall_e Encoder / Decoder                          FlavaImageCodebook            mmjax
#   blocks.input.{w,b}                                blocks.input.{weight,bias}    input/{kernel,bias}
#   blocks.group_G.block_B.id_path.{w,b}              blocks.group_G.group.block_B.id_path.*
#                                                                                   group_G_block_B/id_path/*
#   blocks.group_G.block_B.res_path.conv_K.{w,b}      blocks.group_G.group.block_B.res_path.path.conv_K.*
#                                                                                   group_G_block_B/conv_K/*
#   blocks.output.conv.{w,b}                          blocks.output.conv.*          output/*
# The decoder's input 1x1 conv (n_init, 8192, 1, 1) becomes input/kernel (1, 1, 8192, n_init).
# ---------------------------------------------------------------------------------------------

_PATTERNS = (
    (r"^blocks\.input\.(w|weight|b|bias)$", "input/{0}"),
    (r"^blocks\.group_(\d)\.(?:group\.)?block_(\d)\.id_path\.(w|weight|b|bias)$", "group_{0}_block_{1}/id_path/{2}"),
    (r"^blocks\.group_(\d)\.(?:group\.)?block_(\d)\.res_path\.(?:path\.)?conv_(\d)\.(w|weight|b|bias)$",
     "group_{0}_block_{1}/conv_{2}/{3}"),
    (r"^blocks\.output\.conv\.(w|weight|b|bias)$", "output/{0}"),
)


def dvae_to_mmjax(state_dict) -> dict:
    """dall_e or FLAVA state dict → nested mmjax params; unmatched keys are an error."""
    params: dict = {}
    for key, value in state_dict.items():
        for pattern, target in _PATTERNS:  # noqa: B007 - `target` is read after the loop breaks
            match = re.match(pattern, key)
            if match:
                break
        else:
            raise KeyError(f"unmatched reference key {key}")
        *groups, kind = match.groups()
        path = target.format(*groups, "kernel" if kind in ("w", "weight") else "bias").split("/")
        array = value.detach().numpy().astype(np.float32)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    return params


def randomize_(module, seed):
    """Random weights at DALL-E's scale (std 1/sqrt(fan_in)) and random biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _check_tree(model, params, *args):
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(params)):
        assert a.shape == b.shape, (path, a.shape, b.shape)


def _images(n, size=112, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def _compare_tokens(ours_logits, ref_logits, ours_ids, ref_ids):
    """Ids must agree wherever the reference's top two logits are not a numerical tie."""
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(ours_ids[clear], ref_ids[clear])
    return int((ours_ids == ref_ids).sum()), ours_ids.size


@pytest.fixture(scope="module")
def encode():
    model = dvae.DVAEEncoder()
    return model, jax.jit(model.apply), jax.jit(lambda v, x: model.apply(v, x, method="tokenize"))


def test_encoder_parity_with_flava_image_codebook(encode):
    import transformers
    model, logits_fn, tokens_fn = encode
    ref = transformers.FlavaImageCodebook(transformers.FlavaImageCodebookConfig()).eval()
    randomize_(ref, seed=0)
    images = _images(2)
    params = dvae_to_mmjax(ref.state_dict())
    _check_tree(model, params, jnp.zeros((1, 112, 112, 3)))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():     # FLAVA's codebook expects pixels already mapped by its processor
        ref_logits = ref(dvae.map_pixels(x)).numpy().transpose(0, 2, 3, 1)
        ref_ids = ref.get_codebook_indices(dvae.map_pixels(x)).numpy()
    logits = np.asarray(logits_fn({"params": params}, jnp.asarray(images)))
    ids = np.asarray(tokens_fn({"params": params}, jnp.asarray(images)))
    assert logits.shape == (2, 14, 14, 8192) and ids.shape == (2, 14, 14) and ids.dtype == np.int32
    diff = np.abs(logits - ref_logits).max()
    same, total = _compare_tokens(logits, ref_logits, ids, ref_ids)
    print(f"\ndVAE encoder vs FlavaImageCodebook @112px: logits max-abs-diff {diff:.2e} "
          f"(logit std {ref_logits.std():.2f}), token ids equal {same}/{total}")
    assert diff < 1e-4


def test_encoder_parity_with_dall_e(encode):
    _, logits_fn, tokens_fn = encode
    ref = dall_e.Encoder(device=torch.device("cpu"), requires_grad=False).eval()
    randomize_(ref, seed=1)
    images = _images(2, seed=1)
    params = dvae_to_mmjax(ref.state_dict())
    with torch.no_grad():
        ref_logits = ref(dall_e.map_pixels(torch.from_numpy(images.transpose(0, 3, 1, 2)))).numpy()
    ref_logits = ref_logits.transpose(0, 2, 3, 1)
    logits = np.asarray(logits_fn({"params": params}, jnp.asarray(images)))
    ids = np.asarray(tokens_fn({"params": params}, jnp.asarray(images)))
    diff = np.abs(logits - ref_logits).max()
    same, total = _compare_tokens(logits, ref_logits, ids, ref_logits.argmax(-1))
    print(f"\ndVAE encoder vs dall_e.Encoder @112px: logits max-abs-diff {diff:.2e}, token ids equal {same}/{total}")
    assert diff < 1e-4


def test_decoder_parity_with_dall_e():
    ref = dall_e.Decoder(device=torch.device("cpu"), requires_grad=False).eval()
    randomize_(ref, seed=2)
    tokens = np.random.default_rng(2).integers(0, 8192, size=(1, 14, 14)).astype(np.int32)
    model = dvae.DVAEDecoder()
    params = dvae_to_mmjax(ref.state_dict())
    _check_tree(model, params, jnp.zeros((1, 14, 14), jnp.int32))
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(tokens).long(), 8192).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ref_stats = ref(one_hot).numpy().transpose(0, 2, 3, 1)
        ref_image = dall_e.unmap_pixels(torch.sigmoid(torch.from_numpy(ref_stats[..., :3]).permute(0, 3, 1, 2)))
    stats = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
    image = np.asarray(jax.jit(lambda v, t: model.apply(v, t, method="reconstruct"))({"params": params},
                                                                                      jnp.asarray(tokens)))
    diff = np.abs(stats - ref_stats).max()
    print(f"\ndVAE decoder vs dall_e.Decoder (14x14 tokens → 112px): stats max-abs-diff {diff:.2e}")
    assert stats.shape == (1, 112, 112, 6) and diff < 1e-4
    np.testing.assert_allclose(image, ref_image.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_decoder_accepts_distributions_and_checks_inputs():
    model = dvae.DVAEDecoder(n_init=8, n_hid=16, blocks_per_group=1, vocab_size=32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(2, 2, 2)), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))   # no init compile
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda x: 0.3 * rng.normal(size=x.shape).astype(np.float32), shapes)
    apply = jax.jit(model.apply)
    hard = apply(variables, tokens)
    soft = apply(variables, jax.nn.one_hot(tokens, 32))
    assert hard.shape == (2, 16, 16, 6)
    np.testing.assert_allclose(np.asarray(hard), np.asarray(soft), atol=1e-5)
    with pytest.raises(ValueError, match="token distributions"):
        jax.eval_shape(model.apply, variables, jnp.zeros((2, 2, 2, 31)))
    with pytest.raises(ValueError, match="sides divisible by 8"):
        jax.eval_shape(dvae.DVAEEncoder(n_hid=16).init, jax.random.key(0), jnp.zeros((1, 20, 20, 3)))
    with pytest.raises(ValueError, match="multiple of 4"):
        jax.eval_shape(dvae.DVAEEncoder(n_hid=18).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
