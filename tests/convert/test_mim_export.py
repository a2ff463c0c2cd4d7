"""mmjax MAE and BEiT -> PyTorch (issue 4), on small configs with random weights (the key names
and layouts do not depend on size; import parity at the real B/16 size is in test_mim.py):

- transformers ViTMAEForPreTraining, BeitForMaskedImageModeling, BeitForImageClassification:
  PyTorch -> mmjax -> PyTorch gives back the original state dict (strict load), and the written
  folder, loaded with from_pretrained, gives the mmjax model's outputs (same noise -> same mask,
  reconstruction and loss; same bool_masked_pos -> same logits);
- an MAE trained in mmjax (no PyTorch source) written for transformers and, encoder only, timm;
- models a target cannot express are refused with the reason;
- timm ViTs with global_pool="avg" (MAE-style fine-tuning: fc_norm after pooling) import.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

import mmjax
from mmjax import pretrained
from mmjax.convert import engine, io
from mmjax.losses import masked_modeling
from mmjax.models import mae

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "image_size": 32, "patch_size": 8}
SMALL_MAE = dict(SMALL, decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                 decoder_intermediate_size=64)
POSEMBS = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2))


def _load_strict(cls, folder):
    """The written folder: its config.json builds `cls`, its weights fill it with strict key checks
    (and from_pretrained agrees: nothing missing, unexpected or mis-shaped)."""
    with open(folder / "config.json") as f:
        assert json.load(f)["architectures"] == [cls.__name__]
    written = io.read_state_dict(str(folder / "model.safetensors"))
    fresh = cls(cls.config_class.from_pretrained(str(folder)))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
    loaded, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for k, v in fresh.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    return written, loaded.eval()


def _random_params(model, inputs, seed):
    """Random mmjax parameters of the shapes the model creates (traced, not run): norm scales
    near 1, everything else (biases included) away from zero."""
    rng = np.random.default_rng(seed)
    shapes = pretrained.abstract_params(model, inputs)
    return engine.unflatten({p: (1.0 if p.endswith("scale") else 0.0) + rng.normal(0.0, 0.2, s.shape).astype(np.float32)
                             for p, s in shapes.items()})


def _model_dir(path, class_path, fields, inputs):
    """A model directory's config alone: enough for exports that are refused before reading weights."""
    path.mkdir()
    (path / pretrained.CONFIG_FILE).write_text(json.dumps(
        {"format": pretrained.FORMAT, "class": class_path, "fields": fields, "inputs": inputs, "source": {}}))
    return path


# ---------------------------------------------------------------------------------------------
# MAE -> transformers ViTMAEForPreTraining
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mae_hf(module_tmp, randomize, images, convert, fill_mae_posembs):
    tmp = module_tmp("mae_hf")
    torch.manual_seed(1)
    ref = randomize(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**SMALL_MAE)), seed=1)
    fill_mae_posembs(ref)
    ref.save_pretrained(str(tmp / "hf"))
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "back")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"tmp": tmp, "original": {k: v.numpy() for k, v in ref.state_dict().items()}, "model": model,
            "variables": variables}


def test_mae_hf_round_trip(mae_hf, reimport_equals):
    """Every parameter comes back exactly; the two fixed sin-cos tables, recomputed by mmjax,
    equal transformers' own to float rounding."""
    written, _ = _load_strict(transformers.ViTMAEForPreTraining, mae_hf["tmp"] / "back")
    original = mae_hf["original"]
    assert set(written) == set(original)
    for k, v in original.items():
        if k in POSEMBS:
            d = float(np.abs(written[k] - v).max())
            print(f"ViTMAE {k}: mmjax table vs transformers' max abs diff {d:.3g}")
            assert d <= 1e-6
        else:
            np.testing.assert_array_equal(written[k], v, err_msg=k)
    plan = reimport_equals("hf", mae_hf["tmp"] / "back", mae_hf["variables"])
    assert not any("absent or zero" in note for note in plan.notes)        # the tables were checked


