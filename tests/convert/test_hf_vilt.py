"""transformers ViLT <-> mmjax through mmjax-convert (small structures, random weights, padded
text, a non-square image so the position grid is resampled): ViltModel (tokens, pooled),
ViltForMaskedLM (MLM logits), ViltForImageAndTextRetrieval (score) and ViltForQuestionAnswering
(answer logits) give transformers' outputs after import; the export loads with from_pretrained
(nothing missing or unexpected), gives the same outputs and converts back exactly; checkpoints
and models outside what is supported get errors that name the problem."""

import json
from unittest import mock

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import (
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
    ViltModel,
)

import mmjax
from mmjax.convert import api, engine, io, vilt
from mmjax.models import vilt as vilt_model

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=99,
             max_position_embeddings=12, image_size=64, patch_size=16, num_labels=7)
CLASSES = {c.__name__: c for c in (ViltModel, ViltForMaskedLM, ViltForImageAndTextRetrieval,
                                   ViltForQuestionAnswering)}
VALID = np.array([[1] * 7, [1] * 5 + [0] * 2], bool)


def _inputs():
    rng = np.random.default_rng(0)
    return (rng.integers(0, SMALL["vocab_size"], (2, 7)).astype(np.int32),
            rng.normal(size=(2, 64, 96, 3)).astype(np.float32))     # 4x6 patches from a stored 4x4 grid


