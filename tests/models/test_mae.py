"""mmjax.models.mae: patchify order, masking, the encoder as a ViT, and parity with
`transformers`' ViTMAEForPreTraining at ViT-B MAE size (same noise → same mask, logits, loss)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax import layers
from mmjax.losses import masked_modeling
from mmjax.models import mae, vit

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, decoder_width=16,
            decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Copying transformers weights (what the conversion table will do).
#
# HF ViTMAEForPreTraining key (transformers 5.x in-memory names; hub checkpoints spell
# `vit.layers.N.attention.{q,k,v,o}_proj` as `vit.encoder.layer.N.attention.attention.{query,key,value}`
# / `attention.output.dense`, and `layernorm_before/after`, `intermediate.dense` / `output.dense`
# for mlp fc1 / fc2) → mmjax MAE path, transform:
#   vit.embeddings.patch_embeddings.projection.{weight,bias} → embedding/conv/{kernel,bias}  OIHW→HWIO
#   vit.embeddings.cls_token                   → cls
#   vit.embeddings.position_embeddings         → (none: fixed sin-cos, recomputed; checked equal)
#   vit.layers.N.layernorm_before / _after      → encoder/layer_N/ln1 / ln2  {weight→scale, bias}
#   vit.layers.N.attention.{q,k,v}_proj.weight  → encoder/layer_N/attn/{query,key,value}/kernel  W.T → (D, heads, hd)
#   vit.layers.N.attention.{q,k,v}_proj.bias    → .../bias  → (heads, hd)
#   vit.layers.N.attention.o_proj.weight / bias → encoder/layer_N/attn/out/kernel  W.T → (heads, hd, D) / bias
#   vit.layers.N.mlp.fc1 / fc2                  → encoder/layer_N/mlp/fc1 / fc2  {W.T, bias}
#   vit.layernorm                               → norm
#   decoder.decoder_embed                       → decoder_embed  {W.T, bias}
#   decoder.mask_token                          → mask_token
#   decoder.decoder_pos_embed                   → (none: fixed sin-cos)
#   decoder.decoder_layers.N.*                  → decoder/layer_N/* (as the encoder blocks)
#   decoder.decoder_norm / decoder.decoder_pred → decoder_norm / decoder_pred
# Scanned models stack layer_N along a leading axis under encoder/layers (decoder/layers).
# ---------------------------------------------------------------------------------------------

def _t(x):
    return np.asarray(x.detach().numpy(), np.float32)


def _ln(sd, prefix):
    return {"scale": _t(sd[prefix + ".weight"]), "bias": _t(sd[prefix + ".bias"])}


def _dense(sd, prefix):
    return {"kernel": _t(sd[prefix + ".weight"]).T, "bias": _t(sd[prefix + ".bias"])}


def _hf_block(sd, prefix, heads):
    """One HF ViT/BEiT-style layer → an mmjax Block param dict."""
    width = sd[prefix + ".attention.q_proj.weight"].shape[1]
    hd = width // heads
    attn = {}
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
        p = {"kernel": _t(sd[f"{prefix}.attention.{theirs}_proj.weight"]).T.reshape(width, heads, hd)}
        if f"{prefix}.attention.{theirs}_proj.bias" in sd:
            p["bias"] = _t(sd[f"{prefix}.attention.{theirs}_proj.bias"]).reshape(heads, hd)
        attn[ours] = p
    attn["out"] = {"kernel": _t(sd[prefix + ".attention.o_proj.weight"]).T.reshape(heads, hd, width),
                   "bias": _t(sd[prefix + ".attention.o_proj.bias"])}
    return {"ln1": _ln(sd, prefix + ".layernorm_before"), "ln2": _ln(sd, prefix + ".layernorm_after"),
            "attn": attn, "mlp": {"fc1": _dense(sd, prefix + ".mlp.fc1"), "fc2": _dense(sd, prefix + ".mlp.fc2")}}


def hf_mae_to_mmjax(model) -> dict:
    cfg, sd = model.config, model.state_dict()
    conv = _t(sd["vit.embeddings.patch_embeddings.projection.weight"]).transpose(2, 3, 1, 0)
    return {
        "embedding": {"conv": {"kernel": conv, "bias": _t(sd["vit.embeddings.patch_embeddings.projection.bias"])}},
        "cls": _t(sd["vit.embeddings.cls_token"]),
        "encoder": {f"layer_{i}": _hf_block(sd, f"vit.layers.{i}", cfg.num_attention_heads)
                    for i in range(cfg.num_hidden_layers)},
        "norm": _ln(sd, "vit.layernorm"),
        "decoder_embed": _dense(sd, "decoder.decoder_embed"),
        "mask_token": _t(sd["decoder.mask_token"]),
        "decoder": {f"layer_{i}": _hf_block(sd, f"decoder.decoder_layers.{i}", cfg.decoder_num_attention_heads)
                    for i in range(cfg.decoder_num_hidden_layers)},
        "decoder_norm": _ln(sd, "decoder.decoder_norm"),
        "decoder_pred": _dense(sd, "decoder.decoder_pred"),
    }


def set_fixed_posembs_(model):
    """This transformers version leaves the fixed sin-cos buffers at zero when built from a
    config (checkpoints carry them); fill them the way its own `initialize_weights` does."""
    from transformers.models.vit_mae import modeling_vit_mae as hf_mae

    def table(param):
        grid = round((param.shape[1] - 1) ** 0.5)
        pe = hf_mae.build_2d_sinusoidal_position_embedding(grid, grid, param.shape[-1], cls_token=True)
        half = pe.shape[-1] // 2
        return torch.cat([pe[..., half:], pe[..., :half]], dim=-1)[None].float()

    with torch.no_grad():
        for param in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
            param.copy_(table(param))


def randomize_(model, seed, skip=("position_embeddings", "decoder_pos_embed")):
    """Every trainable tensor random (norm scales near 1), so no zero bias hides a mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.05 * noise)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

