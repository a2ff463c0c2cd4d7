"""Register-token ViTs and DINOv2 <-> mmjax: timm's vit_small_patch14_reg4_dinov2 at its real size
(518 px; registers, layer scale, position embeddings of the patches only) converted through the
CLI, its exact round trip to timm, small-dimension timm DINOv2 / register mean-pooling layouts,
transformers' Dinov2Model and Dinov2WithRegistersModel both ways, and bad input."""

import json

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import mmjax
from mmjax import pretrained
from mmjax.convert import engine, vit
from mmjax.convert.engine import ConversionError

NAME = "vit_small_patch14_reg4_dinov2"
PREFIX_PARAMS = ("reg_token", "register_tokens", "pos_embed", "position_embeddings")


def randomize_prefix(model, seed=0):
    """Register tokens start near zero and position embeddings small: make them large and random,
    so that a register or position embedding in the wrong place cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in PREFIX_PARAMS:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def dinov2_reg(module_tmp, randomize, images, convert):
    """A random timm ViT-S/14 DINOv2 with 4 registers at 518 px, its pooled features, and its CLI conversion."""
    tmp = module_tmp("dinov2_reg")
    torch.manual_seed(0)
    ref = randomize_prefix(randomize(timm.create_model(NAME, pretrained=False, num_classes=0)))
    x = images(1, 518)
    with torch.no_grad():
        want = ref(nchw(x)).numpy()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    convert("--source", "timm", "--model", NAME, "--checkpoint", tmp / "model.safetensors", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    got = np.asarray(jax.jit(model.apply)(variables, x)["pooled"])
    return {"tmp": tmp, "state": state, "want": want, "got": got, "model": model, "variables": variables}


def test_dinov2_registers_match_timm(dinov2_reg, diff):
    model = dinov2_reg["model"]
    assert (model.num_registers, model.prefix_posemb, model.pool) == (4, "none", "cls")
    d = diff(dinov2_reg["got"], dinov2_reg["want"], f"timm {NAME} (518 px) vs mmjax pooled features")
    assert d <= 1e-5      # measured 1.4e-6 (features up to ~4)


def test_dinov2_registers_round_trip_to_timm(dinov2_reg, convert, reimport_equals):
    """mmjax -> timm: the sidecar's create_model arguments build a model that loads the file with
    strict=True and equals the original; -> mmjax again equals the first conversion."""
    tmp = dinov2_reg["tmp"]
    convert("--to", "timm", "--input", tmp / "mm", "--output", tmp / "back.safetensors")
    sidecar = json.loads((tmp / "back.json").read_text())
    with torch.device("meta"):
        fresh = timm.create_model(sidecar["architecture"], **sidecar["model_args"])
    assert (fresh.num_reg_tokens, fresh.no_embed_class, fresh.patch_embed.img_size) == (4, True, (518, 518))
    fresh.load_state_dict(load_file(str(tmp / "back.safetensors")), strict=True, assign=True)
    restored = fresh.state_dict()
    assert set(restored) == set(dinov2_reg["state"])
    for k, v in dinov2_reg["state"].items():
        assert torch.equal(restored[k], v), k
    reimport_equals("timm", tmp / "back.safetensors", dinov2_reg["variables"], NAME)


def test_other_image_size_resamples_patch_positions_only(dinov2_reg):
    """The position embedding covers the patches only (no_embed_class): resampled with no prefix kept."""
    from timm.layers import resample_abs_pos_embed
    _, variables = mmjax.load(str(dinov2_reg["tmp"] / "mm"), image_size=224)
    got = np.asarray(variables["params"]["posemb"]["pos_embedding"])
    want = resample_abs_pos_embed(dinov2_reg["state"]["pos_embed"], [16, 16], num_prefix_tokens=0).numpy()
    assert got.shape == want.shape == (1, 256, 384)
    assert float(np.abs(got - want).max()) <= 1e-5


# Small-dimension timm models built with the arguments their names' model configs set.
SMALL = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
TIMM_LAYOUTS = {   # name whose layout it is: (VisionTransformer arguments, image size)
    "vit_small_patch14_dinov2": (dict(patch_size=14, init_values=1e-5, img_size=56), 56),
    "vit_base_patch16_reg4_gap_256": (dict(patch_size=16, class_token=False, no_embed_class=True,
                                           global_pool="avg", reg_tokens=4, img_size=64, num_classes=5), 64),
    "vit_medium_patch16_reg4_gap_256": (dict(patch_size=16, init_values=1e-5, class_token=False,
                                             no_embed_class=True, global_pool="avg", reg_tokens=4, img_size=64), 64),
}


@pytest.mark.parametrize("name", list(TIMM_LAYOUTS))
def test_small_timm_layouts_match(name, randomize, images, diff):
    """Each name's layout (prefix tokens, position embedding, layer scale, pooling) with small dimensions."""
    kwargs, size = TIMM_LAYOUTS[name]
    torch.manual_seed(3)
    ref = randomize_prefix(randomize(VisionTransformer(**SMALL, **{"num_classes": 0, **kwargs}), seed=3), seed=3)
    if ref.num_classes:
        with torch.no_grad():
            ref.head.weight.normal_(0.0, 0.2)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    plan = vit.from_timm(name, state)
    fields = {**plan.fields, "variant": None, "width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128}
    model = vit.vit.ViT(**fields)
    inputs = [pretrained.input_spec((1, size, size, 3))]
    flat = engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, inputs))
    x = images(2, size, seed=4)
    with torch.no_grad():
        want = ref(nchw(x)).numpy()
    out = model.apply({"params": engine.unflatten(flat)}, x)
    got = out["logits"] if ref.num_classes else out["pooled"]
    assert diff(got, want, f"timm {name} layout (small dims) vs mmjax") <= 1e-4
    table, _ = vit.timm_export({"fields": fields})
    back = engine.to_torch(flat, table)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_timm_names_match_their_models():
    names = [n for n in timm.list_models("vit_*") if vit.timm_register_architecture(n) is not None]
    assert {"vit_small_patch14_dinov2", "vit_large_patch14_reg4_dinov2", "vit_base_patch16_reg4_gap_256",
            "vit_medium_patch16_reg1_gap_256"} <= set(names)
    for name in names:
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False)
        fields, size = vit.timm_architecture(name)
        block = ref.blocks[0]
        assert (fields["width"], fields["depth"], fields["num_heads"], fields["mlp_dim"], fields["patch_size"],
                size) == (ref.embed_dim, len(ref.blocks), block.attn.num_heads, block.mlp.fc1.out_features,
                          ref.patch_embed.patch_size[0], ref.patch_embed.img_size[0]), name
        assert fields["num_registers"] == ref.num_reg_tokens, name
        assert (fields["prefix_posemb"] == "none") == ref.no_embed_class, name
        assert (fields["layer_scale"] is not None) == isinstance(block.ls1, timm.layers.LayerScale), name
        assert fields.get("class_token", True) == (ref.cls_token is not None), name
        assert {"cls": "token", "gap": "avg"}[fields["pool"]] == ref.global_pool, name


