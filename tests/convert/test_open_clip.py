"""open_clip / OpenAI CLIP <-> mmjax: embedding parity at the real ViT-B-16 size (through the
CLI), an exact round trip that open_clip loads with strict=True, the built-in model table
against open_clip's configs, QuickGELU and OpenAI-format files, and bad input."""

import json

import jax
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

import mmjax
from mmjax.convert import clip
from mmjax.convert.engine import ConversionError

NAME = "ViT-B-16"
CAPTIONS = ["a photo of a cat", "Ein Hund, der über die Wiese läuft! 🐕", "a diagram: x^2 + y^2 = r^2 (circle)"]


@pytest.fixture(scope="module")
def base(module_tmp, randomize, images, convert):
    tmp = module_tmp("open_clip")
    torch.manual_seed(0)
    ref = randomize(open_clip.create_model(NAME, pretrained=None))
    x, tokens = images(2), open_clip.tokenize(CAPTIONS).numpy()
    with torch.no_grad():
        want_img = ref.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        want_txt = ref.encode_text(torch.from_numpy(tokens)).numpy()
    save_file(ref.state_dict(), str(tmp / "model.safetensors"))
    del ref
    convert("--source", "open_clip", "--model", NAME, "--checkpoint", tmp / "model.safetensors", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    encode = jax.jit(lambda v, x, t: (model.apply(v, x, method="encode_image"),
                                      model.apply(v, t, method="encode_text")))
    got_img, got_txt = encode(variables, x, tokens.astype(np.int32))
    return {"got": (got_img, got_txt), "want": (want_img, want_txt)}


def test_embeddings_match_open_clip(base, diff):
    (got_img, got_txt), (want_img, want_txt) = base["got"], base["want"]
    assert diff(got_img, want_img, f"open_clip {NAME} vs mmjax encode_image") <= 2e-5
    assert diff(got_txt, want_txt, f"open_clip {NAME} vs mmjax encode_text") <= 2e-5


@pytest.mark.parametrize("name", [*clip.OPEN_CLIP_MODELS, "ViT-B-32-quickgelu", "ViT-B-16-quickgelu",
                                  "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu", "ViT-H-14-quickgelu"])
def test_builtin_configs_match_open_clip(name):
    assert clip.open_clip_config(name) == open_clip.get_model_config(name)


TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}}


def _tiny_open_clip(randomize, quick_gelu):
    torch.manual_seed(3)
    return randomize(open_clip.CLIP(embed_dim=32, quick_gelu=quick_gelu,
                                    vision_cfg=open_clip.CLIPVisionCfg(**TINY["vision_cfg"]),
                                    text_cfg=open_clip.CLIPTextCfg(**TINY["text_cfg"])), seed=3)


def test_round_trip_is_exact(tmp_path, randomize, convert, reimport_equals):
    """mmjax -> open_clip .pth (loads with strict=True, equals the original) -> mmjax (equal)."""
    ref = _tiny_open_clip(randomize, quick_gelu=False)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    save_file(ref.state_dict(), str(tmp_path / "tiny.safetensors"))
    convert("--source", "open_clip", "--model", tmp_path / "tiny.json", "--checkpoint", tmp_path / "tiny.safetensors",
            "--output", tmp_path / "mm")
    convert("--to", "open_clip", "--input", tmp_path / "mm", "--output", tmp_path / "back.pth")
    fresh = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(**TINY["vision_cfg"]),
                           text_cfg=open_clip.CLIPTextCfg(**TINY["text_cfg"]))
    fresh.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
    assert set(fresh.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    _, variables = mmjax.load(str(tmp_path / "mm"))
    reimport_equals("open_clip", tmp_path / "back.pth", variables, str(tmp_path / "tiny.json"))


def test_image_size_override_resamples_the_image_tower(tmp_path, randomize, convert):
    from timm.layers import resample_abs_pos_embed
    ref = _tiny_open_clip(randomize, quick_gelu=False)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    save_file(ref.state_dict(), str(tmp_path / "tiny.safetensors"))
    convert("--source", "open_clip", "--model", tmp_path / "tiny.json", "--checkpoint", tmp_path / "tiny.safetensors",
            "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"), image_size=48, scan=True)
    assert model.image["scan"] and model.text["scan"]
    want = resample_abs_pos_embed(ref.visual.positional_embedding.detach()[None], [6, 6], num_prefix_tokens=1)
    np.testing.assert_allclose(variables["params"]["visual"]["posemb"]["pos_embedding"], want.numpy(), atol=1e-6)
    np.testing.assert_array_equal(variables["params"]["textual"]["pos_embedding"],     # text is unchanged
                                  ref.positional_embedding.detach().numpy())
    out = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode_image"), variables,
                         jax.ShapeDtypeStruct((1, 48, 48, 3), np.float32))
    assert out.shape == (1, 32)


