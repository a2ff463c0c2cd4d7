"""transformers BLIP <-> mmjax through mmjax-convert (small structures, random weights, float32):
BlipForImageTextRetrieval (ITM logits and ITC similarity), BlipForConditionalGeneration (logits
with text padding) and BlipForQuestionAnswering (answer logits) give transformers' outputs after
import, also scanned; the export loads with from_pretrained (no missing, unexpected or mismatched
keys), gives the same outputs and converts back exactly; models born in mmjax export too. BLIP-base
at its real structure: tests/models/test_blip.py."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

import mmjax
from mmjax import pretrained
from mmjax.convert import api, blip, engine, io
from mmjax.models import blip as mm_blip

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=24, encoder_hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=40, vocab_size=99, max_position_embeddings=20, bos_token_id=97, sep_token_id=98,
            pad_token_id=0, eos_token_id=2)
CASES = {"BlipForImageTextRetrieval": BlipForImageTextRetrieval,
         "BlipForConditionalGeneration": BlipForConditionalGeneration}
VALID = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)


def _config(vision=VISION, text=TEXT) -> BlipConfig:
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16)


def _inputs(size=32, vocab=99):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab - 2, (2, 6)).astype(np.int32)
    tokens[:, 0] = vocab - 2                                   # a bos / [ENC]-like first token
    tokens[~VALID] = 0
    return rng.normal(size=(2, size, size, 3)).astype(np.float32), tokens


def image_sensitive(model, seed: int, std: float = 0.1):
    """transformers draws BLIP's vision weights with std 1e-10 (initializer_range) and the
    cross-attention's at 0.02: redraw them (and the ITM head), so that the image visibly moves the
    outputs and a mis-mapped vision or cross-attention weight cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and any(part in name for part in ("vision_model", "crossattention", "itm_head")):
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def torch_outputs(model, name: str, images, tokens) -> dict:
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    kwargs = dict(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(VALID).long(),
                  pixel_values=pixels)
    with torch.no_grad():
        if name == "BlipForConditionalGeneration":
            return {"logits": model.eval()(**kwargs).logits.numpy()}
        itm = model.eval()(**kwargs, use_itm_head=True).itm_score.numpy()
        itc = model(**kwargs, use_itm_head=False).itm_score.numpy()
    return {"itm_logits": itm, "similarity": itc}


def mmjax_outputs(model, variables, images, tokens) -> dict:
    out = dict(jax.jit(model.apply)(variables, images, tokens, VALID))
    if "image_embeds" in out:
        out["similarity"] = out["image_embeds"] @ out["text_embeds"].T
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_and_export_round_trips(tmp_path, randomize, convert, reimport_equals, diff, name):
    cls = CASES[name]
    torch.manual_seed(0)
    ref = image_sensitive(randomize(cls(_config()), seed=3), seed=3)
    images, tokens = _inputs()
    want = torch_outputs(ref, name, images, tokens)
    ref.save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    got = mmjax_outputs(model, variables, images, tokens)
    for key, value in want.items():       # logits: every position, the padded ones included
        assert diff(got[key], value, f"{name} {key}") <= 2e-5
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "scanned", "--scan")
    scanned = mmjax_outputs(*mmjax.load(str(tmp_path / "scanned")), images, tokens)
    for key, value in got.items():       # both towers' stacks scanned (the tower dicts get scan=True)
        np.testing.assert_allclose(scanned[key], value, atol=1e-5, err_msg=f"scanned {key}")

    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "back")
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["architectures"] == [name]
    loaded, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in torch_outputs(loaded, name, images, tokens).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    reimport_equals("hf", tmp_path / "back", variables)


VQA_TEXT = {**TEXT, "hidden_size": 32}     # transformers' VQA decoder reads the question at encoder_hidden_size
ANSWERS = np.array([[97, 11, 12, 98], [97, 13, 98, 0]], np.int32)


# transformers (5.x) drops the encoder mask in BLIP's text cross-attention (BlipTextLayer hands it to
# BlipTextAttention as `attention_mask`, which its self-attention then replaces by the absent
# `encoder_attention_mask`): harmless for images (all tokens real), wrong for a padded question read
# by the VQA answer decoder. mmjax masks the padding, as the official BLIP does; so the questions here
# are unpadded (the answers are padded).
QUESTION_VALID = np.ones_like(VALID)


def vqa_torch_logits(model, images, tokens) -> np.ndarray:
    """The answer decoder's logits (BlipForQuestionAnswering.forward returns only the loss), from
    transformers' own sub-modules wired as its forward wires them."""
    mask = torch.from_numpy(QUESTION_VALID).long()
    with torch.no_grad():
        image_states = model.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))[0]
        question = model.text_encoder(input_ids=torch.from_numpy(tokens).long(), attention_mask=mask,
                                      encoder_hidden_states=image_states)[0]
        return model.text_decoder(input_ids=torch.from_numpy(ANSWERS).long(),
                                  attention_mask=torch.from_numpy(ANSWERS != 0).long(), encoder_hidden_states=question,
                                  encoder_attention_mask=mask).logits.numpy()