UNSUPPORTED = ("vit_giant_patch14_reg4_dinov2", "vit_base_patch16_rope_reg1_gap_256", "vit_so150m_patch16_reg4_map_256")


def test_unsupported_register_names_are_refused():
    """DINOv2 giant (SwiGLU), rotary and shape-optimised register ViTs have no mmjax layout here."""
    for name in UNSUPPORTED:
        with pytest.raises(ConversionError, match="Unknown or unsupported timm model"):
            vit.timm_architecture(name)


def test_missing_and_unexpected_keys(dinov2_reg):
    """A DINOv2 checkpoint without its registers (and with a stray key): the engine names both."""
    state = {k: v.numpy() for k, v in dinov2_reg["state"].items() if k != "reg_token"}
    state["blocks.0.attn.q_norm.weight"] = np.zeros(64, np.float32)
    plan = vit.from_timm(NAME, state)
    expected = pretrained.abstract_params(vit.vit.ViT(**plan.fields), plan.inputs)
    with pytest.raises(ConversionError) as info:
        engine.to_mmjax(state, plan.table, expected, what="timm checkpoint")
    message = str(info.value)
    assert "1 unexpected keys" in message and "blocks.0.attn.q_norm.weight (64,): no rule" in message
    assert "1 missing model parameters" in message and "registers (1, 4, 384)" in message


def test_timm_cannot_hold_class_only_position_embedding():
    with pytest.raises(ConversionError, match="prefix_posemb='cls'"):
        vit.timm_export({"fields": {"pool": "cls", "num_registers": 4, "prefix_posemb": "cls"}})


# ---------------------------------------------------------------------------------------------
# transformers Dinov2Model / Dinov2WithRegistersModel
# ---------------------------------------------------------------------------------------------

HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=56,
                patch_size=14, layerscale_value=1e-5)
# facebook/dinov2-with-registers-small's structure: ViT-S/14, 4 registers, 518 px (the real-size case)
HF_REGISTERS_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518,
                          patch_size=14, layerscale_value=1e-5, num_register_tokens=4)


def _hf_model(registers: bool):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**HF_REGISTERS_SMALL))
    return Dinov2Model(Dinov2Config(**HF_SMALL))


@pytest.mark.parametrize("registers", [False, True], ids=["Dinov2Model", "Dinov2WithRegistersModel"])
def test_transformers_dinov2_both_ways(registers, tmp_path, randomize, images, convert, diff, reimport_equals):
    torch.manual_seed(5)
    ref = randomize_prefix(randomize(_hf_model(registers), seed=5), seed=5)
    size = ref.config.image_size
    x = images(2 if size < 100 else 1, size, seed=6)
    with torch.no_grad():
        out = ref(pixel_values=nchw(x))
    ref.save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert (model.num_registers, model.prefix_posemb) == ((4, "cls") if registers else (0, "all"))
    got = jax.jit(model.apply)(variables, x)
    label = f"transformers {type(ref).__name__} ({'ViT-S/14 at 518 px' if registers else 'small'}) vs mmjax"
    assert diff(got["pooled"], out.pooler_output.numpy(), f"{label} pooled") <= 5e-6
    assert diff(got["tokens"], out.last_hidden_state.numpy(), f"{label} tokens") <= 2e-5

    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [type(ref).__name__]
    with torch.device("meta"):
        fresh = type(ref)(type(ref.config).from_dict(config))
    fresh.load_state_dict(load_file(str(tmp_path / "back" / "model.safetensors")), strict=True, assign=True)
    for k, v in ref.state_dict().items():   # the mask token is zero in both: transformers initialises it so
        assert torch.equal(fresh.state_dict()[k], v), k
    reimport_equals("hf", tmp_path / "back", variables)


def test_transformers_registers_cannot_go_to_timm(tmp_path, randomize, convert, capsys):
    _hf_model(True).save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    with pytest.raises(SystemExit):
        convert("--to", "timm", "--input", tmp_path / "mm", "--output", tmp_path / "t.safetensors")
    assert "the class token only" in capsys.readouterr().err