def test_patchify_matches_hf_order_and_roundtrips():
    import transformers
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=32))
    set_fixed_posembs_(hf)
    images = _images((2, 32, 32, 3))
    ref = hf.patchify(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(mae.patchify(jnp.asarray(images), 8))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.asarray(mae.unpatchify(jnp.asarray(ours), 8, (4, 4))), images)
    # HF's fixed position embeddings ([CLS] row zero) are the sin-cos table mmjax recomputes.
    pos = hf.vit.embeddings.position_embeddings.detach().numpy()[0]
    np.testing.assert_allclose(pos[1:], layers.sincos_2d((4, 4), 32)[0], atol=1e-6)
    np.testing.assert_array_equal(pos[0], 0.0)
    with pytest.raises(ValueError, match="not divisible"):
        mae.patchify(jnp.zeros((1, 30, 32, 3)), 8)


def test_random_masking_keeps_smallest_noise():
    noise = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 16)), jnp.float32)
    x = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32)[None, :, None], (3, 16, 2))
    visible, mask, ids_restore = mae.random_masking(x, noise, 0.75)
    assert visible.shape == (3, 4, 2) and mask.shape == (3, 16)
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), 12)
    for row in range(3):
        kept = np.sort(np.argsort(np.asarray(noise[row]))[:4])
        np.testing.assert_array_equal(np.sort(np.asarray(visible[row, :, 0])), kept)
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(mask[row]) == 0), kept)
    np.testing.assert_array_equal(np.take_along_axis(np.argsort(np.asarray(noise), 1), np.asarray(ids_restore), 1),
                                  np.tile(np.arange(16), (3, 1)))
    with pytest.raises(ValueError, match="noise must be shaped"):
        mae.random_masking(x, noise[:, :8], 0.75)


@pytest.fixture(scope="module")
def tiny():
    """A tiny MAE, its params and a batch (initialised once for the tests below)."""
    model = mae.MAE(**TINY)
    images = jnp.asarray(_images((2, 16, 16, 3)))
    noise = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 16)), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images, noise)["params"])
    rng = np.random.default_rng(2)                     # random params without compiling init

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.2 * noise
    return model, jax.tree_util.tree_map_with_path(draw, shapes), images, noise


def test_model_shapes_errors_and_rng_masking(tiny):
    model, params, images, _ = tiny
    with pytest.raises(ValueError, match="'masking' rng"):
        jax.eval_shape(model.init, jax.random.key(0), images)
    out = jax.jit(model.apply)({"params": params}, images, rngs={"masking": jax.random.key(2)})
    assert set(out) == {"pred", "mask", "ids_restore", "tokens"}
    assert out["pred"].shape == (2, 16, 48) and out["mask"].shape == (2, 16)
    assert out["tokens"].shape == (2, 1 + 4, 32)
    np.testing.assert_array_equal(np.asarray(out["mask"].sum(1)), 12)
    with pytest.raises(ValueError, match="mask_ratio"):
        jax.eval_shape(mae.MAE(**dict(TINY, mask_ratio=1.0)).init, jax.random.key(0), images, jnp.zeros((2, 16)))


