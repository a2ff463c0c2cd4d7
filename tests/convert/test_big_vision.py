"""JAX .npz ViT checkpoints (google-research/vision_transformer and big_vision) <-> mmjax, with
timm's `_load_weights` as the reference reader: logit parity of an exported ViT-B/16, an exact
re-import, a hand-written big_vision file (scanned blocks, params/ prefix, optimizer state, mean
pooling, no head) read alike by both, and refusals that name the key or field at fault."""

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer, _load_weights

import mmjax
from mmjax import pretrained
from mmjax.convert import api, big_vision, engine
from mmjax.convert.engine import ConversionError

NAME = "vit_base_patch16_224"


@pytest.fixture(scope="module")
def base(module_tmp, randomize, images, convert):
    """A random timm ViT-B/16 converted to mmjax (the timm path), then written as .npz by --to big_vision."""
    tmp = module_tmp("big_vision")
    torch.manual_seed(0)
    ref = randomize(timm.create_model(NAME, pretrained=False))
    with torch.no_grad():
        ref.head.weight.normal_(0.0, 0.05)
    save_file(ref.state_dict(), str(tmp / "model.safetensors"))
    convert("--source", "timm", "--model", NAME, "--checkpoint", tmp / "model.safetensors", "--output", tmp / "mm")
    convert("--to", "big_vision", "--input", tmp / "mm", "--output", tmp / "model.npz")
    model, variables = mmjax.load(str(tmp / "mm"))
    x = images(2)
    got = np.asarray(jax.jit(model.apply)(variables, x)["logits"])
    return {"tmp": tmp, "x": x, "got": got, "variables": variables}


def test_exported_npz_loads_in_timm_with_the_same_logits(base, randomize, diff):
    """timm's own .npz reader, into a ViT-B/16 with other random weights: every weight must be
    overwritten, and transposed rightly, for the logits to match."""
    with np.load(base["tmp"] / "model.npz") as f:
        assert f["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (768, 12, 64)
        assert f["Transformer/encoderblock_11/MultiHeadDotProductAttention_1/out/kernel"].shape == (12, 64, 768)
        assert f["embedding/kernel"].shape == (16, 16, 3, 768)
    fresh = randomize(timm.create_model(NAME, pretrained=False), seed=5)
    _load_weights(fresh, str(base["tmp"] / "model.npz"))
    with torch.no_grad():
        want = fresh(torch.from_numpy(base["x"].transpose(0, 3, 1, 2))).numpy()
    assert diff(base["got"], want, f"mmjax {NAME} vs timm _load_weights of the exported .npz, logits") <= 2e-5


def test_reimport_is_exact(base, reimport_equals):
    plan = reimport_equals("big_vision", base["tmp"] / "model.npz", base["variables"])
    assert plan.source["layout"] == "vision_transformer"
    assert {k: plan.fields[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "pool",
                                        "num_classes")} == dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
                                                                patch_size=16, pool="cls", num_classes=1000)
    assert tuple(plan.inputs[0]["shape"]) == (1, 224, 224, 3)


# --- a small big_vision file, written here by hand ----------------------------------------------

SMALL = dict(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8)
BV_BLOCK = {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0", "ln2": "LayerNorm_1",
            "mlp/fc1": "MlpBlock_0/Dense_0", "mlp/fc2": "MlpBlock_0/Dense_1"}
BV_MAP = {"probe": "probe", "attn": "MultiHeadDotProductAttention_0", "ln": "LayerNorm_0",
          "mlp/fc1": "MlpBlock_0/Dense_0", "mlp/fc2": "MlpBlock_0/Dense_1"}


def _big_vision_name(part: str, names: dict) -> str:
    """One module's big_vision name: `attn/query/kernel` -> `MultiHeadDotProductAttention_0/query/kernel`."""
    module, leaf = part.rsplit("/", 1) if "/" in part else (part, "")
    if module.startswith("attn/"):
        return f"{names['attn']}/{module[len('attn/'):]}/{leaf}"
    return f"{names[module]}/{leaf}" if leaf else names[module]


