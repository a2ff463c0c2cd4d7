"""BlipPretrain (mmjax/models/blip_pretrain.py): the decoder shares every weight with the encoder
except its self-attention; the shared leaves are stored once and their gradient is the sum of
both uses; the decoder equals BlipCaptioner's given the expanded weights (logits and greedy
generation through the cache); `expand` gives BlipRetrieval + BlipCaptioner parameters that
export to transformers and compute there what BlipPretrain computes. Tiny structures."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmjax import generate, pretrained
from mmjax.models import blip, blip_pretrain

VISION = dict(variant=None, width=32, depth=1, num_heads=4, mlp_dim=48, patch_size=8)
TEXT = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=40, vocab_size=99, max_len=20)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 97, (2, 6)).astype(np.int32)
    tokens[:, 0] = 97                                         # [DEC] = vocab - 2
    tokens[~MASK] = 0
    return rng.normal(size=(2, 32, 32, 3)).astype(np.float32), tokens


@pytest.fixture(scope="module")
def pretrain():
    model = blip_pretrain.BlipPretrain(vision=VISION, text=TEXT, embed_dim=16)
    images, tokens = _inputs()
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens, MASK))["params"]
    # Perturb every leaf, so that LayerNorms and biases are not at their (equal) initial values and
    # an encoder/decoder mix-up of any leaf shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params, images, tokens


def _paths(tree):
    return set(traverse_util.flatten_dict(tree))


def test_shared_parameters_are_stored_once(pretrain):
    model, params, _, _ = pretrain
    decoder = _paths(params["text_decoder"])
    assert decoder and all(blip_pretrain.is_decoder_own(p) for p in decoder)
    tops = {p[0] for p in decoder}
    layer_parts = {p[2] for p in decoder if p[0] == "encoder"}
    assert tops == {"encoder", "lm_head"} and layer_parts == {"attn", "ln1"}, (tops, layer_parts)
    # Everything else of a full decoder (embeddings, cross-attention, MLP, their norms) is the encoder's.
    full = _paths(blip_pretrain.expand(params)["captioner"]["text_decoder"])
    assert full - decoder == {p for p in _paths(params["text_encoder"]) if not blip_pretrain.is_decoder_own(p)}
    # Expanded, the shared text leaves and the vision tower exist twice (temp is left out).
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    shared = sum(x.size for p, x in traverse_util.flatten_dict(params["text_encoder"]).items()
                 if not blip_pretrain.is_decoder_own(p))
    expanded = size(blip_pretrain.expand(params))
    assert expanded - size(params) == shared + size(params["vision_model"]) - 1


def _retrieval_and_captioner():
    return (blip.BlipRetrieval(vision=VISION, text=TEXT, embed_dim=16, learn_temperature=True),
            blip.BlipCaptioner(vision=VISION, text=TEXT))


def test_expand_gives_the_one_copy_layouts_and_same_outputs(pretrain):
    model, params, images, tokens = pretrain
    retrieval, captioner = _retrieval_and_captioner()
    expanded = blip_pretrain.expand(params, temperature=True)
    for module, got in ((retrieval, expanded["retrieval"]), (captioner, expanded["captioner"])):
        want = jax.eval_shape(module.init, jax.random.key(0), images, tokens, MASK)["params"]
        assert jax.tree.structure(nn.meta.unbox(want)) == jax.tree.structure(got)
        jax.tree.map(lambda w, g: np.testing.assert_equal(w.shape, g.shape), nn.meta.unbox(want), got)
    assert "temp" not in blip_pretrain.expand(params)["retrieval"]
    out = jax.jit(model.apply)({"params": params}, images, tokens, MASK)
    ret = retrieval.apply({"params": expanded["retrieval"]}, images, tokens, MASK)
    cap = captioner.apply({"params": expanded["captioner"]}, images, tokens, MASK)
    diffs = {k: float(np.max(np.abs(out[k] - ret[k]))) for k in ("itm_logits", "image_embeds", "text_embeds")}
    diffs["logits"] = float(np.max(np.abs(out["logits"] - cap["logits"])))
    print(f"BlipPretrain vs expanded BlipRetrieval / BlipCaptioner max |diff|: {diffs}")
    assert max(diffs.values()) <= 1e-6
    # The decoder is not the encoder: its own self-attention makes the logits differ from a
    # decoder built from the encoder's self-attention.
    swapped = jax.tree.map(lambda x: x, expanded["captioner"])
    for i in range(2):
        layer = f"layer_{i}"
        for part in ("attn", "ln1"):
            swapped["text_decoder"]["encoder"][layer][part] = params["text_encoder"]["encoder"][layer][part]
    other = captioner.apply({"params": swapped}, images, tokens, MASK)
    assert float(np.max(np.abs(other["logits"] - cap["logits"]))) > 1e-3
    with pytest.raises(ValueError, match="Not BlipPretrain parameters"):
        blip_pretrain.expand(expanded["captioner"])


def test_gradient_of_a_shared_leaf_is_the_sum_of_both_uses(pretrain):
    model, params, images, tokens = pretrain
    retrieval, captioner = _retrieval_and_captioner()
    weights = jax.random.normal(jax.random.key(2), (2, 6, 99))

    def pretrain_loss(p):
        out = model.apply({"params": p}, images, tokens, MASK)
        return jnp.sum(out["itm_logits"] ** 2) + jnp.sum(out["logits"] * weights)

    def split_loss(ret, cap):
        itm = retrieval.apply({"params": ret}, images, tokens, MASK)["itm_logits"]
        return jnp.sum(itm ** 2) + jnp.sum(captioner.apply({"params": cap}, images, tokens, MASK)["logits"] * weights)

    grads = jax.jit(jax.grad(pretrain_loss))(params)
    expanded = blip_pretrain.expand(params, temperature=True)
    g_ret, g_cap = jax.jit(jax.grad(split_loss, argnums=(0, 1)))(expanded["retrieval"], expanded["captioner"])
    enc, dec = traverse_util.flatten_dict(g_ret["text_encoder"]), traverse_util.flatten_dict(g_cap["text_decoder"])
    got = traverse_util.flatten_dict(grads["text_encoder"])
    checked = 0
    for path, g in got.items():
        want = enc[path] + (0.0 if blip_pretrain.is_decoder_own(path) else dec[path])
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6, err_msg=str(path))
        checked += not blip_pretrain.is_decoder_own(path)
    assert checked > 10
    word = ("embeddings", "word", "embedding")
    assert float(np.max(np.abs(dec[word]))) > 0 and float(np.max(np.abs(enc[word]))) > 0   # both uses count
    for path, g in traverse_util.flatten_dict(grads["text_decoder"]).items():
        np.testing.assert_allclose(g, dec[path], rtol=1e-5, atol=1e-6, err_msg=str(path))
    # The vision tower is used by the ITM encoder and the decoder alike.
    patch = lambda g: g["vision_model"]["embedding"]["conv"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(patch(grads), patch(g_ret) + patch(g_cap), rtol=1e-4, atol=1e-6)


def test_cached_greedy_generation_equals_the_captioners(pretrain):
    model, params, images, _ = pretrain
    _, captioner = _retrieval_and_captioner()
    cap_params = blip_pretrain.expand(params)["captioner"]
    config = generate.GenerationConfig(max_new_tokens=6, eos_token_id=98, pad_token_id=0)
    prompt = jnp.full((2, 1), 97, jnp.int32)
    context = model.apply({"params": params}, images, method="encode_image_tokens")
    ours = generate.Generator(generate.FlaxDecoder(model, "decode_text"), max_length=8)(
        params, prompt, config, inputs={"context": context})
    theirs = generate.Generator(generate.FlaxDecoder(captioner, "decode_text"), max_length=8)(
        cap_params, prompt, config, inputs={"context": context})
    np.testing.assert_array_equal(ours.sequences, theirs.sequences)
    # decode_caption never proposes the model-only tokens [DEC] / [ENC].
    logits = model.apply({"params": params}, prompt, context=context, method="decode_caption")
    assert np.all(np.asarray(logits[..., 97:]) < -1e30)


def test_special_tokens_follow_blips_layout():
    assert blip_pretrain.special_tokens(30524) == {"dec": 30522, "enc": 30523}


def test_scanned_text_tower_is_refused():
    model = blip_pretrain.BlipPretrain(vision=VISION, text={**TEXT, "scan": True}, embed_dim=16)
    images, tokens = _inputs()
    with pytest.raises(ValueError, match="scan=False"):
        jax.eval_shape(model.init, jax.random.key(0), images, tokens, MASK)


@pytest.mark.parametrize("which", ["retrieval", "captioner"])
def test_expanded_parameters_export_to_transformers(tmp_path, pretrain, which):
    """expand -> mmjax model directory -> mmjax-convert --to hf -> transformers computes what
    BlipPretrain does (ITM logits / decoder logits)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from mmjax.convert import cli

    model, params, images, tokens = pretrain
    retrieval, captioner = _retrieval_and_captioner()
    module = blip.BlipRetrieval(vision=VISION, text=TEXT, embed_dim=16) if which == "retrieval" else captioner
    specs = [pretrained.input_spec(np.shape(a), str(np.asarray(a).dtype)) for a in (images, tokens, MASK)]
    pretrained.save(str(tmp_path / "mm"), module, blip_pretrain.expand(params)[which], specs, {"library": "mmjax"})
    cli.main(["--to", "hf", "--input", str(tmp_path / "mm"), "--output", str(tmp_path / "hf")])
    cls = BlipForImageTextRetrieval if which == "retrieval" else BlipForConditionalGeneration
    loaded, info = cls.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    kwargs = dict(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(MASK).long(),
                  pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    out = model.apply({"params": params}, images, tokens, MASK)
    with torch.no_grad():
        if which == "retrieval":
            got, want = loaded.eval()(**kwargs, use_itm_head=True).itm_score.numpy(), out["itm_logits"]
        else:
            got, want = loaded.eval()(**kwargs).logits.numpy(), out["logits"]
    diff = float(np.max(np.abs(got - np.asarray(want))))
    print(f"BlipPretrain -> expand -> transformers {cls.__name__}: max |diff| {diff:.2g}")
    assert diff <= 2e-5