def test_quickgelu_and_openai_files(tmp_path, randomize, images, convert, diff, capsys):
    """An OpenAI-format file (metadata scalars, QuickGELU) converts under a plain config name,
    as open_clip loads it; a config with quick_gelu=true converts plain files the same way."""
    ref = _tiny_open_clip(randomize, quick_gelu=True)
    x = images(2, 32)
    tokens = np.zeros((2, 16), np.int32)
    tokens[0, :5], tokens[1, :3] = [98, 5, 7, 9, 99], [98, 4, 99]
    with torch.no_grad():
        want_img = ref.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        want_txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
    (tmp_path / "plain.json").write_text(json.dumps(TINY))
    (tmp_path / "quick.json").write_text(json.dumps({**TINY, "quick_gelu": True}))
    openai = {**ref.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
              "vocab_size": torch.tensor(100)}
    torch.save(openai, tmp_path / "openai.pt")
    save_file(ref.state_dict(), str(tmp_path / "plain.safetensors"))
    runs = [("plain.json", "openai.pt"), ("quick.json", "plain.safetensors")]
    for i, (config, checkpoint) in enumerate(runs):
        convert("--source", "open_clip", "--model", tmp_path / config, "--checkpoint", tmp_path / checkpoint,
                "--output", tmp_path / f"mm{i}")
        model, variables = mmjax.load(str(tmp_path / f"mm{i}"))
        assert model.image["act"] == model.text["act"] == "quick_gelu"
        got_img, got_txt = jax.jit(lambda v, x, t, m=model: (m.apply(v, x, method="encode_image"),
                                                           m.apply(v, t, method="encode_text")))(variables, x, tokens)
        assert diff(got_img, want_img, f"QuickGELU {checkpoint} encode_image") <= 1e-4
        assert diff(got_txt, want_txt, f"QuickGELU {checkpoint} encode_text") <= 1e-4
    assert "note: OpenAI checkpoint: using QuickGELU" in capsys.readouterr().out


def test_bad_input(tmp_path, randomize, convert, capsys):
    save_file(_tiny_open_clip(randomize, quick_gelu=False).state_dict(), str(tmp_path / "tiny.safetensors"))
    patch16 = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_size": 16}}
    (tmp_path / "patch16.json").write_text(json.dumps(patch16))
    cases = [   # (model given, what the error must say)
        (tmp_path / "patch16.json", [
            "visual.conv1.weight: checkpoint has (64, 3, 8, 8), the model needs (64, 3, 16, 16)",
            "visual.positional_embedding: checkpoint has (17, 64), the model needs (5, 64)"]),
        ("ViT-B-17", ["Unknown open_clip model 'ViT-B-17'"]),
        ("nllb-clip-base-siglip", ["does not support", "text_cfg.hf_model_name"]),   # ViT-*-SigLIP*: test_siglip.py
        ("convnext_base", ["does not support", "vision_cfg.timm_model_name"]),
        ("RN50", ["ResNet towers are not supported"]),
    ]
    for name, messages in cases:
        with pytest.raises(SystemExit):
            convert("--source", "open_clip", "--model", name, "--checkpoint", tmp_path / "tiny.safetensors",
                    "--output", tmp_path / "out")
        err = capsys.readouterr().err
        assert all(m in err for m in messages), err
    with pytest.raises(ConversionError, match="text pool 'none'"):
        clip.open_clip_export({"fields": {"image": {}, "text": {"pool": "none"}}})