def _random_grid(model, seed):
    """transformers starts the image position embeddings at zero: make them random, so that a
    wrong resampling of the grid cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embeddings.position_embeddings"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _keep_order(weights, num_samples, replacement=False, **kw):
    """transformers draws every patch in a random order at eval; mmjax keeps raster order."""
    if not replacement and num_samples == weights.numel():
        return torch.arange(num_samples)
    raise AssertionError("no patch sampling expected")


def _torch_outputs(model, name: str) -> dict:
    tokens, images = _inputs()
    with torch.no_grad(), mock.patch.object(torch, "multinomial", _keep_order):
        out = model.eval()(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(VALID).long(),
                           pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    if name == "ViltModel":
        return {"tokens": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}
    return {"logits": out.logits.numpy()}


@pytest.mark.parametrize("name", list(CLASSES))
def test_import_matches_and_export_round_trips(tmp_path, randomize, convert, reimport_equals, diff, name):
    cls = CLASSES[name]
    torch.manual_seed(0)
    ref = _random_grid(randomize(cls(ViltConfig(**SMALL)), seed=3), seed=5)
    if name == "ViltForImageAndTextRetrieval":
        with torch.no_grad():
            ref.rank_output.weight.mul_(20)       # a score well away from zero
    want = _torch_outputs(ref, name)
    ref.save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    got = jax.jit(model.apply)(variables, *_inputs(), VALID)
    for key, value in want.items():
        assert got[key].shape == value.shape
        assert diff(got[key], value, f"transformers {name} {key}") <= 1e-5       # measured <= 1.9e-6
    if name == "ViltModel":           # the layers stacked for nn.scan give the same result
        scanned, stacked = mmjax.load(str(tmp_path / "mm"), scan=True)
        again = jax.jit(scanned.apply)(stacked, *_inputs(), VALID)
        np.testing.assert_allclose(again["tokens"], got["tokens"], atol=1e-6)

    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "back")
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["architectures"] == [name]
    written = io.read_state_dict(str(tmp_path / "back" / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    tied = {vilt.DECODER} if name == "ViltForMaskedLM" else set()
    assert set(original) - set(written) == tied and set(written) <= set(original)
    for key, value in written.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    loaded, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in _torch_outputs(loaded, name).items():   # the weights are equal bit for bit (above);
        # torch's float32 reductions may differ by an ulp from run to run on a busy CPU
        np.testing.assert_allclose(value, want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    reimport_equals("hf", tmp_path / "back", mmjax.load(str(tmp_path / "mm"))[1])


@pytest.fixture
def mlm_folder(tmp_path, randomize):
    torch.manual_seed(1)
    _random_grid(randomize(ViltForMaskedLM(ViltConfig(**SMALL)), seed=4), 6).save_pretrained(str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_stored_tied_decoder_is_read_and_untied_refused(tmp_path, mlm_folder):
    config, state = io.read_hf_folder(str(mlm_folder))
    state[vilt.DECODER] = state[vilt.WORDS]
    io.write_hf_folder(str(tmp_path / "tied"), config, state)
    api.import_checkpoint("hf", str(tmp_path / "tied"), str(tmp_path / "mm"))
    state[vilt.DECODER] = state[vilt.WORDS] + 1
    io.write_hf_folder(str(tmp_path / "untied"), config, state)
    with pytest.raises(engine.ConversionError, match="untied MLM decoder"):
        api.plan_import("hf", str(tmp_path / "untied"))


def test_bad_checkpoint_lists_every_problem(tmp_path, mlm_folder, convert, capsys):
    config, state = io.read_hf_folder(str(mlm_folder))
    del state["vilt.encoder.layer.1.output.dense.weight"]
    state["vilt.embeddings.position_embeddings"] = np.zeros((1, 10, 32), np.float32)
    state["vilt.embeddings.image_type_embeddings.weight"] = np.zeros((3, 32), np.float32)
    io.write_hf_folder(str(tmp_path / "bad"), config, state)
    with pytest.raises(SystemExit):
        convert("--source", "hf", "--checkpoint", tmp_path / "bad", "--output", tmp_path / "mm")
    err = capsys.readouterr().err
    assert "1 unexpected keys" in err and "vilt.embeddings.image_type_embeddings.weight" in err
    assert "1 mis-shaped keys" in err
    assert "position_embeddings: checkpoint has (1, 10, 32), the model needs (1, 17, 32)" in err
    assert "1 missing model parameters" in err and "encoder/layer_1/mlp/fc2/kernel (48, 32)" in err


@pytest.mark.parametrize("change,match", [
    (dict(architectures=["ViltForImagesAndTextClassification"]), "Unsupported Hugging Face architecture"),
    (dict(max_image_length=100), "samples patches at random"),
    (dict(qkv_bias=False), "qkv_bias=False"),
])
def test_unsupported_checkpoints_are_refused(tmp_path, mlm_folder, change, match):
    config, state = io.read_hf_folder(str(mlm_folder))
    io.write_hf_folder(str(tmp_path / "other"), {**config, **change}, state)
    with pytest.raises(engine.ConversionError, match=match):
        api.plan_import("hf", str(tmp_path / "other"))


def test_models_transformers_cannot_express_are_refused():
    base = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=48, patch_size=16, image_size=64)
    with pytest.raises(engine.ConversionError, match="block="):
        vilt.hf_export({"fields": {**base, "block": dict(norm="post")}, "inputs": [], "source": {}})
    with pytest.raises(engine.ConversionError, match="square patches"):
        vilt.hf_export({"fields": {**base, "patch_size": [16, 8]}, "inputs": [], "source": {}})
    with pytest.raises(engine.ConversionError, match="no ViLT class for the 'itm' head"):
        vilt.hf_export({"fields": {**base, "head": "itm"}, "inputs": [], "source": {}})
    with pytest.raises(engine.ConversionError, match="square image_size"):
        vilt.hf_export({"fields": {**base, "image_size": [64, 96]}, "inputs": [], "source": {}})


def test_native_vqa_model_exports_for_transformers(tmp_path, convert):
    """A ViLT made in mmjax (no transformers config to start from) writes a folder that
    ViltForQuestionAnswering loads and runs alike."""
    fields = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=48, patch_size=16, image_size=64,
                  vocab_size=99, max_len=12, head="vqa", num_answers=5)
    model = vilt_model.ViLT(**fields)
    tokens, images = _inputs()
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens, images))["params"]
    inputs = [{"shape": [1, 12], "dtype": "int32"}, {"shape": [1, 64, 96, 3], "dtype": "float32"}]
    mmjax.pretrained.save(str(tmp_path / "mm"), model, params, inputs)
    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "hf")
    loaded, info = ViltForQuestionAnswering.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert loaded.config.image_size == 64 and loaded.config.num_labels == 5
    want = _torch_outputs(loaded, "ViltForQuestionAnswering")["logits"]
    got = model.apply({"params": params}, tokens, images, VALID)["logits"]
    np.testing.assert_allclose(got, want, atol=1e-6)
