"""mmjax.models.beit: relative position index, masking, heads, and parity at BEiT-B/16 size with
`transformers`' BeitForMaskedImageModeling (shared relative position bias, same
`bool_masked_pos` → same logits and loss) and timm's beit_base_patch16_224 (per-layer bias,
mean pooling, scanned layers); BeitForImageClassification at a small size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax import layers
from mmjax.data import masking
from mmjax.losses import masked_modeling
from mmjax.models import beit

# ---------------------------------------------------------------------------------------------
# Copying reference weights (what the conversion tables will do).
#
# transformers (5.x in-memory names; hub checkpoints use `beit.encoder.layer.N.attention.attention.
# {query,key,value}`, `attention.output.dense`, `intermediate.dense`, `output.dense`) → mmjax:
#   beit.embeddings.patch_embeddings.projection.{weight,bias} → embedding/conv/{kernel,bias}  OIHW→HWIO
#   beit.embeddings.cls_token / mask_token        → cls / mask_token
#   beit.embeddings.position_embeddings           → posemb/pos_embedding (abs_posemb=True only)
#   beit.shared_position_bias.relative_position_bias_table → rel_pos_bias/table   (rel_pos="shared")
#   beit.layers.N.relative_position_bias.relative_position_bias_table
#                                                → encoder/layer_N/rel_pos_bias/table  (rel_pos="layer")
#   beit.layers.N.lambda_1 / lambda_2             → encoder/layer_N/ls1 / ls2
#   beit.layers.N.layernorm_before / _after       → encoder/layer_N/ln1 / ln2
#   beit.layers.N.attention.{q,k,v}_proj.weight   → encoder/layer_N/attn/{query,key,value}/kernel  W.T → (D, heads, hd)
#   beit.layers.N.attention.{q,v}_proj.bias       → .../{query,value}/bias → (heads, hd)   (k has no bias)
#   beit.layers.N.attention.o_proj                → encoder/layer_N/attn/out  (W.T → (heads, hd, D))
#   beit.layers.N.mlp.fc1 / fc2                   → encoder/layer_N/mlp/fc1 / fc2
#   layernorm (MIM) / beit.pooler.layernorm (classification, mean pooling) → norm
#   lm_head (MIM) / classifier (classification)  → head
# timm beit_*: cls_token, patch_embed.proj, blocks.N.{norm1, norm2, gamma_1, gamma_2, mlp.fc1, mlp.fc2,
#   attn.proj, attn.relative_position_bias_table}, fc_norm (or norm without mean pooling), head as above;
#   attn.qkv.weight (3D, D) splits into q, k, v rows; attn.q_bias / attn.v_bias are the q / v biases.
# Scanned models stack layer_N along a leading axis under encoder/layers.
# ---------------------------------------------------------------------------------------------


def _t(x):
    return np.asarray(x.detach().numpy(), np.float32)


def _ln(sd, prefix):
    return {"scale": _t(sd[prefix + ".weight"]), "bias": _t(sd[prefix + ".bias"])}


def _dense(sd, prefix):
    return {"kernel": _t(sd[prefix + ".weight"]).T, "bias": _t(sd[prefix + ".bias"])}


def _heads(w, b, heads):
    """A torch (heads*hd, D) projection → mmjax HeadsDense params."""
    width = w.shape[1]
    out = {"kernel": w.T.reshape(width, heads, -1)}
    if b is not None:
        out["bias"] = b.reshape(heads, -1)
    return out


def _block(ln1, ln2, q, k, v, out_w, out_b, ls1, ls2, fc1, fc2, heads, table=None):
    width = q[0].shape[1]
    block = {"ln1": ln1, "ln2": ln2, "ls1": ls1, "ls2": ls2, "mlp": {"fc1": fc1, "fc2": fc2},
             "attn": {"query": _heads(*q, heads), "key": _heads(*k, heads), "value": _heads(*v, heads),
                      "out": {"kernel": out_w.T.reshape(heads, width // heads, width), "bias": out_b}}}
    if table is not None:
        block["rel_pos_bias"] = {"table": table}
    return block


def _embedding(sd, prefix):
    return {"conv": {"kernel": _t(sd[prefix + ".weight"]).transpose(2, 3, 1, 0), "bias": _t(sd[prefix + ".bias"])}}


def hf_beit_to_mmjax(model) -> dict:
    cfg, sd = model.config, model.state_dict()
    heads = cfg.num_attention_heads
    params = {"embedding": _embedding(sd, "beit.embeddings.patch_embeddings.projection"),
              "cls": _t(sd["beit.embeddings.cls_token"]), "encoder": {}}
    if "beit.embeddings.mask_token" in sd:
        params["mask_token"] = _t(sd["beit.embeddings.mask_token"])
    if "beit.shared_position_bias.relative_position_bias_table" in sd:
        params["rel_pos_bias"] = {"table": _t(sd["beit.shared_position_bias.relative_position_bias_table"])}
    for i in range(cfg.num_hidden_layers):
        p = f"beit.layers.{i}"
        proj = {n: (_t(sd[f"{p}.attention.{n}_proj.weight"]),
                    _t(sd[f"{p}.attention.{n}_proj.bias"]) if f"{p}.attention.{n}_proj.bias" in sd else None)
                for n in "qkv"}
        table = sd.get(f"{p}.relative_position_bias.relative_position_bias_table")
        params["encoder"][f"layer_{i}"] = _block(
            _ln(sd, p + ".layernorm_before"), _ln(sd, p + ".layernorm_after"), proj["q"], proj["k"], proj["v"],
            _t(sd[p + ".attention.o_proj.weight"]), _t(sd[p + ".attention.o_proj.bias"]),
            _t(sd[p + ".lambda_1"]), _t(sd[p + ".lambda_2"]), _dense(sd, p + ".mlp.fc1"), _dense(sd, p + ".mlp.fc2"),
            heads, None if table is None else _t(table))
    if "lm_head.weight" in sd:
        params.update(norm=_ln(sd, "layernorm"), head=_dense(sd, "lm_head"))
    else:
        params.update(norm=_ln(sd, "beit.pooler.layernorm"), head=_dense(sd, "classifier"))
    return params


def timm_beit_to_mmjax(model) -> dict:
    sd, heads = model.state_dict(), model.blocks[0].attn.num_heads
    params = {"embedding": _embedding(sd, "patch_embed.proj"), "cls": _t(sd["cls_token"]), "encoder": {}}
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        q, k, v = np.split(_t(sd[p + ".attn.qkv.weight"]), 3)
        params["encoder"][f"layer_{i}"] = _block(
            _ln(sd, p + ".norm1"), _ln(sd, p + ".norm2"), (q, _t(sd[p + ".attn.q_bias"])), (k, None),
            (v, _t(sd[p + ".attn.v_bias"])), _t(sd[p + ".attn.proj.weight"]), _t(sd[p + ".attn.proj.bias"]),
            _t(sd[p + ".gamma_1"]), _t(sd[p + ".gamma_2"]), _dense(sd, p + ".mlp.fc1"), _dense(sd, p + ".mlp.fc2"),
            heads, _t(sd[p + ".attn.relative_position_bias_table"]))
    params.update(norm=_ln(sd, "fc_norm"), head=_dense(sd, "head"))
    return params


def stack_layers(params: dict) -> dict:
    """Unscanned encoder/layer_N → scanned encoder/layers (leading layer axis)."""
    blocks = [params["encoder"][f"layer_{i}"] for i in range(len(params["encoder"]))]
    return dict(params, encoder={"layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)})


def randomize_(model, seed):
    """Every tensor random (norm scales near 1): no zero table or bias hides a mapping mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else (0.5 if "bias_table" in name else 0.05) * noise)


