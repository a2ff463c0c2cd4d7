"""transformers Blip2ForConditionalGeneration with an OPT language model <-> mmjax Blip2LM through
mmjax-convert (small dimensions at the real structure, random weights): the same logits on the text
positions and the same LM loss (labels masked on the queries, the BOS and the padding, as LAVIS);
the same greedy tokens as transformers' `generate` for captioning (BOS only) and for left-padded
"Question: ... Answer:" prompts; a LLaMA LM in OPT's place gives transformers' logits too; the
export loads into transformers with strict=True; a Blip2Model checkpoint (the same keys) imports
too, and so does a LAVIS blip2_opt file (key names from LAVIS's source, built here from the
transformers model). The published BLIP-2 OPT-2.7B / OPT-6.7B structures are checked by shapes
only (torch meta tensors against jax.eval_shape), every key both ways."""

import json

import jax
import numpy as np
import pytest
import table_shapes
from blip2_names import lavis_names, shape_problems
from references import require

import mmjax
from mmjax import generate, pretrained
from mmjax.convert import api, blip2, blip2_lavis, engine, io
from mmjax.models import blip2 as blip2_models

torch = require("torch")
transformers = require("transformers")

VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
              patch_size=8, initializer_range=0.02)     # Blip2VisionConfig's default 1e-10 leaves the image unseen
# Larger random weights than transformers' inits (Q-Former 0.2, language_projection 0.1, OPT 0.3): with
# them the image shows in the logits (std-0.02 cross-attention hardly moves the queries) and a random OPT
# does not repeat one token forever, so generated tokens test something.
QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, vocab_size=99,
               max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               initializer_range=0.2)
PAD, BOS, IMAGE = 1, 2, 98          # OPT's pad and BOS (= EOS) ids; the image placeholder is the last word
OPT = dict(model_type="opt", hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=99,
           word_embed_proj_dim=48, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=BOS, init_std=0.3)
Q = 4
TEXT = np.array([[BOS, 5, 6, 7, 8, 9], [BOS, 10, 11, 12, PAD, PAD]], np.int32)      # right-padded captions (training)
QUESTIONS = np.array([[BOS, 20, 21, 22, 23, 24], [PAD, PAD, BOS, 30, 31, 32]], np.int32)   # left-padded prompts
LOGITS_TOL = 1e-5         # measured 6.9e-6 (float32, logits up to ~7)


def _config(**extra):
    return transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT,
                                    num_query_tokens=Q, image_token_index=IMAGE, initializer_range=0.1, **extra)


def _images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


def _pixels(images):
    return torch.from_numpy(images.transpose(0, 3, 1, 2))


def _with_placeholders(tokens):
    """transformers' input: Q image placeholders before the text, padding (left) before both."""
    mask = tokens != PAD
    rows = [np.concatenate([t[~m], np.full(Q, IMAGE), t[m]]) for t, m in zip(tokens, mask)]
    ids = np.stack(rows)
    return torch.from_numpy(ids), torch.from_numpy((ids != PAD).astype(np.int64))


@pytest.fixture(scope="module")
def converted(module_tmp, randomize, convert):
    tmp = module_tmp("blip2_lm")
    torch.manual_seed(0)
    ref = randomize(transformers.Blip2ForConditionalGeneration(_config()), seed=3)
    with torch.no_grad():       # transformers starts the queries at zero
        ref.query_tokens.normal_(generator=torch.Generator().manual_seed(4))
    ref.save_pretrained(str(tmp / "hf"))
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return tmp, ref, model, variables


def test_text_logits_and_lm_loss_match_transformers(converted, diff):
    _, ref, model, variables = converted
    images, mask = _images(), TEXT != PAD
    ids = np.concatenate([np.full((2, Q), IMAGE), TEXT], 1)       # right padding: placeholders first
    attention = np.concatenate([np.ones((2, Q), bool), mask], 1)
    labels = np.where(attention, ids, -100)
    labels[:, :Q + 1] = -100                    # queries and BOS are not scored (LAVIS's targets)
    with torch.no_grad():
        want = ref(pixel_values=_pixels(images), input_ids=torch.from_numpy(ids),
                   attention_mask=torch.from_numpy(attention.astype(np.int64)), labels=torch.from_numpy(labels))
    got = jax.jit(model.apply)(variables, images, TEXT, mask)
    assert got["logits"].shape == (2, TEXT.shape[1], OPT["vocab_size"]) and got["prompt_embeds"].shape == (2, Q, 48)
    real = mask[..., None]          # padded positions compute on but nothing reads them
    assert diff(np.where(real, got["logits"], 0), np.where(real, want.logits.numpy()[:, Q:], 0),
                "Blip2ForConditionalGeneration text logits") <= LOGITS_TOL
    loss, metrics = blip2_models.text_lm_loss(got["logits"], TEXT, mask)
    assert float(metrics["scored_tokens"]) == 5 + 3     # not the BOS, nor the padding
    print(f"LM loss: mmjax {float(loss):.7f}, transformers {float(want.loss):.7f}")
    assert abs(float(loss) - float(want.loss)) <= 1e-5