def random_params(**fields) -> dict:
    """Random flat params of a small ViT at 32 px, every one far from its init."""
    model = mmjax.models.vit.ViT(**SMALL, **fields)
    shapes = pretrained.abstract_params(model, [pretrained.input_spec((1, 32, 32, 3))])
    rng = np.random.default_rng(0)
    return {p: rng.normal(0, 0.3, s.shape).astype(np.float32) for p, s in shapes.items()}


def big_vision_npz(flat: dict) -> dict:
    """big_vision's layout of mmjax ViT params, spelled out independently of the converter: params/
    prefix, top-level pos_embedding, scanned blocks (a leading layer axis), an optimizer's state."""
    out = {"params/embedding/kernel": flat["embedding/conv/kernel"],
           "params/embedding/bias": flat["embedding/conv/bias"],
           "params/pos_embedding": flat["posemb/pos_embedding"],
           "params/Transformer/encoder_norm/scale": flat["norm/scale"],
           "params/Transformer/encoder_norm/bias": flat["norm/bias"]}
    for path in flat:
        if path.startswith("encoder/layer_0/"):
            part = path[len("encoder/layer_0/"):]
            layers = [flat[f"encoder/layer_{i}/{part}"] for i in range(SMALL["depth"])]
            out[f"params/Transformer/encoderblock/{_big_vision_name(part, BV_BLOCK)}"] = np.stack(layers)
        elif path.startswith("map/"):
            out[f"params/MAPHead_0/{_big_vision_name(path[len('map/'):], BV_MAP)}"] = flat[path]
    out["opt/state/mu/embedding/kernel"] = np.zeros_like(out["params/embedding/kernel"])
    return out


@pytest.fixture(scope="module")
def small(module_tmp):
    """A random mean-pooled ViT without class token or head, as a big_vision .npz."""
    tmp = module_tmp("big_vision_small")
    flat = random_params(pool="gap", class_token=False)
    np.savez(tmp / "bv.npz", **big_vision_npz(flat))
    return {"tmp": tmp, "flat": flat}


