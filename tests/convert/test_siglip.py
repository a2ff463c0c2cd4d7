"""SigLIP <-> mmjax: transformers `SiglipModel` at small dims and its real structure (parity of the
image and text embeddings and the biased logits through the CLI, exact round trips that transformers
loads strictly, also from a config mmjax writes itself), its real-size key table by shapes,
timm's `vit_*_siglip_*` towers (parity, the name table against timm), and what stays refused."""

import json
import shutil

import jax
import numpy as np
import pytest
import table_shapes
import torch
from references import require

import mmjax
from mmjax import pretrained
from mmjax.convert import engine, io, siglip

transformers = require("transformers")
timm = require("timm")

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
SMALL_SIGLIP = {"text_config": {**SMALL, "vocab_size": 100, "max_position_embeddings": 16},
                "vision_config": {**SMALL, "image_size": 32, "patch_size": 8}}
LOGIT_SCALE = float(np.log(150.0))   # above CLIP's clip at 100: SigLIP must not clip it


def _siglip_outputs(ref, x, tokens):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(tokens).long(), pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
        image = ref.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
        text = ref.get_text_features(input_ids=torch.from_numpy(tokens).long())
    return {"image": getattr(image, "pooler_output", image).numpy(),     # v5 returns an output object
            "text": getattr(text, "pooler_output", text).numpy(), "logits_per_image": out.logits_per_image.numpy()}


def _mmjax_outputs(model, variables, x, tokens):
    def run(v, x, t):
        out = model.apply(v, x, t)
        logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T + out["logit_bias"]
        return {"image": model.apply(v, x, method="encode_image"), "text": model.apply(v, t, method="encode_text"),
                "logits_per_image": logits}
    return {k: np.asarray(v) for k, v in jax.jit(run)(variables, x, tokens).items()}


@pytest.fixture(scope="module")
def hf_siglip(module_tmp, randomize, images, convert):
    tmp = module_tmp("hf_siglip")
    torch.manual_seed(0)
    config = transformers.SiglipConfig(**SMALL_SIGLIP)
    ref = randomize(transformers.SiglipModel(config))
    with torch.no_grad():
        ref.logit_scale.fill_(LOGIT_SCALE)
        ref.logit_bias.fill_(-3.0)
    x = images(2, 32)
    tokens = np.random.default_rng(0).integers(0, 100, (3, 16)).astype(np.int32)
    want = _siglip_outputs(ref, x, tokens)
    ref.save_pretrained(str(tmp / "hf"))
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"tmp": tmp, "ref": ref, "config": config, "x": x, "tokens": tokens, "want": want,
            "model": model, "variables": variables, "got": _mmjax_outputs(model, variables, x, tokens)}


def test_embeddings_and_logits_match_transformers(hf_siglip, diff):
    got, want = hf_siglip["got"], hf_siglip["want"]
    assert hf_siglip["model"].max_logit_scale is None and not hf_siglip["model"].image_projection
    # measured: 1.2e-6, 1.6e-6 and 1.3e-5 (logits up to 49: exp(logit_scale) is 150)
    for key, label, tol in (("image", "image embeds", 5e-6), ("text", "text embeds", 5e-6),
                            ("logits_per_image", "logits_per_image", 5e-5)):
        assert got[key].shape == want[key].shape
        assert diff(got[key], want[key], f"transformers SiglipModel (small) {label}") <= tol


def _strict_load(folder, config, original):
    written = io.read_state_dict(str(folder / "model.safetensors"))
    with torch.device("meta"):
        fresh = transformers.SiglipModel(config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True, assign=True)
    for k, v in original.items():
        np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v, err_msg=k)


def test_round_trip_is_exact(hf_siglip, convert, reimport_equals):
    """mmjax -> transformers folder (strict load equals the original) -> mmjax (equals the first)."""
    tmp = hf_siglip["tmp"]
    original = {k: v.numpy() for k, v in hf_siglip["ref"].state_dict().items()}
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "back")
    assert json.loads((tmp / "back" / "config.json").read_text())["architectures"] == ["SiglipModel"]
    _strict_load(tmp / "back", hf_siglip["config"], original)
    reimport_equals("hf", tmp / "back", hf_siglip["variables"])


def test_export_writes_its_own_config(hf_siglip, convert):
    """A SigLIP that did not come from transformers (its config.json written by mmjax) loads in
    transformers and gives the same outputs."""
    tmp = hf_siglip["tmp"]
    shutil.copytree(tmp / "mm", tmp / "mm_own")
    config = json.loads((tmp / "mm_own" / "model_config.json").read_text())
    config["source"] = {"library": "mmjax"}
    (tmp / "mm_own" / "model_config.json").write_text(json.dumps(config))
    convert("--to", "hf", "--input", tmp / "mm_own", "--output", tmp / "own")
    back = transformers.SiglipModel.from_pretrained(str(tmp / "own")).eval()
    got = _siglip_outputs(back, hf_siglip["x"], hf_siglip["tokens"])
    for key, want in hf_siglip["want"].items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_open_clip_export_needs_a_timm_tower(hf_siglip, convert, capsys):
    """open_clip builds SigLIP image towers by timm name: a tower no name builds is refused."""
    tmp = hf_siglip["tmp"]
    with pytest.raises(SystemExit):
        convert("--to", "open_clip", "--input", tmp / "mm", "--output", tmp / "oc.safetensors")
    assert "no timm SigLIP tower (vit_*_siglip_*) has its image tower's" in capsys.readouterr().err
    assert not (tmp / "oc.safetensors").exists()