def test_llama_language_model_logits_match_transformers(randomize, diff):
    """The same composition with a LLaMA-family LM (GQA, rotary positions that count the queries),
    as MiniGPT-4 / InstructBLIP-Vicuna use; imported without the CLI (cheaper)."""
    llama = dict(model_type="llama", hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=99, pad_token_id=PAD, bos_token_id=BOS, initializer_range=0.3)
    config = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=llama,
                                      num_query_tokens=Q, image_token_index=IMAGE, initializer_range=0.1)
    torch.manual_seed(1)
    ref = randomize(transformers.Blip2ForConditionalGeneration(config), seed=5)
    with torch.no_grad():
        ref.query_tokens.normal_(generator=torch.Generator().manual_seed(6))
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    plan = blip2.from_hf({**config.to_dict(), "architectures": ["Blip2ForConditionalGeneration"]}, state)
    model = pretrained.build(plan.model_class, plan.fields)
    params = engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs))
    assert model.language_arch()["kind"] == "llama" and "language_model/lm_head/kernel" in params
    images, mask = _images(), TEXT != PAD
    ids = np.concatenate([np.full((2, Q), IMAGE), TEXT], 1)
    attention = np.concatenate([np.ones((2, Q), bool), mask], 1)
    with torch.no_grad():
        want = ref(pixel_values=_pixels(images), input_ids=torch.from_numpy(ids),
                   attention_mask=torch.from_numpy(attention.astype(np.int64))).logits.numpy()[:, Q:]
    got = jax.jit(model.apply)({"params": engine.unflatten(params)}, images, TEXT, mask)["logits"]
    real = mask[..., None]          # measured 1.1e-5 (logits up to ~7: float32 rounding, ~2e-6 relative)
    assert diff(np.where(real, got, 0), np.where(real, want, 0), "BLIP-2 with LLaMA, text logits") <= 2e-5


def test_greedy_tokens_match_transformers_generate(converted):
    """One left-padded batch: each image captioned (the BOS alone, transformers' default input_ids)
    and asked a "Question: ... Answer:" prompt."""
    _, ref, model, variables = converted
    captions = np.full((2, QUESTIONS.shape[1]), PAD, np.int32)
    captions[:, -1] = BOS
    tokens, images = np.concatenate([captions, QUESTIONS]), np.concatenate([_images(), _images()])
    ids, attention = _with_placeholders(tokens)
    with torch.no_grad():
        want = ref.generate(pixel_values=_pixels(images), input_ids=ids, attention_mask=attention,
                            max_new_tokens=8, do_sample=False, num_beams=1).numpy()[:, ids.shape[1]:]
    config = generate.GenerationConfig(max_new_tokens=8, eos_token_id=BOS, pad_token_id=PAD)
    got = blip2_models.generate_text(model, variables, images, tokens, config, prompt_mask=tokens != PAD)
    got = np.asarray(got.generated)[:, :want.shape[1]]
    print(f"\ncaptions: {got[:2].tolist()}, answers: {got[2:].tolist()}")
    np.testing.assert_array_equal(got, want)
    assert len({tuple(row) for row in got.tolist()}) == 4       # images and prompts lead elsewhere


