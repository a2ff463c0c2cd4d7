"""mmjax.models.vit: variants, parameter count, scan/remat equivalence, pools, input checks,
bfloat16 compute, and an architecture parity check against timm's ViT-Ti/16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmjax.models import outputs, vit

SMALL = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
IMAGE = (2, 16, 16, 3)


def _images(shape=IMAGE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _shapes(model, images):
    """Abstract variables of `model` (tracing only: no compilation, no initialisation)."""
    return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(images)))


def _random_params(model, images, seed, scale=0.2):
    """Random params with the model's own tree: LayerNorm scales near 1, the rest N(0, scale²)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if path[-1].key == "scale" else scale * noise
    return jax.tree_util.tree_map_with_path(draw, _shapes(model, images)["params"])


# ---------------------------------------------------------------------------------------------
# Variants and size
# ---------------------------------------------------------------------------------------------

# (width, depth, heads, mlp_dim): ViT paper Table 1 (B, L, H), DeiT (Ti, S), big_vision (M),
# "Scaling Vision Transformers" Table 2 (g, G).
PUBLISHED = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
    "G": (1664, 48, 16, 8192),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_variant_table_matches_published_sizes(name):
    width, depth, heads, mlp = PUBLISHED[name]
    assert vit.parse_variant(f"{name}/14") == dict(width=width, depth=depth, mlp_dim=mlp,
                                                   num_heads=heads, patch_size=14)


def test_variant_parsing_and_overrides():
    assert set(vit.VARIANTS) == set(PUBLISHED)
    assert "patch_size" not in vit.parse_variant("B")
    arch = vit.ViT(variant="B/16", depth=2, patch_size=(8, 4)).arch()
    assert arch == dict(width=768, depth=2, mlp_dim=3072, num_heads=12, patch_size=(8, 4))
    for bad in ("X/16", "B/x", "b/16"):
        with pytest.raises(ValueError, match="Unknown ViT variant"):
            vit.parse_variant(bad)
    with pytest.raises(ValueError, match="patch_size"):
        vit.ViT(variant="B").arch()


def test_vit_b16_parameter_count_matches_timm():
    """timm's vit_base_patch16_224 has 86,567,656 parameters (1000-class head)."""
    model = vit.ViT(variant="B/16", num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert count == 86_567_656
    import timm
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert sum(p.numel() for p in ref.parameters()) == count


# ---------------------------------------------------------------------------------------------
# scan / remat
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_unscanned():
    model = vit.ViT(**SMALL, num_classes=5, head_zero_init=False)
    images = _images()
    params = _random_params(model, images, seed=1)
    out = np.asarray(jax.jit(model.apply)({"params": params}, images)["logits"])
    return model, params, images, out


def _stack_layers(params, depth):
    enc = dict(params["encoder"])
    per_layer = [enc.pop(f"layer_{i}") for i in range(depth)]
    enc["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return {**params, "encoder": enc}


def test_scan_equals_unscanned(small_unscanned):
    _, params, images, out = small_unscanned
    scanned = vit.ViT(**SMALL, num_classes=5, head_zero_init=False, scan=True)
    stacked = _stack_layers(params, SMALL["depth"])
    # Same tree (names and stacked shapes) as the scanned model creates itself.
    scanned_shapes = _shapes(scanned, images)["params"]
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned_shapes)
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda x: x.shape, scanned_shapes)
    assert scanned_shapes["encoder"]["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 2, 16)
    got = np.asarray(jax.jit(scanned.apply)({"params": stacked}, images)["logits"])
    np.testing.assert_allclose(got, out, atol=1e-5, rtol=1e-5)
    assert np.abs(out).max() > 0.1      # a non-trivial output


def test_remat_keeps_outputs_and_grads(small_unscanned):
    """remat (unscanned "dots", scanned "full") == no remat: outputs and grads."""
    _, params, images, _ = small_unscanned
    depth = SMALL["depth"]
    common = dict(SMALL, num_classes=5, head_zero_init=False)
    variants = [(False, "none"), (False, "dots"), (True, "full")]

    def all_value_and_grads(p):
        results = []
        for scan, policy in variants:
            model = vit.ViT(**common, scan=scan, remat_policy=policy)

            def loss(q, model=model, scan=scan):
                logits = model.apply({"params": _stack_layers(q, depth) if scan else q}, images)["logits"]
                return jnp.sum(jnp.sin(logits)), logits
            results.append(jax.value_and_grad(loss, has_aux=True)(p))
        return results

    results = jax.jit(all_value_and_grads)(params)
    (l0, logits0), g0 = results[0]
    assert float(jnp.abs(jax.tree.leaves(g0)[0]).max()) > 0
    for (scan, policy), ((l1, logits1), g1) in zip(variants[1:], results[1:]):
        np.testing.assert_allclose(np.asarray(logits1), np.asarray(logits0), atol=1e-6, rtol=1e-6,
                                   err_msg=f"scan={scan} remat={policy}")
        np.testing.assert_allclose(float(l1), float(l0), atol=1e-6, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                             atol=1e-5, rtol=1e-5), g1, g0)