def test_real_size_key_table_by_shapes():
    """google/siglip-base-patch16-224's structure (transformers' config defaults): every key fills
    one mmjax parameter of the right shape and every parameter is filled, without any array."""
    config = transformers.SiglipConfig()
    with torch.device("meta"):
        state = {k: tuple(v.shape) for k, v in transformers.SiglipModel(config).state_dict().items()}
    plan = siglip.from_hf(config.to_dict(), {})
    fields = {**plan.fields, "image": {**plan.fields["image"], "scan": True},
              "text": {**plan.fields["text"], "scan": True}}
    scanned = pretrained.build(plan.model_class, fields)
    expected = table_shapes.unrolled_shapes(pretrained.abstract_params(scanned, plan.inputs))
    filled = []
    for key, shape in state.items():
        found = [(r, m) for r, t in zip(plan.table.rules, plan.table._torch_res) for m in (t.fullmatch(key),) if m]
        assert found, f"no rule for {key}"
        rl, match = found[0]
        paths = [p.format(**match.groupdict()) for p in rl.mmjax_paths]
        torch_shapes = [rl.transform.torch_shape(expected[p]) for p in paths]
        assert (sum(s[0] for s in torch_shapes), *torch_shapes[0][1:]) == shape, key
        filled += paths
    assert sorted(filled) == sorted(expected)
    assert plan.fields["image"]["act"] == plan.fields["text"]["act"] == "gelu_tanh"


def test_unsupported_siglip_inputs_are_named(tmp_path, convert, capsys):
    config = transformers.SiglipConfig(**SMALL_SIGLIP).to_dict()
    with pytest.raises(engine.ConversionError, match="vision_use_head=False"):
        siglip.from_hf({**config, "vision_config": {**config["vision_config"], "vision_use_head": False}}, {})
    with pytest.raises(engine.ConversionError, match="projection_size 32"):
        siglip.from_hf({**config, "text_config": {**config["text_config"], "projection_size": 32}}, {})
    with pytest.raises(engine.ConversionError, match="Unknown or unsupported timm SigLIP model"):
        siglip.timm_architecture("vit_base_patch16_siglip_gap_999")


# ---------------------------------------------------------------------------------------------
# timm SigLIP image towers
# ---------------------------------------------------------------------------------------------

OPEN_CLIP_NAME = "ViT-B-32-SigLIP2-256"      # its image tower: timm's vit_base_patch32_siglip_256
TIMM_NAME = "vit_base_patch32_siglip_256"   # gelu_tanh in the blocks and the MAP head


@pytest.fixture(scope="module")
def open_clip_siglip(module_tmp, randomize, images, convert):
    """open_clip's ViT-B-32-SigLIP2-256 with its real image tower and a small text tower; its trunk
    is the timm model, so one reference serves both sources."""
    open_clip = require("open_clip")
    tmp = module_tmp("open_clip_siglip")
    config = json.loads(json.dumps(open_clip.get_model_config(OPEN_CLIP_NAME)))
    config["text_cfg"].update(width=64, heads=4, layers=2, vocab_size=100, context_length=16)
    (tmp / "small.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    ref = randomize(open_clip.create_model(OPEN_CLIP_NAME, text_cfg=config["text_cfg"]), seed=1)
    with torch.no_grad():
        ref.logit_scale.fill_(LOGIT_SCALE)
        ref.logit_bias.fill_(-3.0)
    x = images(2, 256)
    tokens = np.random.default_rng(1).integers(0, 100, (3, 16)).astype(np.int32)
    with torch.no_grad():
        image = ref.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2)))
        text = ref.encode_text(torch.from_numpy(tokens).long())
        img_n, txt_n = (torch.nn.functional.normalize(f, dim=-1) for f in (image, text))
        logits = ref.logit_scale.exp() * img_n @ txt_n.T + ref.logit_bias
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    io.write_state_dict(str(tmp / "oc.safetensors"), state)
    io.write_state_dict(str(tmp / "timm.safetensors"), {k: v.numpy() for k, v in ref.visual.trunk.state_dict().items()})
    convert("--source", "open_clip", "--model", tmp / "small.json", "--checkpoint", tmp / "oc.safetensors",
            "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"tmp": tmp, "x": x, "tokens": tokens, "state": state, "config": config, "model": model,
            "variables": variables,
            "want": {"image": image.numpy(), "text": text.numpy(), "logits_per_image": logits.numpy()}}