def _check_tree(model, params, *args):
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(params)):
        assert a.shape == b.shape, (path, a.shape, b.shape)


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [(14, 14), (3, 5)])
def test_relative_position_index_matches_timm(window):
    from timm.models.beit import gen_relative_position_index
    np.testing.assert_array_equal(layers.relative_position_index(window),
                                  gen_relative_position_index(window).numpy())


def test_heads_masking_and_errors():
    small = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4)
    images = jnp.asarray(_images((2, 16, 16, 3)))
    masked = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16)) < 0.4)
    mim = beit.BEiT(**small, vocab_size=10)
    shapes = nn.meta.unbox(jax.eval_shape(mim.init, jax.random.key(0), images, masked)["params"])
    assert shapes["rel_pos_bias"]["table"].shape == (7 * 7 + 3, 2)
    assert "bias" not in shapes["encoder"]["layer_0"]["attn"]["key"]          # BEiT: no key bias
    assert "bias" in shapes["encoder"]["layer_0"]["attn"]["query"]
    mim_out = jax.eval_shape(mim.apply, {"params": shapes}, images, masked)
    assert set(mim_out) == {"tokens", "logits"} and mim_out["logits"].shape == (2, 16, 10)
    assert mim_out["tokens"].shape == (2, 17, 32)
    cls = beit.BEiT(**small, num_classes=5, rel_pos="layer")
    shapes = nn.meta.unbox(jax.eval_shape(cls.init, jax.random.key(0), images)["params"])
    assert "mask_token" not in shapes and "rel_pos_bias" not in shapes
    assert shapes["encoder"]["layer_0"]["rel_pos_bias"]["table"].shape == (52, 2)
    cls_out = jax.eval_shape(cls.apply, {"params": shapes}, images)
    assert set(cls_out) == {"tokens", "pooled", "logits"} and cls_out["logits"].shape == (2, 5)
    with pytest.raises(ValueError, match="needs a mask token"):
        jax.eval_shape(cls.init, jax.random.key(0), images, masked)
    with pytest.raises(ValueError, match="bool_masked_pos must be shaped"):
        jax.eval_shape(mim.init, jax.random.key(0), images, masked[:, :8])
    with pytest.raises(ValueError, match="not both"):
        jax.eval_shape(beit.BEiT(**small, vocab_size=10, num_classes=5).init, jax.random.key(0), images)
    with pytest.raises(ValueError, match="Unknown rel_pos"):
        jax.eval_shape(beit.BEiT(**small, rel_pos="relative").init, jax.random.key(0), images)


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------