def test_big_vision_layout_matches_timm(small, images, convert, capsys, diff):
    """timm and mmjax read the scanned, prefixed file alike; the optimizer state is skipped with a note."""
    tmp = small["tmp"]
    convert("--source", "big_vision", "--checkpoint", tmp / "bv.npz", "--output", tmp / "mm")
    out = capsys.readouterr().out
    assert "skipped 1 optimizer-state arrays" in out and "mean of the patch tokens" in out
    model, variables = mmjax.load(str(tmp / "mm"))
    assert (model.pool, model.class_token, model.num_classes) == ("gap", False, None)
    loaded = engine.flatten(variables["params"])
    assert set(loaded) == set(small["flat"])
    for path, value in small["flat"].items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                            act_layer="gelu_tanh", class_token=False, global_pool="avg", fc_norm=False,
                            num_classes=0).eval()
    _load_weights(ref, str(tmp / "bv.npz"))
    x = images(2, 32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = model.apply(variables, x)["pooled"]
    assert diff(got, want, "timm vs mmjax, big_vision scanned GAP ViT, pooled features") <= 1e-6


def test_map_head_matches_timm(small, images, diff):
    """A MAP-pooled big_vision ViT (MAPHead_0) with a head: timm and mmjax give the same logits."""
    flat = random_params(pool="map", class_token=False, num_classes=10)
    state = big_vision_npz(flat)
    state.update({"params/head/kernel": flat["head/kernel"], "params/head/bias": flat["head/bias"]})
    np.savez(small["tmp"] / "map.npz", **state)
    plan, read = api.plan_import("big_vision", str(small["tmp"] / "map.npz"))
    assert (plan.fields["pool"], plan.fields["num_classes"]) == ("map", 10)
    model = pretrained.build(plan.model_class, plan.fields)
    params = engine.to_mmjax(read, plan.table, pretrained.abstract_params(model, plan.inputs))
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                            act_layer="gelu_tanh", class_token=False, global_pool="map", num_classes=10).eval()
    _load_weights(ref, str(small["tmp"] / "map.npz"))
    x = images(2, 32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = model.apply({"params": engine.unflatten(params)}, x)["logits"]
    assert diff(got, want, "timm vs mmjax, big_vision MAP-pooled ViT, logits") <= 2e-5


@pytest.fixture(scope="module")
def small_vit_npz(small, convert):
    """The small model exported in the vision_transformer layout: its keys, as a dict."""
    tmp = small["tmp"]
    if not (tmp / "mm").exists():
        convert("--source", "big_vision", "--checkpoint", tmp / "bv.npz", "--output", tmp / "mm")
    convert("--to", "big_vision", "--input", tmp / "mm", "--output", tmp / "vt.npz")
    with np.load(tmp / "vt.npz") as f:
        return {k: f[k] for k in f.files}


def test_gap_export_round_trips(small, small_vit_npz):
    assert "cls" not in small_vit_npz and "Transformer/posembed_input/pos_embedding" in small_vit_npz
    plan = big_vision.from_npz(small_vit_npz)
    flat = engine.to_mmjax(small_vit_npz, plan.table, small["flat"])
    for path, value in small["flat"].items():
        np.testing.assert_array_equal(flat[path], value, err_msg=path)


def _import_error(tmp, state) -> str:
    np.savez(tmp / "bad.npz", **state)
    with pytest.raises(ConversionError) as e:
        api.import_checkpoint("big_vision", str(tmp / "bad.npz"), str(tmp / "bad_mm"))
    return str(e.value)


def test_missing_key_is_named(small, small_vit_npz):
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"
    state = {k: v for k, v in small_vit_npz.items() if k != key}
    message = _import_error(small["tmp"], state)
    assert "1 missing model parameters" in message and f"encoder/layer_1/mlp/fc2/bias (64,), from {key}" in message


def test_unexpected_key_is_named(small, small_vit_npz):
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_2/kernel"
    message = _import_error(small["tmp"], {**small_vit_npz, key: np.zeros((64, 64), np.float32)})
    assert "1 unexpected keys" in message and key in message


def test_name_is_checked_against_the_shapes(small_vit_npz):
    big_vision.from_npz(small_vit_npz, None)
    with pytest.raises(ConversionError, match=r"not a B/16: width=768 \(the file has 64\)"):
        big_vision.from_npz(small_vit_npz, "B/16")
    with pytest.raises(ConversionError, match="image_size=224 .the file has 32."):
        big_vision.from_npz(small_vit_npz, "vit_tiny_patch8_224")


def test_two_tower_files_are_refused():
    with pytest.raises(ConversionError, match="two-tower big_vision checkpoint .SigLIP"):
        big_vision.from_npz({"params/img/embedding/kernel": np.zeros((16, 16, 3, 8))})


@pytest.mark.parametrize("fields, reason", [
    ({"variant": "B/16", "pool": "map"}, "pool='map'"),
    ({"variant": "B/16", "conv_stem": [48, 96]}, "conv_stem"),
    ({"variant": "B/16", "pool": "gap", "class_token": True}, "class_token=True"),
    ({"variant": "B/16", "act": "quick_gelu"}, "act='quick_gelu'"),
])
def test_export_refuses_what_the_layout_cannot_express(fields, reason):
    with pytest.raises(ConversionError, match=reason.replace("[", r"\[")):
        big_vision.npz_export({"fields": fields})


def test_export_needs_an_npz_name(small, small_vit_npz):
    with pytest.raises(ConversionError, match="writes a JAX .npz file"):
        api.export_checkpoint("big_vision", str(small["tmp"] / "mm"), str(small["tmp"] / "vt.safetensors"))
