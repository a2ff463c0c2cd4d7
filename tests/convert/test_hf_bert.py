"""transformers BERT <-> mmjax through mmjax-convert (small structures, random weights):
BertModel (pooler), BertForMaskedLM and BertLMHeadModel with cross-attention give transformers'
outputs after import; the export loads into transformers with strict=True (the tied decoder
aside, which transformers' own save_pretrained leaves out too), gives the same outputs and
converts back exactly; Google's original key names read alike; bad checkpoints and models that
transformers cannot express get errors that list every problem."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel

import mmjax
from mmjax.convert import api, bert, engine, io

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=99,
             max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CASES = {
    "BertModel": (BertModel, {}),
    "BertForMaskedLM": (BertForMaskedLM, {}),
    "BertLMHeadModel": (BertLMHeadModel, dict(is_decoder=True, add_cross_attention=True)),
}
VALID = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
CONTEXT_VALID = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)


def _inputs():
    rng = np.random.default_rng(0)
    return (rng.integers(0, SMALL["vocab_size"], (2, 6)).astype(np.int32),
            rng.normal(size=(2, 5, SMALL["hidden_size"])).astype(np.float32))


def _torch_outputs(model, name: str) -> dict:
    tokens, context = _inputs()
    kwargs = dict(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(VALID).long())
    if name == "BertLMHeadModel":
        kwargs.update(encoder_hidden_states=torch.from_numpy(context),
                      encoder_attention_mask=torch.from_numpy(CONTEXT_VALID).long(), use_cache=False)
    with torch.no_grad():
        out = model.eval()(**kwargs)
    if name == "BertModel":
        return {"tokens": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}
    return {"logits": out.logits.numpy()}


def _mmjax_outputs(path, name: str) -> dict:
    model, variables = mmjax.load(str(path))
    tokens, context = _inputs()
    args = (tokens, VALID, context, CONTEXT_VALID) if name == "BertLMHeadModel" else (tokens, VALID)
    return jax.jit(model.apply)(variables, *args)


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_and_export_round_trips(tmp_path, randomize, convert, reimport_equals, diff, name):
    cls, extra = CASES[name]
    torch.manual_seed(0)
    ref = randomize(cls(BertConfig(**SMALL, **extra)), seed=3)
    want = _torch_outputs(ref, name)
    ref.save_pretrained(str(tmp_path / "hf"))
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    got = _mmjax_outputs(tmp_path / "mm", name)
    for key, value in want.items():
        assert diff(got[key], value, f"transformers {name} {key}") <= 5e-6       # measured <= 6e-7

    convert("--to", "hf", "--input", tmp_path / "mm", "--output", tmp_path / "back")
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["architectures"] == [name]
    written = io.read_state_dict(str(tmp_path / "back" / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    tied = {} if name == "BertModel" else {
        k: written["bert." + v if v.startswith("embeddings") else v] for k, v in bert.TIED.items()}
    assert set(original) - set(written) == set(tied)
    strict = cls(BertConfig(**SMALL, **extra))
    strict.load_state_dict({k: torch.from_numpy(v) for k, v in {**written, **tied}.items()}, strict=True)
    for key, value in original.items():
        np.testing.assert_array_equal(strict.state_dict()[key].numpy(), value, err_msg=key)
    loaded, info = cls.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in _torch_outputs(loaded, name).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    reimport_equals("hf", tmp_path / "back", mmjax.load(str(tmp_path / "mm"))[1])


def _google_names(state: dict) -> dict:
    """The spelling of Google's original checkpoints (bert-base-uncased): LayerNorm gamma / beta,
    the tied decoder weight written out, a next-sentence head beside the MLM head."""
    out = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    out["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    out["cls.seq_relationship.weight"] = np.ones((2, SMALL["hidden_size"]), np.float32)
    out["cls.seq_relationship.bias"] = np.zeros(2, np.float32)
    return out


@pytest.fixture
def mlm_folder(tmp_path, randomize):
    torch.manual_seed(1)
    ref = randomize(BertForMaskedLM(BertConfig(**SMALL)), seed=4)
    ref.save_pretrained(str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_google_key_names_read_alike(tmp_path, mlm_folder, capsys):
    config, state = io.read_hf_folder(str(mlm_folder))
    io.write_hf_folder(str(tmp_path / "google"), config, _google_names(state))
    plan, google = api.plan_import("hf", str(tmp_path / "google"))
    assert any("seq_relationship" in note for note in plan.notes)
    _, ours = api.plan_import("hf", str(mlm_folder))
    expected = engine.flatten(mmjax.pretrained.abstract_params(mmjax.pretrained.build(plan.model_class, plan.fields),
                                                               plan.inputs))
    a, b = engine.to_mmjax(google, plan.table, expected), engine.to_mmjax(ours, plan.table, expected)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_untied_decoder_is_refused(tmp_path, mlm_folder):
    config, state = io.read_hf_folder(str(mlm_folder))
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1
    io.write_hf_folder(str(tmp_path / "untied"), config, state)
    with pytest.raises(engine.ConversionError, match="untied MLM decoder"):
        api.plan_import("hf", str(tmp_path / "untied"))


def test_bad_checkpoint_lists_every_problem(tmp_path, mlm_folder, convert, capsys):
    config, state = io.read_hf_folder(str(mlm_folder))
    del state["bert.encoder.layer.1.output.dense.weight"]
    state["bert.encoder.layer.0.attention.self.query.bias"] = np.zeros(31, np.float32)
    state["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(4, np.float32)
    io.write_hf_folder(str(tmp_path / "bad"), config, state)
    with pytest.raises(SystemExit):
        convert("--source", "hf", "--checkpoint", tmp_path / "bad", "--output", tmp_path / "mm")
    err = capsys.readouterr().err
    assert "1 unexpected keys" in err and "bert.encoder.layer.0.attention.self.rotary.weight" in err
    assert "1 mis-shaped keys" in err and "query.bias: checkpoint has (31,), the model needs (32,)" in err
    assert "1 missing model parameters" in err and "encoder/layer_1/mlp/fc2/kernel (48, 32)" in err


@pytest.mark.parametrize("fields,match", [
    (dict(cross_attention=True, causal=True, cross_attention_from=1), "cross_attention_from=1"),
    (dict(cross_attention=True), "bidirectional with cross-attention"),
    (dict(pool="cls"), "BertModel has a pooler"),
    (dict(block=dict(norm="pre"), pool="pooler"), "block="),
])
def test_models_transformers_cannot_express_are_refused(fields, match):
    base = dict(width=32, depth=2, num_heads=4, mlp_dim=48, vocab_size=99, max_len=20)
    inputs = [{"shape": [1, 20], "dtype": "int32"}, {"shape": [1, 20], "dtype": "bool"},
              {"shape": [1, 1, 32], "dtype": "float32"}]
    with pytest.raises(engine.ConversionError, match=match):
        bert.hf_export({"fields": {**base, **fields}, "inputs": inputs, "source": {}})


def test_pooler_beside_an_lm_head_is_left_out_with_a_note():
    spec = bert.hf_export({"fields": dict(variant="tiny", pool="pooler", lm_head=True), "inputs": [], "source": {}})
    assert spec.hf_config["architectures"] == ["BertForMaskedLM"] and spec.drop == (r"pooler/.*",)
    assert "pooler" in spec.notes[0]
