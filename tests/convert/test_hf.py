"""Hugging Face transformers <-> mmjax: parity of ViTForImageClassification and CLIPModel at
their default configs (model folders converted through the CLI), exact round trips that
transformers loads with strict=True, transformers 4.x key names, ViTModel's pooler, writing
timm / open_clip models as transformers folders, and bad input."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import mmjax
from mmjax.convert import io

CAPTIONS = ["a photo of a cat", "two dogs playing in the snow, seen from above", "¿qué es esto? 🤔"]


def _round_trip(tmp, cls, config, original, variables, convert, reimport_equals):
    """mmjax -> transformers folder (strict load equals the original) -> mmjax (equals the first)."""
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "back")
    with open(tmp / "back" / "config.json") as f:
        assert json.load(f)["architectures"] == [cls.__name__]
    written = io.read_state_dict(str(tmp / "back" / "model.safetensors"))
    with torch.device("meta"):
        fresh = cls(config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True, assign=True)
    assert set(fresh.state_dict()) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v, err_msg=k)
    reimport_equals("hf", tmp / "back", variables)


@pytest.fixture(scope="module")
def hf_vit(module_tmp, randomize, images, convert):
    tmp = module_tmp("hf_vit")
    torch.manual_seed(0)
    ref = randomize(ViTForImageClassification(ViTConfig()))
    x = images(2)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
    ref.save_pretrained(str(tmp / "hf"))
    del ref
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"got": np.asarray(jax.jit(model.apply)(variables, x)["logits"]), "want": want}


def test_vit_logits_match_transformers(hf_vit, diff):
    assert hf_vit["got"].shape == (2, 2)                 # the default config's 2 labels
    assert diff(hf_vit["got"], hf_vit["want"], "transformers ViTForImageClassification (default config) logits") <= 5e-6


@pytest.fixture(scope="module")
def hf_clip(module_tmp, randomize, images, convert):
    import open_clip
    tmp = module_tmp("hf_clip")
    torch.manual_seed(0)
    ref = randomize(CLIPModel(CLIPConfig()))
    x, tokens = images(2), open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        want_img = ref.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
        want_txt = ref.get_text_features(input_ids=tokens)
    want = [getattr(w, "pooler_output", w).numpy() for w in (want_img, want_txt)]   # v5 returns an output object
    ref.save_pretrained(str(tmp / "hf"))
    del ref
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    encode = jax.jit(lambda v, x, t: (model.apply(v, x, method="encode_image"),
                                      model.apply(v, t, method="encode_text")))
    return {"got": encode(variables, x, tokens.numpy().astype(np.int32)), "want": want}


def test_clip_embeddings_match_transformers(hf_clip, diff):
    (got_img, got_txt), (want_img, want_txt) = hf_clip["got"], hf_clip["want"]
    assert diff(got_img, want_img, "transformers CLIPModel (default config) image features") <= 1e-5
    assert diff(got_txt, want_txt, "transformers CLIPModel (default config) text features") <= 1e-5


SMALL_VIT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "image_size": 32, "patch_size": 8}
SMALL_CLIP = {"projection_dim": 32, "text_config": {**SMALL_VIT, "vocab_size": 100, "max_position_embeddings": 16,
                                                     "eos_token_id": 99, "bos_token_id": 98},
              "vision_config": SMALL_VIT}


@pytest.mark.parametrize("cls,config", [(ViTForImageClassification, ViTConfig(**SMALL_VIT, num_labels=3)),
                                        (CLIPModel, CLIPConfig(**SMALL_CLIP))], ids=["vit", "clip"])
def test_round_trip_is_exact(tmp_path, randomize, convert, reimport_equals, cls, config):
    torch.manual_seed(5)
    ref = randomize(cls(config), seed=5)
    ref.save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    _, variables = mmjax.load(str(tmp_path / "mm"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    _round_trip(tmp_path, cls, config, original, variables, convert, reimport_equals)
# transformers 5 names -> the 4.x names that most Hub checkpoints still use.
LEGACY = [(".layers.", ".encoder.layer."), ("attention.q_proj", "attention.attention.query"),
          ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
          ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
          ("mlp.fc2", "output.dense")]


def test_transformers_4_key_names(tmp_path, randomize, convert):
    """A folder in the 4.x layout converts to the same parameters (and transformers agrees it is
    the same model, so these are the real 4.x names)."""
    torch.manual_seed(2)
    ref = randomize(ViTForImageClassification(ViTConfig(**SMALL_VIT, num_labels=3)), seed=2)
    ref.save_pretrained(str(tmp_path / "new"))
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in LEGACY:
            key = key.replace(new, old)
        legacy[key] = value.numpy()
    assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
    (tmp_path / "old").mkdir()
    io.write_hf_folder(str(tmp_path / "old"), json.loads((tmp_path / "new" / "config.json").read_text()), legacy)
    reloaded = ViTForImageClassification.from_pretrained(str(tmp_path / "old"))
    for k, v in ref.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    for name in ("new", "old"):
        convert("--source", "hf", "--checkpoint", tmp_path / name, "--output", tmp_path / f"mm_{name}")
    _, new = mmjax.load(str(tmp_path / "mm_new"))
    _, old = mmjax.load(str(tmp_path / "mm_old"))
    jax.tree.map(np.testing.assert_array_equal, old, new)


def test_vit_model_pooler(tmp_path, randomize, images, convert, diff):
    """ViTModel's tanh pooler becomes the ViT's pre_logits; mmjax returns pooler_output."""
    torch.manual_seed(3)
    ref = randomize(ViTModel(ViTConfig(**SMALL_VIT)), seed=3)
    x = images(2, 32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
    ref.save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert model.representation_size == 64 and model.num_classes is None
    assert diff(jax.jit(model.apply)(variables, x)["pooled"], want, "transformers ViTModel pooler_output") <= 1e-6
    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "back")
    back = ViTModel.from_pretrained(str(tmp_path / "back"))
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_timm_and_open_clip_models_written_as_transformers_folders(tmp_path, randomize, images, convert, diff):
    """Exports with generated config.json: transformers builds the same functions as timm / open_clip."""
    import open_clip
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(4)
    vit_ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7), seed=4)
    save_file(vit_ref.state_dict(), str(tmp_path / "ti.safetensors"))
    convert("--source", "timm", "--model", "vit_tiny_patch16_224", "--checkpoint", tmp_path / "ti.safetensors",
            "--output", tmp_path / "mm_vit")
    convert("--to", "hf", "--input", tmp_path / "mm_vit", "--output", tmp_path / "hf_vit")
    hf_vit = ViTForImageClassification.from_pretrained(str(tmp_path / "hf_vit")).eval()
    x = torch.from_numpy(images(2).transpose(0, 3, 1, 2))
    with torch.no_grad():
        assert diff(hf_vit(pixel_values=x).logits, vit_ref(x), "timm -> mmjax -> transformers ViT logits") <= 1e-6

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                            "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}}
    clip_ref = randomize(open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
                                        text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"])), seed=5)
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    save_file(clip_ref.state_dict(), str(tmp_path / "oc.safetensors"))
    convert("--source", "open_clip", "--model", tmp_path / "tiny.json", "--checkpoint", tmp_path / "oc.safetensors",
            "--output", tmp_path / "mm_clip")
    convert("--to", "hf", "--input", tmp_path / "mm_clip", "--output", tmp_path / "hf_clip")
    hf_clip = CLIPModel.from_pretrained(str(tmp_path / "hf_clip")).eval()
    px = torch.from_numpy(images(2, 32).transpose(0, 3, 1, 2))
    tokens = torch.tensor([[98, 5, 7, 99] + [0] * 12, [98, 99] + [0] * 14])
    with torch.no_grad():
        got_img = hf_clip.get_image_features(pixel_values=px)
        got_txt = hf_clip.get_text_features(input_ids=tokens)
        assert diff(getattr(got_img, "pooler_output", got_img), clip_ref.encode_image(px),
                    "open_clip -> mmjax -> transformers CLIP image features") <= 5e-6
        assert diff(getattr(got_txt, "pooler_output", got_txt), clip_ref.encode_text(tokens),
                    "open_clip -> mmjax -> transformers CLIP text features") <= 5e-6


def test_bad_input(tmp_path, convert, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    io.write_state_dict(str(tmp_path / "gpt2" / "model.safetensors"), {"x": np.zeros(2, np.float32)})
    with pytest.raises(SystemExit):
        convert("--source", "hf", "--checkpoint", tmp_path / "gpt2", "--output", tmp_path / "out")
    assert "Unsupported Hugging Face architecture 'GPT2LMHeadModel'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert("--source", "hf", "--checkpoint", tmp_path / "nothing", "--output", tmp_path / "out")
    assert "is not a Hugging Face model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert("--to", "open_clip", "--input", tmp_path / "nothing", "--output", tmp_path / "x.safetensors")
    assert "is not an mmjax model directory" in capsys.readouterr().err