def test_question_answering_import_matches_and_export_round_trips(tmp_path, randomize, convert, reimport_equals,
                                                                    diff):
    torch.manual_seed(4)
    ref = image_sensitive(randomize(BlipForQuestionAnswering(_config(text=VQA_TEXT)), seed=6), seed=6)
    images, tokens = _inputs()
    want = vqa_torch_logits(ref, images, tokens)
    ref.save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    got = jax.jit(model.apply)(variables, images, tokens, QUESTION_VALID, ANSWERS, ANSWERS != 0)["logits"]
    assert diff(got, want, "BlipForQuestionAnswering answer logits") <= 2e-5
    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "back")
    loaded, info = BlipForQuestionAnswering.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    np.testing.assert_array_equal(vqa_torch_logits(loaded, images, tokens), want)
    reimport_equals("hf", tmp_path / "back", variables)


@pytest.mark.parametrize("cls", [mm_blip.BlipRetrieval, mm_blip.BlipCaptioner, mm_blip.BlipQuestionAnswering])
def test_mmjax_born_models_export_to_transformers(tmp_path, convert, diff, cls):
    """A model made in mmjax (no transformers config to start from) is written with a config that
    from_pretrained builds, and transformers computes what mmjax does."""
    vision = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=48, patch_size=8)
    text = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=40, vocab_size=99, max_len=20)
    model = cls(vision=vision, text=text, **({"embed_dim": 16} if cls is mm_blip.BlipRetrieval else {}))
    images, tokens = _inputs()
    vqa = cls is mm_blip.BlipQuestionAnswering
    args = (images, tokens, QUESTION_VALID, ANSWERS, ANSWERS != 0) if vqa else (images, tokens, VALID)
    variables = model.init(jax.random.key(0), *args)
    specs = [pretrained.input_spec(np.shape(a), str(np.asarray(a).dtype)) for a in args]
    pretrained.save(str(tmp_path / "mm"), model, nn.meta.unbox(variables)["params"], specs, {"library": "mmjax"})
    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "hf")
    name = {v: k for k, v in blip.CLASSES.items()}[f"mmjax.models.blip.{cls.__name__}"]
    loaded, info = CASES.get(name, BlipForQuestionAnswering).from_pretrained(str(tmp_path / "hf"),
                                                                             output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    got = dict(model.apply(variables, *args))
    if vqa:
        assert diff(got["logits"], vqa_torch_logits(loaded, images, tokens), "mmjax-born VQA logits") <= 2e-5
        return
    want = torch_outputs(loaded, name, images, tokens)
    if "image_embeds" in got:
        got["similarity"] = got["image_embeds"] @ got["text_embeds"].T
    for key, value in want.items():
        assert diff(got[key], value, f"mmjax-born {name} {key}") <= 2e-5


def test_written_out_tied_decoder_is_checked(tmp_path, randomize):
    torch.manual_seed(1)
    randomize(BlipForConditionalGeneration(_config()), seed=4).save_pretrained(str(tmp_path / "hf"))
    config, state = io.read_hf_folder(str(tmp_path / "hf"))
    for key, source in blip.TIED.items():
        state[key] = state[source]
    io.write_hf_folder(str(tmp_path / "tied"), config, state)
    plan, _ = api.plan_import("hf", str(tmp_path / "tied"))          # read and skipped
    state[f"{blip.DECODER_HEAD}.decoder.bias"] = state[f"{blip.DECODER_HEAD}.bias"] + 1
    io.write_hf_folder(str(tmp_path / "untied"), config, state)
    with pytest.raises(engine.ConversionError, match="untied LM decoder"):
        api.plan_import("hf", str(tmp_path / "untied"))


def test_bad_checkpoint_lists_every_problem(tmp_path, randomize, convert, capsys):
    torch.manual_seed(2)
    randomize(BlipForImageTextRetrieval(_config()), seed=5).save_pretrained(str(tmp_path / "hf"))
    config, state = io.read_hf_folder(str(tmp_path / "hf"))
    del state["text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    state["vision_model.encoder.layers.0.self_attn.qkv.bias"] = np.zeros(95, np.float32)
    state["text_encoder.pooler.dense.weight"] = np.zeros((24, 24), np.float32)
    io.write_hf_folder(str(tmp_path / "bad"), config, state)
    with pytest.raises(SystemExit):
        convert("--source", "hf", "--checkpoint", tmp_path / "bad", "--output", tmp_path / "mm")
    err = capsys.readouterr().err
    assert "1 unexpected keys" in err and "text_encoder.pooler.dense.weight" in err
    assert "1 mis-shaped keys" in err and "qkv.bias: checkpoint has (95,), the model needs (96,)" in err
    assert "1 missing model parameters" in err and "text_encoder/encoder/layer_1/cross_attn/key/kernel" in err


def test_models_transformers_cannot_express_are_refused():
    inputs = [{"shape": [1, 32, 32, 3]}, {"shape": [1, 20]}, {"shape": [1, 20]}]
    for fields, match in [(dict(vision=dict(pre_norm=True)), "pre_norm"),
                          (dict(text=dict(type_vocab_size=2)), "type_vocab_size")]:
        with pytest.raises(engine.ConversionError, match=match):
            blip.hf_export({"class": blip.RETRIEVAL, "fields": fields, "inputs": inputs, "source": {}})
    narrow = dict(text=dict(variant=None, width=24, depth=2, num_heads=4, mlp_dim=40))
    with pytest.raises(engine.ConversionError, match="equal text and vision widths"):
        blip.hf_export({"class": blip.QUESTION_ANSWERING, "fields": narrow, "inputs": inputs, "source": {}})
    spec = blip.hf_export({"class": blip.RETRIEVAL, "fields": dict(learn_temperature=True), "inputs": inputs,
                           "source": {}})
    assert spec.drop == (r"temp",) and "temperature" in spec.notes[0]