def test_unknown_remat_policy():
    with pytest.raises(ValueError, match="remat_policy"):
        jax.eval_shape(vit.ViT(**SMALL, remat_policy="sometimes").init, jax.random.key(0),
                       jnp.zeros(IMAGE))


# ---------------------------------------------------------------------------------------------
# Pools, position embeddings, heads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["cls", "gap", "map", "none"])
def test_pool_shapes(pool):
    images = _images()
    model = vit.ViT(**SMALL, pool=pool)
    variables = _shapes(model, images)
    out = jax.eval_shape(model.apply, variables, images)
    tokens = (16 // 8) ** 2
    assert out["tokens"].shape == (2, tokens + (pool == "cls"), 32)   # no [CLS] without cls pooling
    if pool == "none":
        assert set(out) == {"tokens"}
    else:
        assert set(out) == {"tokens", "pooled"} and out["pooled"].shape == (2, 32)
    assert all(x.dtype == jnp.float32 for x in out.values())
    assert ("cls" in variables["params"]) == (pool == "cls")
    assert ("map" in variables["params"]) == (pool == "map")
    posemb_len = variables["params"]["posemb"]["pos_embedding"].shape[1]
    assert posemb_len == tokens + (pool == "cls")
    if pool != "none":
        classifier = vit.ViT(**SMALL, pool=pool, num_classes=7, representation_size=16)
        cvars = _shapes(classifier, images)
        assert cvars["params"]["pre_logits"]["kernel"].shape == (32, 16)
        assert jax.eval_shape(classifier.apply, cvars, images)["logits"].shape == (2, 7)
    with pytest.raises(ValueError, match="pool"):
        jax.eval_shape(vit.ViT(**SMALL, pool="max").init, jax.random.key(0), jnp.asarray(images))


def test_map_pool_runs(small_unscanned):
    """MAP pooling with random params gives finite, example-dependent features."""
    _, _, images, _ = small_unscanned
    model = vit.ViT(**SMALL, pool="map")
    params = _random_params(model, images, seed=5)
    out = np.asarray(jax.jit(model.apply)({"params": params}, images)["pooled"])
    assert out.shape == (2, 32) and np.isfinite(out).all()
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_gap_pool_is_mean_of_tokens(small_unscanned):
    """pool="gap" averages the final-normed tokens that pool="none" returns (same params)."""
    _, params, images, _ = small_unscanned
    params = {k: v for k, v in params.items() if k not in ("cls", "head")}
    params["posemb"] = {"pos_embedding": params["posemb"]["pos_embedding"][:, 1:]}   # no [CLS]
    tokens, pooled = jax.jit(lambda p: (vit.ViT(**SMALL, pool="none").apply({"params": p}, images)["tokens"],
                                        vit.ViT(**SMALL, pool="gap").apply({"params": p}, images)["pooled"]))(params)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(tokens).mean(axis=1), atol=1e-6)


def test_outputs_and_per_block_intermediates(small_unscanned):
    """The dict holds the normed tokens, the pre-logits ([CLS] of the tokens) and the logits
    (pre-logits through the head); each block's output is sown into `intermediates`."""
    model, params, images, out = small_unscanned
    got, state = jax.jit(lambda p: model.apply({"params": p}, images, mutable=["intermediates"]))(params)
    assert set(got) == {"tokens", "pooled", "logits"}
    outputs.check(got)
    np.testing.assert_allclose(np.asarray(got["logits"]), out, atol=1e-5)
    inter = state["intermediates"]
    pre_logits = np.asarray(got["pooled"])
    np.testing.assert_allclose(pre_logits, np.asarray(got["tokens"])[:, 0], atol=1e-6)
    head = params["head"]
    np.testing.assert_allclose(pre_logits @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                               out, atol=1e-4)
    # One sown output per block (whatever the names), each (batch, tokens, width).
    per_block = jax.tree.leaves(inter["encoder"])
    assert len(per_block) == SMALL["depth"]
    assert all(x.shape == (2, 5, 32) for x in per_block)


def test_head_zero_init_and_bias():
    images = _images()
    model = vit.ViT(**dict(SMALL, depth=0), num_classes=4, head_bias_init=-2.0)
    logits = jax.jit(lambda x: model.apply(model.init(jax.random.key(0, impl="rbg"), x), x)["logits"])(images)
    np.testing.assert_allclose(np.asarray(logits), -2.0)


