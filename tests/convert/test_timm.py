"""timm ViT <-> mmjax: logit parity at the real vit_base_patch16_224 size (converted through the
CLI from .safetensors), an exact round trip that timm loads with strict=True, scanned layouts,
position-embedding resampling against timm's, the model-name table, and bad input."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import mmjax
from mmjax.convert import api, clip, engine, vit
from mmjax.convert.engine import ConversionError

NAME = "vit_base_patch16_224"


@pytest.fixture(scope="module")
def base(module_tmp, randomize, images, convert):
    """A random timm ViT-B/16, its logits, and its conversion by the CLI."""
    tmp = module_tmp("timm")
    torch.manual_seed(0)
    ref = randomize(timm.create_model(NAME, pretrained=False))
    with torch.no_grad():
        ref.head.weight.normal_(0.0, 0.05)
    x = images(2)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    convert("--source", "timm", "--model", NAME, "--checkpoint", tmp / "model.safetensors", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    got = np.asarray(jax.jit(model.apply)(variables, x)["logits"])
    return {"tmp": tmp, "state": state, "pos_embed": ref.pos_embed.detach(), "x": x, "want": want, "got": got,
            "variables": variables}


def test_logits_match_timm(base, diff):
    d = diff(base["got"], base["want"], f"timm {NAME} vs mmjax (converted by mmjax-convert) logits")
    assert d <= 2e-5


def test_round_trip_is_exact(base, convert, reimport_equals):
    """mmjax -> timm (loads with strict=True, equals the original) -> mmjax (equals the first)."""
    tmp = base["tmp"]
    convert("--to", "timm", "--input", tmp / "mm", "--output", tmp / "back.safetensors")
    with torch.device("meta"):
        fresh = timm.create_model(NAME, pretrained=False)
    fresh.load_state_dict(load_file(str(tmp / "back.safetensors")), strict=True, assign=True)
    restored = fresh.state_dict()
    assert set(restored) == set(base["state"])
    for k, v in base["state"].items():
        assert torch.equal(restored[k], v), k
    reimport_equals("timm", tmp / "back.safetensors", base["variables"], NAME)


def test_image_size_resamples_posemb_like_timm(base):
    from timm.layers import resample_abs_pos_embed
    model, variables = mmjax.load(str(base["tmp"] / "mm"), image_size=384)
    got = np.asarray(variables["params"]["posemb"]["pos_embedding"])
    want = resample_abs_pos_embed(base["pos_embed"], [24, 24], num_prefix_tokens=1).numpy()
    assert got.shape == want.shape == (1, 1 + 24 * 24, 768)
    d = float(np.abs(got - want).max())
    print(f"posemb 224->384: mmjax vs timm resample_abs_pos_embed max abs diff {d:.3g}")
    assert d <= 1e-5
    shapes = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 384, 384, 3), np.float32))
    assert shapes["logits"].shape == (1, 1000)


@pytest.fixture(scope="module")
def tiny(module_tmp, randomize, convert):
    """A random timm ViT-Ti/16 as .safetensors and converted (cheap checks of layouts and sizes)."""
    tmp = module_tmp("timm_tiny")
    torch.manual_seed(1)
    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False), seed=1)
    save_file(ref.state_dict(), str(tmp / "ti.safetensors"))
    convert("--source", "timm", "--model", "vit_tiny_patch16_224", "--checkpoint", tmp / "ti.safetensors",
            "--output", tmp / "mm")
    return {"tmp": tmp, "ref": ref}


def test_other_image_size_end_to_end(tiny, images, diff):
    """timm loading the 224 checkpoint at 160 px (checkpoint_filter_fn resamples; downsampling,
    so antialiasing matters) == mmjax.load(image_size=160), here with scanned layers."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    at160 = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=160).eval()
    at160.load_state_dict(checkpoint_filter_fn(tiny["ref"].state_dict(), at160), strict=True)
    x = images(2, 160)
    with torch.no_grad():
        want = at160(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    model, variables = mmjax.load(str(tiny["tmp"] / "mm"), image_size=160, scan=True)
    got = jax.jit(model.apply)(variables, x)["logits"]
    assert diff(got, want, "timm vit_tiny at 160px vs mmjax image_size=160") <= 2e-6


def test_scanned_layouts_load_both_ways(tiny, images, convert, diff):
    """load(scan=True) stacks the layers (same logits as timm); a directory written with --scan
    holds the same arrays and loads unscanned too."""
    tmp = tiny["tmp"]
    x = images(1, 224, seed=2)
    with torch.no_grad():
        want = tiny["ref"](torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    model, scanned = mmjax.load(str(tmp / "mm"), scan=True)
    assert model.scan
    assert scanned["params"]["encoder"]["layers"]["attn"]["query"]["kernel"].shape == (12, 192, 3, 64)
    assert diff(jax.jit(model.apply)(scanned, x)["logits"], want, "timm vit_tiny vs mmjax scan=True") <= 2e-6
    convert("--source", "timm", "--model", "vit_tiny_patch16_224", "--checkpoint", tmp / "ti.safetensors",
            "--output", tmp / "mm_scan", "--scan")
    with open(tmp / "mm_scan" / "model_config.json") as f:
        assert json.load(f)["fields"]["scan"] is True
    _, stored_scanned = mmjax.load(str(tmp / "mm_scan"))
    jax.tree.map(np.testing.assert_array_equal, stored_scanned, scanned)
    _, unscanned = mmjax.load(str(tmp / "mm_scan"), scan=False)
    _, original = mmjax.load(str(tmp / "mm"))
    jax.tree.map(np.testing.assert_array_equal, unscanned, original)


def test_existing_directory_needs_overwrite(tiny, convert, capsys):
    args = ["--source", "timm", "--model", "vit_tiny_patch16_224", "--checkpoint", tiny["tmp"] / "ti.safetensors",
            "--output", tiny["tmp"] / "mm"]
    with pytest.raises(SystemExit):
        convert(*args)
    assert "already holds a model (pass overwrite=True / --overwrite)" in capsys.readouterr().err
    convert(*args, "--overwrite")
    _, variables = mmjax.load(str(tiny["tmp"] / "mm"))
    np.testing.assert_array_equal(variables["params"]["cls"], tiny["ref"].cls_token.detach().numpy())


# A spread of timm's registered names: every size, patch size, CLIP tower, QuickGELU, resolution.
TIMM_NAMES = ["vit_tiny_patch16_224", "vit_small_patch32_384", "vit_base_patch8_224", "vit_base_patch16_384",
              "vit_base_patch32_clip_256", "vit_base_patch16_clip_quickgelu_224", "vit_large_patch14_clip_336",
              "vit_large_patch32_384", "vit_huge_patch14_224", "vit_huge_patch14_clip_quickgelu_378",
              "vit_giant_patch14_clip_224", "vit_gigantic_patch14_224"]


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_name_table_matches_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    fields, size = vit.timm_architecture(name)
    block = ref.blocks[0]
    assert (fields["width"], fields["depth"], fields["num_heads"], fields["mlp_dim"]) == (
        ref.embed_dim, len(ref.blocks), block.attn.num_heads, block.mlp.fc1.out_features)
    assert (fields["patch_size"], size) == (ref.patch_embed.patch_size[0], ref.patch_embed.img_size[0])
    assert fields["pre_norm"] == isinstance(ref.norm_pre, torch.nn.LayerNorm)
    assert fields["patch_bias"] == (ref.patch_embed.proj.bias is not None)
    assert fields["ln_eps"] == block.norm1.eps == ref.norm.eps
    assert (fields["act"] == "quick_gelu") == ("QuickGELU" in type(block.mlp.act).__name__)
    assert ref.global_pool == "token" and ref.cls_token is not None and fields["pool"] == "cls"


def test_every_matching_timm_name_parses():
    names = [n for n in timm.list_models("vit_*") if vit.TIMM_NAME.fullmatch(n)
             and vit.TIMM_NAME.fullmatch(n)["size"] in vit.TIMM_SIZES]
    assert len(names) >= 40
    for name in names:
        vit.timm_architecture(name)


def test_wrong_architecture_is_listed(tmp_path, convert, capsys):
    """A ViT-S/16 state dict given as vit_base_patch16_224: every mis-shaped key is named."""
    with torch.device("meta"):
        small = timm.create_model("vit_small_patch16_224", pretrained=False)
        base = timm.create_model(NAME, pretrained=False)
    differ = sum(small.state_dict()[k].shape != v.shape for k, v in base.state_dict().items())
    save_file({k: torch.zeros(v.shape) for k, v in small.state_dict().items()}, str(tmp_path / "s.safetensors"))
    with pytest.raises(SystemExit) as info:
        convert("--source", "timm", "--model", NAME, "--checkpoint", tmp_path / "s.safetensors",
                "--output", tmp_path / "out")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "mmjax-convert: error: The timm checkpoint" in err and "does not fit the model" in err
    assert "blocks.0.attn.qkv.weight: checkpoint has (1152, 384), the model needs (2304, 768)" in err
    assert "blocks.11.mlp.fc2.weight: checkpoint has (384, 1536), the model needs (768, 3072)" in err
    assert f"{differ} mis-shaped keys" in err             # all of them, not just the first
    assert not (tmp_path / "out" / "model_config.json").exists()


def test_missing_and_unexpected_keys(tmp_path):
    with torch.device("meta"):
        tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    state = {k: torch.zeros(v.shape) for k, v in tiny.state_dict().items()}
    del state["blocks.3.norm2.bias"]
    state["blocks.3.attn.q_norm.weight"] = torch.zeros(64)
    save_file(state, str(tmp_path / "t.safetensors"))
    with pytest.raises(ConversionError) as info:
        api.import_checkpoint("timm", str(tmp_path / "t.safetensors"), str(tmp_path / "out"), "vit_tiny_patch16_224")
    message = str(info.value)
    assert "1 unexpected keys" in message and "blocks.3.attn.q_norm.weight (64,): no rule" in message
    assert "1 missing model parameters" in message and "encoder/layer_3/ln2/bias (192,)" in message


def test_unknown_name_and_truncated_file(tmp_path, convert, capsys):
    with torch.device("meta"):
        tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file({k: torch.zeros(v.shape) for k, v in tiny.state_dict().items()}, str(tmp_path / "t.safetensors"))
    for name in ("vit_bse_patch16_224", "resnet50", "vit_base_patch16_rope_reg1_gap_256"):
        with pytest.raises(SystemExit):
            convert("--source", "timm", "--model", name, "--checkpoint", tmp_path / "t.safetensors",
                    "--output", tmp_path / "out")
        assert f"Unknown or unsupported timm model '{name}'" in capsys.readouterr().err
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(SystemExit):
        convert("--source", "timm", "--model", "vit_tiny_patch16_224", "--checkpoint", tmp_path / "cut.safetensors",
                "--output", tmp_path / "out")
    assert "truncated or not a safetensors file" in capsys.readouterr().err


def test_cli_in_a_fresh_process_without_torch(tiny, tmp_path):
    """The CLI in a fresh process: .safetensors in, model directory out, torch never imported."""
    args = ["--source", "timm", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tiny["tmp"] / "ti.safetensors"),
            "--output", str(tmp_path / "mm")]
    code = ("import sys; from mmjax.convert.cli import main; main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "load it with mmjax.load" in out.stdout
    _, variables = mmjax.load(str(tmp_path / "mm"))
    np.testing.assert_array_equal(variables["params"]["cls"], tiny["ref"].cls_token.detach().numpy())
    # Bad input through the installed console script (else the module): exit status 1, one clear line.
    script = [shutil.which("mmjax-convert")] if shutil.which("mmjax-convert") else [sys.executable, "-m",
                                                                                      "mmjax.convert.cli"]
    out = subprocess.run([*script, "--source", "timm", "--model", "vit_nope_224", "--checkpoint", "x.safetensors",
                          "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1 and "Unknown or unsupported timm model 'vit_nope_224'" in out.stderr


def test_inexpressible_export_is_refused(base):
    """A model with a ViT-only head (no timm equivalent) cannot be written for timm."""
    with pytest.raises(ConversionError, match="representation_size"):
        vit.timm_export({"fields": {"pool": "cls", "representation_size": 768}})
    # A convolutional stem (the shapes main job's) has no counterpart in timm, transformers or open_clip.
    with pytest.raises(ConversionError, match="conv_stem"):
        vit.timm_export({"fields": {"pool": "cls", "conv_stem": [32, 64]}})
    with pytest.raises(ConversionError, match="conv_stem"):
        clip.open_clip_export({"fields": {"image": {"pool": "cls", "conv_stem": [32, 64]}, "text": {}}})
    vit.timm_export({"fields": {"pool": "cls", "conv_stem": []}})   # a plain patch embedding is fine
    params = engine.flatten(jax.tree.map(np.asarray, base["variables"]["params"]))
    params["pre_logits/kernel"] = np.zeros((768, 768), np.float32)
    with pytest.raises(ConversionError, match="pre_logits/kernel"):
        engine.to_torch(params, vit.TIMM_TABLE)


# ---------------------------------------------------------------------------------------------
# Pooling: timm's global_pool / fc_norm are not in a state dict's key names ("avg" with
# fc_norm=False has token pooling's keys, "max" has "avg"'s), so the importer reads them from the
# arguments the checkpoint was made with (--model-args, or a timm config beside the checkpoint),
# checks them against the keys, and refuses what mmjax's ViT cannot pool like.
# ---------------------------------------------------------------------------------------------

TI = "vit_tiny_patch16_224"


def _timm_tiny(randomize, seed, **kwargs):
    torch.manual_seed(seed)
    ref = randomize(timm.create_model(TI, pretrained=False, **kwargs), seed=seed)
    if ref.num_classes:
        with torch.no_grad():
            ref.head.weight.normal_(0.0, 0.1)
    return ref


# (timm.create_model pooling arguments, how the importer learns them, mmjax (pool, fc_norm, class_token))
POOLINGS = {
    "avg_without_fc_norm": (dict(global_pool="avg", fc_norm=False), "cli", ("gap", False, True)),
    "token_with_fc_norm": (dict(global_pool="token", fc_norm=True), "hub_config", ("cls", True, None)),
    "avg": (dict(global_pool="avg"), "sidecar", ("gap", True, True)),
    "avg_without_class_token": (dict(global_pool="avg", class_token=False), "cli", ("gap", True, False)),
    "map": (dict(global_pool="map", class_token=False), "keys", ("map", False, False)),   # as SigLIP's
    "map_over_every_token": (dict(global_pool="map", pool_include_prefix=True), "cli", ("map", False, True)),
    "none": (dict(global_pool="", num_classes=0), "cli", ("none", False, True)),
}


@pytest.mark.parametrize("case", list(POOLINGS))
def test_pooling_is_read_not_guessed(case, tmp_path, randomize, images, convert, diff):
    """Logit (or token, for global_pool='') parity with timm for every pooling mmjax can express."""
    kwargs, via, expected = POOLINGS[case]
    kwargs = dict(kwargs)
    ref = _timm_tiny(randomize, 21, num_classes=kwargs.pop("num_classes", 5), **kwargs)
    ckpt = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(ckpt))
    extra = []
    if via == "cli":
        extra = ["--model-args", json.dumps(kwargs)]
    elif via == "hub_config":   # timm's Hugging Face Hub layout: global_pool at the top
        pool = kwargs.pop("global_pool")
        (tmp_path / "config.json").write_text(json.dumps(
            {"architecture": TI, "num_classes": 5, "global_pool": pool, "model_args": kwargs}))
    elif via == "sidecar":      # NAME.json beside NAME.safetensors, as `mmjax-convert --to timm` writes
        (tmp_path / "model.json").write_text(json.dumps({"architecture": TI, "model_args": kwargs}))
    convert("--source", "timm", "--model", TI, "--checkpoint", ckpt, "--output", tmp_path / "mm", *extra)
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert (model.pool, model.fc_norm, model.class_token) == expected
    x = images(2, seed=22)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    out = jax.jit(model.apply)(variables, x)
    got = np.asarray(out["logits"] if "logits" in out else out["tokens"])   # global_pool="": the tokens
    assert got.shape == want.shape
    assert diff(got, want, f"timm {TI} {case} vs mmjax") <= 2e-5


def _zeros_state(**kwargs):
    with torch.device("meta"):
        ref = timm.create_model(TI, pretrained=False, **kwargs)
    return {k: np.zeros(v.shape, np.float32) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_max_pooling_is_refused(pool, tmp_path, convert, capsys):
    """max / avgmax have avg's keys: imported silently as mean pooling before; now refused, whether
    named by --model-args, named by a config beside the checkpoint, or not named at all."""
    state = _zeros_state(global_pool=pool, num_classes=5)
    assert "fc_norm.weight" in state and "norm.weight" not in state
    save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    args = ["--source", "timm", "--model", TI, "--checkpoint", tmp_path / "m.safetensors", "--output", tmp_path / "o"]
    with pytest.raises(SystemExit):
        convert(*args, "--model-args", json.dumps({"global_pool": pool}))
    assert f"global_pool={pool!r} has no mmjax ViT counterpart" in capsys.readouterr().err
    with pytest.raises(SystemExit):         # no word about the pooling: the keys cannot tell
        convert(*args)
    assert "its keys do not say which" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architecture": TI, "global_pool": pool}))
    with pytest.raises(SystemExit):
        convert(*args)
    assert f"global_pool={pool!r} has no mmjax ViT counterpart" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model_config.json").exists()


def test_pooling_that_contradicts_the_checkpoint_is_refused():
    token = _zeros_state(num_classes=5)
    with pytest.raises(ConversionError, match="fc_norm=True needs fc_norm weights, but the checkpoint has norm"):
        vit.from_timm(TI, token, {"global_pool": "avg"})         # timm's avg default: fc_norm
    with pytest.raises(ConversionError, match="lacks attn_pool"):
        vit.from_timm(TI, token, {"global_pool": "map"})
    with pytest.raises(ConversionError, match="class_token=False does not match"):
        vit.from_timm(TI, token, {"global_pool": "avg", "fc_norm": False, "class_token": False})
    with pytest.raises(ConversionError, match="num_classes=0 only"):
        vit.from_timm(TI, _zeros_state(global_pool="", num_classes=5), {"global_pool": ""})
    # timm's attention pool skips the class token by default; mmjax's attends over every token.
    with pytest.raises(ConversionError, match="attends over the patch tokens only"):
        vit.from_timm(TI, _zeros_state(global_pool="map", num_classes=5))
    with pytest.raises(ConversionError, match="averages the class token too"):
        vit.from_timm(TI, _zeros_state(global_pool="avg", num_classes=5),
                      {"global_pool": "avg", "pool_include_prefix": True})
    with pytest.raises(ConversionError, match="'prr' has no mmjax ViT counterpart"):
        vit.from_timm(TI, token, {"global_pool": "prr"})
    # The name's default (token, final norm) still needs no word.
    assert vit.from_timm(TI, token).fields["pool"] == "cls"
