"""MAE and BEiT checkpoints -> mmjax through mmjax-convert, at their real (base) sizes with random
weights: transformers ViTMAEForPreTraining (same noise -> same mask, reconstruction, loss),
transformers BeitForMaskedImageModeling (same bool_masked_pos -> same logits), timm
beit_base_patch16_224 (same logits, and an exact round trip timm loads with strict=True), a small
BeitForImageClassification in both key spellings, a timm MAE encoder, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import mmjax
from mmjax import layers
from mmjax.convert import api, engine, io
from mmjax.convert import beit as beit_tables
from mmjax.convert import mae as mae_tables
from mmjax.losses import masked_modeling
from mmjax.models import mae


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# MAE
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_mae(module_tmp, randomize, images, convert, fill_mae_posembs):
    tmp = module_tmp("hf_mae")
    torch.manual_seed(0)
    ref = randomize(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig()))   # B/16, decoder 512d8b
    fill_mae_posembs(ref)
    x = images(1)
    noise = np.random.default_rng(1).uniform(size=(1, 196)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=_nchw(x), noise=torch.from_numpy(noise))
    ref.save_pretrained(str(tmp / "hf"))
    del ref
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    out = jax.jit(model.apply)(variables, x, noise)
    pred = out["pred"]
    loss, _ = masked_modeling.mim_pixels(pred, mae.patchify(jnp.asarray(x), 16), out["mask"], norm_pix=False)
    return {"tmp": tmp, "model": model, "got": (pred, out, loss), "want": want}


def test_mae_matches_transformers(hf_mae, diff):
    (pred, out, loss), want = hf_mae["got"], hf_mae["want"]
    assert hf_mae["model"].decoder_depth == 8 and hf_mae["model"].width == 768
    np.testing.assert_array_equal(np.asarray(out["mask"]), want.mask.numpy())
    np.testing.assert_array_equal(np.asarray(out["ids_restore"]), want.ids_restore.numpy())
    assert diff(pred, want.logits, "transformers ViTMAEForPreTraining (B/16) reconstruction") <= 1e-5
    loss_diff = abs(float(loss) - float(want.loss))
    print(f"ViTMAE loss {float(loss):.6f} vs {float(want.loss):.6f}: diff {loss_diff:.3g}")
    assert loss_diff <= 1e-4


def test_mae_position_tables_are_checked(hf_mae):
    """The dropped fixed position tables must be the sin-cos ones mmjax recomputes."""
    plan, state = api.plan_import("hf", str(hf_mae["tmp"] / "hf"))
    assert not any("is absent or zero" in note for note in plan.notes)
    state["decoder.decoder_pos_embed"] = state["decoder.decoder_pos_embed"] + 0.01
    config = json.loads((hf_mae["tmp"] / "hf" / "config.json").read_text())
    with pytest.raises(engine.ConversionError, match=r"decoder.decoder_pos_embed .* is not the fixed 2-D sin-cos"):
        mae_tables.from_hf(config, state)


def test_mae_both_key_spellings(tmp_path, randomize, convert, fill_mae_posembs):
    """save_pretrained's folder (4.x names; the decoder spelled `decoder_encoder.layer`) and one with
    the in-memory transformers 5 names convert to the same parameters."""
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       decoder_hidden_size=16, decoder_num_hidden_layers=2,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=32, image_size=32,
                                       patch_size=8)
    torch.manual_seed(6)
    ref = randomize(transformers.ViTMAEForPreTraining(config), seed=6)
    fill_mae_posembs(ref)
    ref.save_pretrained(str(tmp_path / "saved"))
    memory = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert "decoder.decoder_layers.1.attention.q_proj.weight" in memory
    (tmp_path / "memory").mkdir()
    io.write_hf_folder(str(tmp_path / "memory"), json.loads((tmp_path / "saved" / "config.json").read_text()), memory)
    for name in ("saved", "memory"):
        convert("--source", "hf", "--checkpoint", tmp_path / name, "--output", tmp_path / f"mm_{name}")
    _, saved = mmjax.load(str(tmp_path / "mm_saved"))
    _, in_memory = mmjax.load(str(tmp_path / "mm_memory"))
    jax.tree.map(np.testing.assert_array_equal, saved, in_memory)
    np.testing.assert_array_equal(in_memory["params"]["decoder"]["layer_1"]["mlp"]["fc2"]["bias"],
                                  memory["decoder.decoder_layers.1.mlp.fc2.bias"])


def test_timm_mae_encoder_converts_as_vit(tmp_path, randomize, images, convert, diff):
    """timm's MAE-pretrained encoders (vit_*.mae: no head) are plain ViT checkpoints."""
    torch.manual_seed(2)
    ref = randomize(timm.create_model("vit_base_patch16_224.mae", pretrained=False), seed=2)
    assert ref.num_classes == 0
    save_file(ref.state_dict(), str(tmp_path / "mae.safetensors"))
    convert("--source", "timm", "--model", "vit_base_patch16_224.mae", "--checkpoint", tmp_path / "mae.safetensors",
            "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    x = images(1, seed=3)
    with torch.no_grad():
        want = ref(_nchw(x)).numpy()
    got = jax.jit(model.apply)(variables, x)["pooled"]
    assert diff(got, want, "timm vit_base_patch16_224.mae pooled features") <= 2e-5


# ---------------------------------------------------------------------------------------------
# BEiT
# ---------------------------------------------------------------------------------------------

def test_beit_mim_matches_transformers(tmp_path, randomize, randomize_tables, images, convert, diff):
    torch.manual_seed(3)
    config = transformers.BeitConfig(use_mask_token=True, use_shared_relative_position_bias=True)   # B/16
    ref = randomize_tables(randomize(transformers.BeitForMaskedImageModeling(config), seed=3), seed=3)
    x = images(1, seed=4)
    masked = np.random.default_rng(5).uniform(size=(1, 196)) < 0.4
    with torch.no_grad():
        want = ref(pixel_values=_nchw(x), bool_masked_pos=torch.from_numpy(masked)).logits.numpy()
    ref.save_pretrained(str(tmp_path / "hf"))
    del ref
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert model.vocab_size == 8192 and model.rel_pos == "shared"
    got = jax.jit(model.apply)(variables, x, masked)["logits"]
    assert diff(got, want, f"transformers BeitForMaskedImageModeling (B/16, {masked.sum()} masked) logits") <= 2e-5


@pytest.fixture(scope="module")
def timm_beit(module_tmp, randomize, randomize_tables, images, convert):
    tmp = module_tmp("timm_beit")
    torch.manual_seed(4)
    ref = randomize_tables(randomize(timm.create_model("beit_base_patch16_224", pretrained=False), seed=4), seed=4)
    with torch.no_grad():
        ref.head.weight.normal_(0.0, 0.05)
    x = images(1, seed=6)
    with torch.no_grad():
        want = ref(_nchw(x)).numpy()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    del ref
    save_file(state, str(tmp / "beit.safetensors"))
    convert("--source", "timm", "--model", "beit_base_patch16_224", "--checkpoint", tmp / "beit.safetensors",
            "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"tmp": tmp, "state": state, "got": jax.jit(model.apply)(variables, x)["logits"], "want": want,
            "model": model, "variables": variables}


def test_beit_matches_timm(timm_beit, diff):
    assert timm_beit["model"].rel_pos == "layer" and timm_beit["model"].num_classes == 1000
    assert diff(timm_beit["got"], timm_beit["want"], "timm beit_base_patch16_224 logits") <= 2e-5


def test_beit_timm_round_trip_is_exact(timm_beit, convert, reimport_equals):
    """mmjax -> timm (strict load equals the original) -> mmjax (equals the first conversion)."""
    tmp = timm_beit["tmp"]
    convert("--to", "timm", "--input", tmp / "mm", "--output", tmp / "back.safetensors")
    with torch.device("meta"):
        fresh = timm.create_model("beit_base_patch16_224", pretrained=False)
    fresh.load_state_dict(load_file(str(tmp / "back.safetensors")), strict=True, assign=True)
    restored = fresh.state_dict()
    assert set(restored) == set(timm_beit["state"])
    for k, v in timm_beit["state"].items():
        assert torch.equal(restored[k], v), k
    reimport_equals("timm", tmp / "back.safetensors", timm_beit["variables"], "beit_base_patch16_224")


def test_beit_loaded_at_384_matches_timm_beit_384(timm_beit, images, diff):
    """Fine-tuning resolution: the 224 BEiT loaded at 384 gets every layer's relative position
    table resized (BEiT's geometric bicubic), and timm's beit_base_patch16_384 holding the same
    weights and tables gives the same logits (so the 24x24 offsets index the table as timm's do)."""
    model, variables = mmjax.load(str(timm_beit["tmp"] / "mm"), image_size=384)
    flat = engine.flatten(jax.tree.map(np.asarray, variables["params"]))
    state = {k: v for k, v in timm_beit["state"].items() if not k.endswith("relative_position_index")}
    for i in range(12):
        key = f"blocks.{i}.attn.relative_position_bias_table"
        table = flat[f"encoder/layer_{i}/rel_pos_bias/table"]
        assert table.shape == (47 * 47 + 3, 12)
        np.testing.assert_array_equal(table, layers.resize_relative_position_table(state[key].numpy(), (24, 24)))
        state[key] = torch.from_numpy(table)
    ref = timm.create_model("beit_base_patch16_384", pretrained=False)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("relative_position_index") for k in missing)
    x = images(1, size=384, seed=8)
    with torch.no_grad():
        want = ref.eval()(_nchw(x)).numpy()
    assert diff(jax.jit(model.apply)(variables, x)["logits"], want, "timm beit_base_patch16_384 logits") <= 2e-5


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beit_large_patch16_512", "beitv2_base_patch16_224",
                                  "beitv2_large_patch16_224.in1k_ft_in22k_in1k"])