def test_mim_parity_with_transformers_beit_base():
    import transformers
    config = transformers.BeitConfig(use_mask_token=True, use_shared_relative_position_bias=True)  # B/16
    ref = transformers.BeitForMaskedImageModeling(config).eval()
    randomize_(ref, seed=0)
    images = _images((2, 224, 224, 3), seed=1)
    mask = np.array(masking.block_masks(jax.random.key(0), 2))
    labels = np.random.default_rng(2).integers(0, 8192, size=(2, 196))
    with torch.no_grad():
        out = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), bool_masked_pos=torch.from_numpy(mask),
                  labels=torch.from_numpy(labels[mask]))
    model = beit.BEiT(variant="B/16", vocab_size=8192, ln_eps=config.layer_norm_eps)
    params = hf_beit_to_mmjax(ref)
    _check_tree(model, params, jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 196), bool))
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(images), jnp.asarray(mask))["logits"]
    loss, _ = masked_modeling.mim_tokens(logits, jnp.asarray(labels), jnp.asarray(mask))
    diff = np.abs(np.asarray(logits) - out.logits.numpy()).max()
    print(f"\nBEiT-B/16 MIM vs transformers BeitForMaskedImageModeling ({int(mask.sum())} masked): logits "
          f"max-abs-diff {diff:.2e}, loss {float(loss):.6f} vs {float(out.loss):.6f}")
    assert diff < 1e-4 and abs(float(loss) - float(out.loss)) < 1e-4


def test_classification_parity_with_timm_beit_base_scanned():
    import timm
    ref = timm.create_model("beit_base_patch16_224", pretrained=False).eval()
    randomize_(ref, seed=3)
    images = _images((2, 224, 224, 3), seed=4)
    with torch.no_grad():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    model = beit.BEiT(variant="B/16", num_classes=1000, rel_pos="layer", scan=True)
    params = stack_layers(timm_beit_to_mmjax(ref))
    del ref
    _check_tree(model, params, jnp.zeros((1, 224, 224, 3)))
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images))["logits"])
    diff = np.abs(logits - expected).max()
    print(f"\nBEiT-B/16 classifier (scanned, per-layer rel-pos) vs timm beit_base_patch16_224: "
          f"logits max-abs-diff {diff:.2e} (logit std {expected.std():.2f})")
    assert diff < 1e-4


def test_classification_parity_with_transformers_small():
    import transformers
    config = transformers.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, image_size=32, patch_size=8, num_labels=7,
                                     use_relative_position_bias=True, use_absolute_position_embeddings=True)
    ref = transformers.BeitForImageClassification(config).eval()
    randomize_(ref, seed=5)
    images = _images((2, 32, 32, 3), seed=6)
    with torch.no_grad():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
    model = beit.BEiT(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, num_classes=7,
                      rel_pos="layer", abs_posemb=True, ln_eps=config.layer_norm_eps)
    params = hf_beit_to_mmjax(ref)
    params["posemb"] = {"pos_embedding": _t(ref.state_dict()["beit.embeddings.position_embeddings"])}
    _check_tree(model, params, jnp.zeros((1, 32, 32, 3)))
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images))["logits"])
    diff = np.abs(logits - expected).max()
    print(f"\nBEiT (small) classifier vs transformers BeitForImageClassification: max-abs-diff {diff:.2e}")
    assert diff < 1e-4