def test_sincos2d_posemb_is_fixed_and_added_to_patches():
    """depth=0: output = LayerNorm(patch embedding + sin-cos table), computed here in NumPy."""
    width, patch, h, w = 16, 4, 3, 5
    images = _images((2, h * patch, w * patch, 3), seed=3)
    model = vit.ViT(width=width, depth=0, mlp_dim=32, num_heads=2, patch_size=patch,
                    posemb="sincos2d", pool="none")
    params = _random_params(model, images, seed=4)
    assert "posemb" not in params and "cls" not in params
    got = np.asarray(model.apply({"params": params}, images)["tokens"])

    x = images.astype(np.float64).reshape(2, h, patch, w, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(2, h * w, patch * patch * 3)
    kernel = np.asarray(params["embedding"]["conv"]["kernel"], np.float64).reshape(-1, width)  # HWIO
    x = x @ kernel + np.asarray(params["embedding"]["conv"]["bias"])
    quarter = width // 4
    omega = 10_000.0 ** (-np.arange(quarter) / quarter)
    rows, cols = np.divmod(np.arange(h * w), w)
    pe = np.concatenate([np.sin(cols[:, None] * omega), np.cos(cols[:, None] * omega),
                         np.sin(rows[:, None] * omega), np.cos(rows[:, None] * omega)], axis=1)
    x = x + pe
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    x = x * np.asarray(params["norm"]["scale"]) + np.asarray(params["norm"]["bias"])
    np.testing.assert_allclose(got, x, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="posemb"):
        jax.eval_shape(vit.ViT(**SMALL, posemb="rope").init, jax.random.key(0), jnp.zeros(IMAGE))


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_classifier():
    model = vit.ViT(**SMALL, num_classes=5)
    return model, _shapes(model, _images())


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 16, 16), np.float32), "NHWC"),                      # grayscale, no channel axis
    (np.zeros((2, 16, 16, 1), np.float32), "3 channels"),
    (np.zeros((2, 3, 16, 16), np.float32), "NHWC"),                   # NCHW by mistake
    (np.zeros((2, 16, 16, 3), np.uint8), "floating"),
    (np.zeros((2, 16, 16, 3), np.int32), "floating"),
    (np.zeros((2, 20, 16, 3), np.float32), "divisible"),
    (np.zeros((2, 24, 24, 3), np.float32), "resample"),               # 9 patches vs 4 learned
])
def test_bad_inputs_raise_value_error(small_classifier, images, match):
    model, variables = small_classifier
    with pytest.raises(ValueError, match=match):      # raised while tracing
        jax.eval_shape(model.apply, variables, jnp.asarray(images))
    with pytest.raises(ValueError, match=match):      # and when run eagerly
        model.apply(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), variables), images)


def test_in_channels_and_missing_arch():
    model = vit.ViT(**SMALL, in_channels=1)
    variables = _shapes(model, np.zeros((1, 16, 16, 1), np.float32))
    assert variables["params"]["embedding"]["conv"]["kernel"].shape == (8, 8, 1, 32)
    with pytest.raises(ValueError, match="variant or explicit"):
        jax.eval_shape(vit.ViT(width=32, depth=1).init, jax.random.key(0), jnp.zeros(IMAGE))


# ---------------------------------------------------------------------------------------------
# bfloat16 compute
# ---------------------------------------------------------------------------------------------

def test_bfloat16_compute_close_to_float32(small_unscanned):
    _, params, images, out = small_unscanned
    model = vit.ViT(**SMALL, num_classes=5, head_zero_init=False, dtype=jnp.bfloat16)
    got = jax.jit(model.apply)({"params": params}, images)["logits"]
    assert got.dtype == jnp.float32
    diff = float(np.abs(np.asarray(got) - out).max())
    scale = float(np.abs(out).max())
    print(f"bf16 vs f32 logits: max abs diff {diff:.3g} (max |logit| {scale:.3g})")
    assert diff <= 0.05 * scale + 0.05
    assert diff > 0           # it really computed in bfloat16


# ---------------------------------------------------------------------------------------------
# Architecture parity with timm
# ---------------------------------------------------------------------------------------------

def _timm_to_mmjax(state: dict, model: vit.ViT, images) -> dict:
    """timm VisionTransformer weights as mmjax ViT params, through the conversion engine's timm table."""
    from mmjax.convert import engine
    from mmjax.convert import vit as convert_vit
    expected = engine.flatten(_shapes(model, images)["params"])
    flat = engine.to_mmjax({k: v.detach().numpy() for k, v in state.items()}, convert_vit.TIMM_TABLE, expected)
    return engine.unflatten(flat)


def test_architecture_parity_with_timm_vit_tiny():
    import timm
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    # Move LayerNorm scales/biases, linear biases and the class token away from their 1/0 init
    # so that a mis-mapped or missing parameter cannot go unnoticed.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1 or name == "cls_token":
                p.add_(0.1 * torch.randn_like(p))
            if name.startswith("head."):
                p.normal_(0.0, 0.05)
    images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(images)).numpy()

    model = vit.ViT(variant="Ti/16", num_classes=1000, ln_eps=1e-6, head_zero_init=False)
    params = _timm_to_mmjax(ref.state_dict(), model, np.zeros((1, 224, 224, 3), np.float32))
    got = np.asarray(jax.jit(model.apply)({"params": params}, images.transpose(0, 2, 3, 1))["logits"])
    diff = float(np.abs(got - want).max())
    print(f"timm vit_tiny_patch16_224 vs mmjax ViT-Ti/16 logits: max abs diff {diff:.3g} "
          f"(max |logit| {np.abs(want).max():.3g})")
    assert np.abs(want).max() > 0.1
    assert diff <= 1e-4