def test_beit_name_table_matches_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    fields, size = beit_tables.timm_architecture(name)
    block = ref.blocks[0]
    assert (fields["width"], fields["depth"], fields["num_heads"], fields["mlp_dim"]) == (
        ref.embed_dim, len(ref.blocks), block.attn.num_heads, block.mlp.fc1.out_features)
    assert (fields["patch_size"], size) == (ref.patch_embed.patch_size[0], ref.patch_embed.img_size[0])
    assert fields["ln_eps"] == block.norm1.eps


def test_beit_classifier_in_both_key_spellings(tmp_path, randomize, randomize_tables, images, convert, diff):
    """A small BeitForImageClassification (absolute + per-layer relative positions): the folder
    save_pretrained writes (transformers 4.x key names, as on the Hub) and one holding the
    in-memory transformers 5 names give the same logits."""
    torch.manual_seed(5)
    config = transformers.BeitConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     image_size=32, patch_size=8, num_labels=7, use_relative_position_bias=True,
                                     use_absolute_position_embeddings=True)
    ref = randomize_tables(randomize(transformers.BeitForImageClassification(config), seed=5), seed=5)
    ref.save_pretrained(str(tmp_path / "saved"))
    saved = io.read_state_dict(str(tmp_path / "saved" / "model.safetensors"))
    assert "beit.encoder.layer.1.attention.attention.relative_position_bias.relative_position_bias_table" in saved
    memory = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert "beit.layers.1.relative_position_bias.relative_position_bias_table" in memory
    (tmp_path / "memory").mkdir()
    io.write_hf_folder(str(tmp_path / "memory"), json.loads((tmp_path / "saved" / "config.json").read_text()), memory)
    x = images(2, 32, seed=7)
    with torch.no_grad():
        want = ref(pixel_values=_nchw(x)).logits.numpy()
    for name in ("saved", "memory"):
        convert("--source", "hf", "--checkpoint", tmp_path / name, "--output", tmp_path / f"mm_{name}")
        model, variables = mmjax.load(str(tmp_path / f"mm_{name}"))
        assert diff(jax.jit(model.apply)(variables, x)["logits"], want,
                    f"transformers BeitForImageClassification (small, {name} key names) logits") <= 1e-6


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_input(tmp_path, convert, capsys):
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "config.json").write_text(json.dumps({"architectures": ["BeitForSemanticSegmentation"]}))
    io.write_state_dict(str(tmp_path / "seg" / "model.safetensors"), {"x": np.zeros(2, np.float32)})
    with pytest.raises(SystemExit):
        convert("--source", "hf", "--checkpoint", tmp_path / "seg", "--output", tmp_path / "out")
    assert "Unsupported Hugging Face architecture 'BeitForSemanticSegmentation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert("--source", "timm", "--model", "beit_huge_patch16_224", "--checkpoint", tmp_path / "x.safetensors",
                "--output", tmp_path / "out")
    assert "Unknown or unsupported timm BEiT 'beit_huge_patch16_224'" in capsys.readouterr().err
    # A BEiT checkpoint without a layer's value projection: one error naming the missing parameters.
    config = transformers.BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=16, patch_size=8, use_mask_token=True)
    transformers.BeitForMaskedImageModeling(config).save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mim")
    with pytest.raises(SystemExit):          # timm's Beit has no mask token or visual-token head
        convert("--to", "timm", "--input", tmp_path / "mim", "--output", tmp_path / "mim.safetensors")
    assert "timm's Beit is a classifier (num_classes set) without a mask token" in capsys.readouterr().err
    state = io.read_state_dict(str(tmp_path / "hf" / "model.safetensors"))
    del state["beit.encoder.layer.0.attention.attention.value.weight"]   # save_pretrained writes 4.x names
    io.write_state_dict(str(tmp_path / "hf" / "model.safetensors"), state)
    with pytest.raises(SystemExit):
        convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert "missing model parameters" in err and "encoder/layer_0/attn/value/kernel" in err