def test_export_loads_strictly_and_round_trips(converted, convert, reimport_equals):
    tmp, ref, _, variables = converted
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "back")
    with open(tmp / "back" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Blip2ForConditionalGeneration"] and config["image_token_index"] == IMAGE
    written = io.read_state_dict(str(tmp / "back" / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    tied = {"language_model.lm_head.weight"}        # save_pretrained leaves the tied head out too
    assert set(original) - set(written) == tied and set(written) <= set(original)
    loaded, info = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp / "back"),
                                                                             output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in original.items():
        if key.endswith("qkv.bias"):            # the key part is written as zero: softmax cancels it
            q, _, v = np.split(value, 3)
            value = np.concatenate([q, np.zeros_like(q), v])
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value, err_msg=key)
    reimport_equals("hf", tmp / "back", variables)


def test_blip2_model_checkpoint_imports_and_exports_as_itself(converted, tmp_path):
    """Blip2Model holds the same keys (its language model is a *ForCausalLM too)."""
    _, ref, _, variables = converted
    other = transformers.Blip2Model(_config())
    other.load_state_dict(ref.state_dict(), strict=True)
    other.save_pretrained(str(tmp_path / "hf"))
    plan, state = api.plan_import("hf", str(tmp_path / "hf"))
    assert plan.model_class == blip2.LM
    params = engine.to_mmjax(state, plan.table, engine.flatten(variables["params"]))
    for path, value in engine.flatten(variables["params"]).items():
        np.testing.assert_array_equal(params[path], np.asarray(value), err_msg=path)
    export = blip2.lm_export({"class": blip2.LM, "fields": plan.fields, "source": plan.source, "inputs": plan.inputs})
    assert export.hf_config["architectures"] == ["Blip2Model"]


def test_unsupported_language_models_are_named(converted):
    tmp = converted[0]
    config, state = io.read_hf_folder(str(tmp / "hf"))
    bloom = {**config, "text_config": {"model_type": "bloom", "hidden_size": 48}}    # T5: test_hf_blip2_t5.py
    with pytest.raises(engine.ConversionError, match="BLIP-2 with a 'bloom' language model is not supported"):
        blip2.from_hf(bloom, dict(state))
    state["language_model.lm_head.weight"] = np.zeros((99, 48), np.float32)
    with pytest.raises(engine.ConversionError, match="lm_head.weight differs from model.decoder.embed_tokens"):
        blip2.from_hf(config, state)


@pytest.mark.parametrize("name,opt", [
    ("opt-2.7b", dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240)),
    ("opt-6.7b", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384)),
])
def test_real_size_blip2_opt_tables_by_shape(name, opt):
    """Salesforce/blip2-{name}'s structure: ViT-g/14 (39 layers), the Q-Former with 32 queries, OPT."""
    opt = {**opt, "model_type": "opt", "vocab_size": 50272, "word_embed_proj_dim": opt["hidden_size"]}
    config = transformers.Blip2Config(text_config=opt, image_token_index=50265)
    with torch.device("meta"):
        ref = transformers.Blip2ForConditionalGeneration(config)
    state = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "language_model.lm_head.weight"}
    fused = [k for k in state if k.endswith("qkv.bias")]
    assert len(fused) == 39
    hf_config = {**config.to_dict(), "architectures": ["Blip2ForConditionalGeneration"]}
    plan = blip2.from_hf(hf_config, {k: np.zeros(state[k], np.float32) for k in fused})
    for key in fused:       # split_qkv_bias's rewrite, by shape
        state.pop(key)
        state[key.replace("qkv.bias", "q_bias")] = state[key.replace("qkv.bias", "v_bias")] = (1408,)
    assert plan.fields["lm"] == {**plan.fields["lm"], "width": opt["hidden_size"], "depth": 32}
    fields = {**plan.fields, "vision": {**plan.fields["vision"], "scan": True},
              "lm": {**plan.fields["lm"], "scan": True}}        # traced scanned: fast
    scanned = pretrained.abstract_params(pretrained.build(plan.model_class, fields), plan.inputs)
    expected = table_shapes.unrolled_shapes(scanned)
    assert expected["language_model/decoder/layer_31/mlp/fc1/kernel"] == (opt["hidden_size"], opt["ffn_dim"])
    assert expected["language_projection/kernel"] == (768, opt["hidden_size"])
    assert shape_problems(plan.table, state, expected) == []      # every key placed, every parameter filled
    language = {p: s for p, s in expected.items() if p.startswith("language_model/")}
    assert table_shapes.exported_shapes(language, plan.table) == {k: s for k, s in state.items()
                                                                  if k.startswith("language_model.")}
    key_biases = 39 * 1408          # the k parts of the fused biases: no mmjax parameter
    total = sum(int(np.prod(s)) for s in expected.values())
    assert total == sum(p.numel() for p in ref.parameters()) - key_biases     # parameters(): the tied head once


def test_lavis_blip2_opt_imports_as_transformers_does(converted, tmp_path):
    """A synthetic LAVIS blip2_opt file (see lavis_names), read as `--source lavis` reads it: the
    same model and parameters as the transformers import. Head counts are not in the shapes: the
    tiny ones are given (published checkpoints use ViT-g's 88-wide heads, BERT's, OPT's presets)."""
    tmp, ref, _, variables = converted
    state = lavis_names(ref.state_dict())
    assert "opt_model.lm_head.weight" in state and "visual_encoder.blocks.1.attn.q_bias" in state
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, tmp_path / "lavis.pth")
    with pytest.raises(engine.ConversionError, match="not a multiple of the head width 88"):   # ViT-g's default
        api.plan_import("lavis", str(tmp_path / "lavis.pth"))
    plan = blip2_lavis.from_lavis(state, vision_head_dim=16, qformer_head_dim=16, lm_num_heads=4)
    assert plan.model_class == blip2.LM and plan.fields == pretrained.model_config(str(tmp / "mm"))["fields"]
    flat = engine.flatten(variables["params"])
    params = engine.to_mmjax(state, plan.table, flat)
    for path, value in flat.items():
        np.testing.assert_array_equal(params[path], np.asarray(value), err_msg=path)
    with pytest.raises(engine.ConversionError, match=r"llm_model\.\* keys: InstructBLIP"):
        blip2_lavis.from_lavis({**state, "llm_model.model.embed_tokens.weight": np.zeros(1)})