def test_open_clip_siglip_matches_open_clip(open_clip_siglip, diff):
    oc, model = open_clip_siglip, open_clip_siglip["model"]
    assert not model.image_projection and model.text_proj_bias and model.max_logit_scale is None
    got = _mmjax_outputs(model, oc["variables"], oc["x"], oc["tokens"])
    for key, tol in (("image", 5e-6), ("text", 5e-6), ("logits_per_image", 5e-5)):
        assert diff(got[key], oc["want"][key], f"open_clip {OPEN_CLIP_NAME} (small text) {key}") <= tol


def test_open_clip_siglip_round_trip_is_exact(open_clip_siglip, convert, reimport_equals):
    """mmjax -> open_clip file + config (open_clip loads it strictly; equal to the original) -> mmjax."""
    open_clip = require("open_clip")
    oc, tmp = open_clip_siglip, open_clip_siglip["tmp"]
    convert("--to", "open_clip", "--input", tmp / "mm", "--output", tmp / "back.safetensors")
    sidecar = json.loads((tmp / "back.json").read_text())
    assert sidecar == oc["config"]
    written = io.read_state_dict(str(tmp / "back.safetensors"))
    with torch.device("meta"):
        fresh = open_clip.create_model(OPEN_CLIP_NAME, text_cfg=sidecar["text_cfg"], device="meta")
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True, assign=True)
    assert set(written) == set(oc["state"])
    for k, v in oc["state"].items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    reimport_equals("open_clip", tmp / "back.safetensors", oc["variables"], model=str(tmp / "back.json"))


def test_timm_tower_matches_timm(open_clip_siglip, convert, diff):
    oc = open_clip_siglip
    convert("--source", "timm", "--model", TIMM_NAME, "--checkpoint", oc["tmp"] / "timm.safetensors",
            "--output", oc["tmp"] / "timm_mm")
    model, variables = mmjax.load(str(oc["tmp"] / "timm_mm"))
    assert (model.pool, model.class_token, model.act) == ("map", False, "gelu_tanh")
    got = jax.jit(model.apply)(variables, oc["x"])["pooled"]
    assert diff(got, oc["want"]["image"], f"timm {TIMM_NAME} pooled (MAP head)") <= 5e-6      # measured 1.4e-6
    # and back: timm's name and arguments beside the file, which timm loads strictly, equal to the original
    convert("--to", "timm", "--input", oc["tmp"] / "timm_mm", "--output", oc["tmp"] / "timm_back.safetensors")
    sidecar = json.loads((oc["tmp"] / "timm_back.json").read_text())
    assert sidecar == {"architecture": TIMM_NAME, "model_args": {"num_classes": 0}}
    written = io.read_state_dict(str(oc["tmp"] / "timm_back.safetensors"))
    with torch.device("meta"):
        fresh = timm.create_model(sidecar["architecture"], **sidecar["model_args"])
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True, assign=True)
    trunk = {k.removeprefix("visual.trunk."): v for k, v in oc["state"].items() if k.startswith("visual.trunk.")}
    assert set(written) == set(trunk)
    for k, v in trunk.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)


@pytest.mark.parametrize("name", ["vit_so400m_patch14_siglip_224", "vit_so400m_patch16_siglip_gap_256",
                                  "vit_giantopt_patch16_siglip_384", "vit_base_patch16_siglip_224"])
def test_timm_name_table_matches_timm(name):
    """Sizes, pooling and activation read from the name are what timm builds (no weights made)."""
    fields, size = siglip.timm_architecture(name)
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    block = ref.blocks[0]
    assert (len(ref.blocks), ref.embed_dim, block.attn.num_heads, block.mlp.fc1.out_features) == (
        fields["depth"], fields["width"], fields["num_heads"], fields["mlp_dim"])
    assert (ref.patch_embed.patch_size[0], ref.patch_embed.img_size[0]) == (fields["patch_size"], size)
    assert ref.global_pool == {"map": "map", "gap": "avg"}[fields["pool"]] and ref.cls_token is None
    assert type(block.mlp.act).__name__ == {"gelu": "GELU", "gelu_tanh": "GELUTanh"}[fields["act"]]
    if fields["pool"] == "map":
        assert type(ref.attn_pool.mlp.act).__name__ == type(block.mlp.act).__name__


def test_timm_pooling_must_match_the_keys():
    """A MAP tower without attention-pool weights, or a mean-pooled one with them, is refused."""
    with pytest.raises(engine.ConversionError, match="lacks attn_pool"):
        siglip.from_timm(TIMM_NAME, {"norm.weight": np.zeros(1)})
    with pytest.raises(engine.ConversionError, match="has attn_pool"):
        siglip.from_timm("vit_base_patch16_siglip_gap_224",
                         {"norm.weight": np.zeros(1), "attn_pool.latent": np.zeros(1)})