def test_mae_hf_export_matches_mmjax(mae_hf, images, diff):
    _, ref = _load_strict(transformers.ViTMAEForPreTraining, mae_hf["tmp"] / "back")
    x = images(2, 32, seed=2)
    noise = np.random.default_rng(3).uniform(size=(2, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=_nchw(x), noise=torch.from_numpy(noise))
    model, variables = mae_hf["model"], mae_hf["variables"]
    out = jax.jit(model.apply)(variables, x, noise)
    pred = out["pred"]
    loss, _ = masked_modeling.mim_pixels(pred, mae.patchify(jnp.asarray(x), 8), out["mask"], norm_pix=False)
    np.testing.assert_array_equal(np.asarray(out["mask"]), want.mask.numpy())
    assert diff(pred, want.logits, "mmjax MAE -> transformers ViTMAEForPreTraining reconstruction") <= 2e-6
    loss_diff = abs(float(loss) - float(want.loss))
    print(f"mmjax MAE -> ViTMAE loss {float(loss):.6f} vs {float(want.loss):.6f}: diff {loss_diff:.3g}")
    assert loss_diff <= 1e-4


# ---------------------------------------------------------------------------------------------
# An MAE trained in mmjax -> transformers and (encoder only) timm
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_mae(module_tmp, convert):
    tmp = module_tmp("native_mae")
    model = mae.MAE(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, decoder_width=32, decoder_depth=2,
                    decoder_heads=4, decoder_mlp_dim=64)
    inputs = [pretrained.input_spec((1, 32, 32, 3)), pretrained.input_spec((1, 16))]
    pretrained.save(str(tmp / "mm"), model, _random_params(model, inputs, seed=4), inputs)
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"tmp": tmp, "model": model, "variables": variables}


def test_native_mae_to_transformers(native_mae, images, convert, diff, reimport_equals):
    """No source config: config.json is generated from the model's fields."""
    tmp = native_mae["tmp"]
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "hf")
    _, ref = _load_strict(transformers.ViTMAEForPreTraining, tmp / "hf")
    x = images(2, 32, seed=5)
    noise = np.random.default_rng(6).uniform(size=(2, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=_nchw(x), noise=torch.from_numpy(noise))
    out = jax.jit(native_mae["model"].apply)(native_mae["variables"], x, noise)
    pred = out["pred"]
    np.testing.assert_array_equal(np.asarray(out["mask"]), want.mask.numpy())
    assert diff(pred, want.logits, "mmjax-trained MAE -> transformers ViTMAE reconstruction") <= 1e-5
    reimport_equals("hf", tmp / "hf", native_mae["variables"])


def test_native_mae_encoder_to_timm(native_mae, images, convert, diff, capsys):
    """timm has no MAE decoder: the encoder is written, and the CLI says the decoder is not."""
    tmp = native_mae["tmp"]
    convert("--to", "timm", "--input", tmp / "mm", "--output", tmp / "encoder.safetensors")
    printed = capsys.readouterr().out
    assert "the decoder (decoder_embed, mask_token, decoder, decoder_norm, decoder_pred) is not written" in printed
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                           num_heads=4, mlp_ratio=2.0, num_classes=0).eval()
    written = io.read_state_dict(str(tmp / "encoder.safetensors"))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
    x = images(2, 32, seed=7)
    with torch.no_grad():
        want = ref.forward_features(_nchw(x)).numpy()
    got = jax.jit(lambda v, x: native_mae["model"].apply(v, x, method="features"))(native_mae["variables"], x)
    assert diff(got, want, "mmjax MAE encoder -> timm VisionTransformer forward_features") <= 1e-5


# ---------------------------------------------------------------------------------------------
# BEiT -> transformers, both heads
# ---------------------------------------------------------------------------------------------

BEIT_HEADS = {
    "mim": (transformers.BeitForMaskedImageModeling,
            {"vocab_size": 64, "use_mask_token": True, "use_shared_relative_position_bias": True}),
    "classifier": (transformers.BeitForImageClassification,
                   {"num_labels": 7, "use_relative_position_bias": True,
                    "use_absolute_position_embeddings": True}),
}


@pytest.fixture(scope="module", params=sorted(BEIT_HEADS))
def beit_hf(request, module_tmp, randomize, randomize_tables, convert):
    tmp = module_tmp(f"beit_{request.param}")
    cls, extra = BEIT_HEADS[request.param]
    torch.manual_seed(8)
    ref = randomize_tables(randomize(cls(transformers.BeitConfig(**SMALL, **extra)), seed=8), seed=8)
    if request.param == "classifier":
        with torch.no_grad():
            ref.classifier.weight.normal_(0.0, 0.1)
    ref.save_pretrained(str(tmp / "hf"))
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "back")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"head": request.param, "cls": cls, "tmp": tmp, "model": model, "variables": variables,
            "original": {k: v.numpy() for k, v in ref.state_dict().items()}}