def test_encoder_is_a_vit_and_scan_matches(tiny):
    """The MAE encoder params load unchanged into vit.ViT(pool='cls', posemb='sincos2d')."""
    model, params, images, noise = tiny
    feats = jax.jit(functools.partial(model.apply, method="features"))({"params": params}, images)
    enc = vit.ViT(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, pool="cls", posemb="sincos2d")
    enc_params = {k: params[k] for k in ("embedding", "cls", "encoder", "norm")}
    tokens = jax.jit(enc.apply)({"params": enc_params}, images)["tokens"]
    np.testing.assert_allclose(np.asarray(feats), np.asarray(tokens), atol=1e-6)

    stacked = dict(params)
    for name in ("encoder", "decoder"):
        blocks = [params[name][f"layer_{i}"] for i in range(len(params[name]))]
        stacked[name] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    a = jax.jit(model.apply)({"params": params}, images, noise)["pred"]
    b = jax.jit(mae.MAE(**TINY, scan=True).apply)({"params": stacked}, images, noise)["pred"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Parity with transformers at ViT-B MAE size
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_mae_base():
    import transformers
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig()).eval()   # ViT-B, dec 512d8b
    set_fixed_posembs_(model)
    randomize_(model, seed=0)
    return model


def test_parity_with_transformers_vitmae_base(hf_mae_base):
    hf = hf_mae_base
    images = _images((2, 224, 224, 3), seed=3)
    noise = np.random.default_rng(4).uniform(size=(2, 196)).astype(np.float32)
    model = mae.MAE(variant="B/16", ln_eps=hf.config.layer_norm_eps)
    params = hf_mae_to_mmjax(hf)
    expected = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                            jnp.zeros((1, 196)))["params"])
    assert jax.tree.structure(expected) == jax.tree.structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)))
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(images), jnp.asarray(noise))
    pred = out["pred"]
    for norm_pix in (False, True):
        hf.config.norm_pix_loss = norm_pix
        with torch.no_grad():
            ref = hf(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
        loss, _ = masked_modeling.mim_pixels(pred, mae.patchify(jnp.asarray(images), 16), out["mask"],
                                             norm_pix=norm_pix)
        np.testing.assert_array_equal(np.asarray(out["mask"]), ref.mask.numpy())
        np.testing.assert_array_equal(np.asarray(out["ids_restore"]), ref.ids_restore.numpy())
        diff = np.abs(np.asarray(pred) - ref.logits.numpy()).max()
        loss_diff = abs(float(loss) - float(ref.loss))
        print(f"\nMAE-B/16 vs transformers ViTMAEForPreTraining (norm_pix_loss={norm_pix}): logits max-abs-diff "
              f"{diff:.2e}, loss {float(loss):.6f} vs {float(ref.loss):.6f} (diff {loss_diff:.2e})")
        assert diff < 1e-4 and loss_diff < 1e-4


def test_finetune_vit_matches_timm_mae_finetuning_model():
    """MAE fine-tunes a ViT that keeps [CLS] but averages the patch tokens, then fc_norm: mmjax
    ViT(pool='gap', class_token=True, fc_norm=True) against timm's VisionTransformer so set up."""
    import timm
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
        global_pool="avg", class_token=True, fc_norm=True).eval()
    randomize_(ref, seed=7)
    sd = ref.state_dict()
    params = {"embedding": {"conv": {"kernel": _t(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),
                                     "bias": _t(sd["patch_embed.proj.bias"])}},
              "cls": _t(sd["cls_token"]), "posemb": {"pos_embedding": _t(sd["pos_embed"])},
              "norm": _ln(sd, "fc_norm"), "head": _dense(sd, "head"), "encoder": {}}
    for i in range(2):
        p = f"blocks.{i}"
        q, k, v = np.split(_t(sd[p + ".attn.qkv.weight"]), 3)
        qb, kb, vb = np.split(_t(sd[p + ".attn.qkv.bias"]), 3)
        attn = {n: {"kernel": w.T.reshape(32, 2, 16), "bias": b.reshape(2, 16)}
                for n, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb))}
        attn["out"] = {"kernel": _t(sd[p + ".attn.proj.weight"]).T.reshape(2, 16, 32),
                       "bias": _t(sd[p + ".attn.proj.bias"])}
        mlp = {"fc1": _dense(sd, p + ".mlp.fc1"), "fc2": _dense(sd, p + ".mlp.fc2")}
        params["encoder"][f"layer_{i}"] = {"ln1": _ln(sd, p + ".norm1"), "ln2": _ln(sd, p + ".norm2"), "attn": attn,
                                           "mlp": mlp}
    images = _images((2, 32, 32, 3), seed=8)
    with torch.no_grad():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    model = vit.ViT(width=32, depth=2, num_heads=2, mlp_dim=128, patch_size=8, num_classes=5, pool="gap",
                    class_token=True, fc_norm=True)
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images))["logits"])
    diff = np.abs(got - expected).max()
    print(f"\nMAE fine-tuning ViT (cls + gap + fc_norm) vs timm: max-abs-diff {diff:.2e}")
    assert diff < 1e-5
    with pytest.raises(ValueError, match="class_token"):
        jax.eval_shape(vit.ViT(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, class_token=False).init,
                       jax.random.key(0), jnp.asarray(images))