# ---------------------------------------------------------------------------------------------
# BEiT's rescaled init (`fix_init_weight`): block l's attention-output and fc2 kernels ÷ sqrt(2l)
# ---------------------------------------------------------------------------------------------

def _timm_rescale_factors(monkeypatch, depth):
    """timm Beit's per-layer factors (attn.proj, mlp.fc2): its init over the same seed's init
    without fix_init_weight."""
    from timm.models import beit as timm_beit
    kw = dict(img_size=16, patch_size=8, embed_dim=16, depth=depth, num_heads=2, num_classes=0)
    torch.manual_seed(0)
    fixed = timm_beit.Beit(**kw)
    monkeypatch.setattr(timm_beit.Beit, "fix_init_weight", lambda self: None)
    torch.manual_seed(0)
    plain = timm_beit.Beit(**kw)

    def ratio(a, b):
        a, b = _t(a), _t(b)
        return float((a * b).sum() / (b * b).sum())

    return np.asarray([[ratio(f.attn.proj.weight, p.attn.proj.weight), ratio(f.mlp.fc2.weight, p.mlp.fc2.weight)]
                       for f, p in zip(fixed.blocks, plain.blocks)])


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_rescale_init_follows_beit_rule_and_timm(monkeypatch, scan):
    """The block stack's `rescale_init` (what BEiT turns on) against the rule and timm's Beit."""
    depth = 3
    timm_factors = _timm_rescale_factors(monkeypatch, depth)

    def init_both(rng):
        encoders = (layers.Stack(layers.BlockConfig(num_heads=2, mlp_dim=32), depth=depth, scan=scan, rescale_init=r)
                    for r in (True, False))
        return [encoder.init(rng, jnp.zeros((1, 5, 16)))["params"] for encoder in encoders]

    # Scanned: one compilation for both inits halves the time of two eager ones; unrolled: eager is quicker.
    boxed, plain = (jax.jit(init_both) if scan else init_both)(jax.random.key(0))
    on, off = nn.meta.unbox(boxed), nn.meta.unbox(plain)
    layer = (lambda p, i: jax.tree.map(lambda x: x[i], p["layers"])) if scan else (lambda p, i: p[f"layer_{i}"])
    ours = []
    for i in range(depth):
        rule = 1 / np.sqrt(2 * (i + 1))
        pair = []
        for path in (("attn", "out", "kernel"), ("mlp", "fc2", "kernel")):
            a, b = (np.asarray(layer(p, i)[path[0]][path[1]][path[2]]) for p in (on, off))
            np.testing.assert_allclose(a, b * rule, rtol=1e-6, atol=1e-9)
            pair.append(a.std() / b.std())
        ours.append(pair)
        print(f"\nlayer {i + 1}: std ratio (attn out, fc2) {pair[0]:.4f} {pair[1]:.4f}; "
              f"timm {timm_factors[i, 0]:.4f} {timm_factors[i, 1]:.4f}; rule {rule:.4f}")
    diff = np.abs(np.asarray(ours) - timm_factors).max()
    kind = "scanned" if scan else "unrolled"
    print(f"BEiT rescale factors vs timm fix_init_weight ({kind}): max-abs-diff {diff:.1e}")
    assert diff < 1e-5
    # Nothing else changes and the sharding metadata survives.
    flat_on, flat_off = (jax.tree_util.tree_leaves_with_path(p) for p in (on, off))
    changed = [tuple(k.key for k in path) for (path, a), (_, b) in zip(flat_on, flat_off) if not np.array_equal(a, b)]
    assert len(changed) == (2 if scan else 2 * depth), changed
    assert all(path[-3:] in layers.RESIDUAL_OUT_KERNELS for path in changed), changed
    out_kernel = boxed["layers" if scan else "layer_0"]["attn"]["out"]["kernel"]
    assert isinstance(out_kernel, nn.LogicallyPartitioned)
    assert out_kernel.names == (("layers",) if scan else ()) + ("heads", "kv", "embed")


def test_beit_rescales_its_init_by_default():
    """BEiT hands `rescale_init` (default on, as BEiT's from-scratch init) to its encoder.
    Traced only (eval_shape): the rescaling itself is tested above."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.Stack):
            seen.append(context.module.rescale_init)
        return next_fun(*args, **kwargs)

    small = dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8, num_classes=3)
    with nn.intercept_methods(record):
        for model in (beit.BEiT(**small), beit.BEiT(**small, rescale_init=False)):
            jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert seen == [True, False]