def test_beit_hf_round_trip_is_exact(beit_hf, reimport_equals):
    written, _ = _load_strict(beit_hf["cls"], beit_hf["tmp"] / "back")
    assert set(written) == set(beit_hf["original"])
    for k, v in beit_hf["original"].items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    reimport_equals("hf", beit_hf["tmp"] / "back", beit_hf["variables"])


def test_beit_hf_export_matches_mmjax(beit_hf, images, diff):
    _, ref = _load_strict(beit_hf["cls"], beit_hf["tmp"] / "back")
    x = images(2, 32, seed=9)
    model, variables = beit_hf["model"], beit_hf["variables"]
    if beit_hf["head"] == "mim":
        masked = np.random.default_rng(10).uniform(size=(2, 16)) < 0.4
        with torch.no_grad():
            want = ref(pixel_values=_nchw(x), bool_masked_pos=torch.from_numpy(masked)).logits.numpy()
        got = jax.jit(model.apply)(variables, x, masked)["logits"]
        label = f"mmjax BEiT -> transformers BeitForMaskedImageModeling ({masked.sum()} masked) logits"
    else:
        with torch.no_grad():
            want = ref(pixel_values=_nchw(x)).logits.numpy()
        got = jax.jit(model.apply)(variables, x)["logits"]
        label = "mmjax BEiT -> transformers BeitForImageClassification logits"
    assert diff(got, want, label) <= 2e-6


# ---------------------------------------------------------------------------------------------
# Refusals, and timm's global_pool="avg" layout
# ---------------------------------------------------------------------------------------------

def test_exports_the_target_cannot_express_are_refused(tmp_path, convert, capsys):
    small = {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}
    image = [pretrained.input_spec((1, 32, 32, 3))]
    cases = [
        ("headless", "mmjax.models.beit.BEiT", small, image, "hf", "it has no head (set vocab_size"),
        ("beit_patches", "mmjax.models.beit.BEiT", {**small, "patch_size": [8, 4], "num_classes": 3}, image, "hf",
         "its patches are 8x4, and transformers' BEiT takes square patches only"),
        ("mae_oblong", "mmjax.models.mae.MAE", small, [pretrained.input_spec((1, 32, 48, 3)),
                                                       pretrained.input_spec((1, 24))], "hf",
         "its images are 32x48, and transformers' ViTMAE takes square images only"),
        ("mae_open_clip", "mmjax.models.mae.MAE", small, image + [pretrained.input_spec((1, 16))], "open_clip",
         "Cannot write mmjax.models.mae.MAE as 'open_clip'; targets for it: ['hf', 'timm']"),
    ]
    for name, class_path, fields, inputs, target, reason in cases:
        directory = _model_dir(tmp_path / name, class_path, fields, inputs)
        with pytest.raises(SystemExit):
            convert("--to", target, "--input", directory, "--output", tmp_path / f"{name}_out")
        assert reason in capsys.readouterr().err, name


def test_timm_avg_pool_fc_norm_vit_imports(tmp_path, randomize, images, convert, diff, capsys):
    """timm's MAE-style fine-tuning layout (global_pool="avg": patch tokens averaged, then fc_norm;
    no final norm) at the real ViT-Ti/16 size; timm cannot take it back as a token-pool ViT."""
    torch.manual_seed(11)
    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", num_classes=5),
                    seed=11)
    with torch.no_grad():
        ref.head.weight.normal_(0.0, 0.1)
    assert "fc_norm.weight" in ref.state_dict() and "norm.weight" not in ref.state_dict()
    save_file(ref.state_dict(), str(tmp_path / "avg.safetensors"))
    # The keys alone do not tell global_pool="avg" from "max" / "avgmax": it is named.
    convert("--source", "timm", "--model", "vit_tiny_patch16_224", "--checkpoint", tmp_path / "avg.safetensors",
            "--output", tmp_path / "mm", "--model-args", '{"global_pool": "avg"}')
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert (model.pool, model.fc_norm, model.class_token) == ("gap", True, True)
    x = images(2, seed=12)
    with torch.no_grad():
        want = ref(_nchw(x)).numpy()
    got = jax.jit(model.apply)(variables, x)["logits"]
    assert diff(got, want, "timm vit_tiny_patch16_224 global_pool=avg logits") <= 1e-4
    with pytest.raises(SystemExit):
        convert("--to", "timm", "--input", tmp_path / "mm", "--output", tmp_path / "back.safetensors")
    assert "pool='gap' (needs 'cls')" in capsys.readouterr().err
