"""transformers BLIP-2 <-> mmjax through mmjax-convert (small dimensions at the real structure,
random weights): Blip2ForImageTextRetrieval (ITM logits with a padding mask, ITC scores),
Blip2VisionModel and Blip2QFormerModel (query-only and query + text) give transformers' outputs
after import; exports load into transformers with strict=True and give its outputs; Blip2Model's
Q-Former features and language projection through `bridge_plan`; a LAVIS stage-1 state dict imports
as the transformers model does; the real-size ViT-g and Q-Former tables checked with shapes only
(torch meta tensors against jax.eval_shape); bad checkpoints and image sizes get errors that name
the problem."""

import jax
import numpy as np
import pytest
import torch
from blip2_names import lavis_names, shape_problems
from references import require

import mmjax
from mmjax import pretrained
from mmjax.convert import api, blip2, blip2_lavis, engine, io
from mmjax.models import blip2 as blip2_models

transformers = require("transformers")

VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
              patch_size=8, initializer_range=0.02)     # Blip2VisionConfig's default 1e-10 leaves the image unseen
QFORMER = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=80, vocab_size=99,
               max_position_embeddings=20, use_qformer_text_input=True, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
OPT = dict(model_type="opt", hidden_size=48, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64, vocab_size=99,
           word_embed_proj_dim=48)
NUM_QUERIES = 8
VALID = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)     # the second text is padded


def _config(**extra):
    return transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, num_query_tokens=NUM_QUERIES,
                                    image_text_hidden_size=32, **extra)


def _random_queries(model, seed):
    """Random queries (transformers starts them at zero) and a 25x ITM head, whose init (std 0.02)
    leaves logits near its bias, so that every input shows in them."""
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=torch.Generator().manual_seed(seed)))
        if hasattr(model, "itm_head"):
            model.itm_head.weight.mul_(25.0)
    return model


def _inputs():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
            rng.integers(1, QFORMER["vocab_size"], (2, 6)).astype(np.int32))


def _retrieval_scores(model, images, tokens) -> dict:
    kwargs = dict(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                  input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(VALID).long())
    with torch.no_grad():
        itm = model(**kwargs, use_image_text_matching_head=True).logits_per_image.numpy()
        itc = model(**kwargs, use_image_text_matching_head=False).logits_per_image.numpy()
    return {"itm": itm, "itc": itc}


def _mmjax_scores(model, variables, images, tokens) -> dict:
    out = jax.jit(model.apply)(variables, images, tokens, VALID)
    return {"itm": out["itm_logits"], "itc": blip2_models.itc_scores(out["image_embeds"], out["text_embeds"])}


@pytest.fixture(scope="module")
def retrieval(module_tmp, randomize, convert):
    """A random Blip2ForImageTextRetrieval (k parts of the fused qkv biases non-zero too), converted."""
    tmp = module_tmp("blip2")
    torch.manual_seed(0)
    ref = _random_queries(randomize(transformers.Blip2ForImageTextRetrieval(_config()), seed=5), seed=6)
    images, tokens = _inputs()
    ref.save_pretrained(str(tmp / "hf"))
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"tmp": tmp, "ref": ref, "model": model, "variables": variables,
            "want": _retrieval_scores(ref, images, tokens), "got": _mmjax_scores(model, variables, images, tokens)}


def test_retrieval_itm_and_itc_match_transformers(retrieval, diff):
    got, want = retrieval["got"], retrieval["want"]
    assert got["itm"].shape == (2, 2) and got["itc"].shape == (2, 2)
    assert diff(got["itm"], want["itm"], "Blip2ForImageTextRetrieval ITM logits") <= 1e-5
    # cosine similarities are small: a mis-mapped projection still shows at the 1e-2 level
    assert float(np.abs(want["itc"]).max()) > 0.05
    d = float(np.abs(np.asarray(got["itc"]) - want["itc"]).max())
    print(f"Blip2ForImageTextRetrieval ITC scores: max abs diff {d:.3g}")
    assert d <= 1e-5


def test_retrieval_export_loads_strictly_and_matches(retrieval, convert, reimport_equals):
    tmp, ref = retrieval["tmp"], retrieval["ref"]
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "back")
    written = io.read_state_dict(str(tmp / "back" / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(written) == set(original)
    for key, value in original.items():
        if key.endswith("qkv.bias"):     # the key part is written as zero: softmax cancels it
            q, k, v = np.split(value, 3)
            value = np.concatenate([q, np.zeros_like(k), v])
            assert np.any(k), key
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    loaded = transformers.Blip2ForImageTextRetrieval(_config())
    loaded.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
    again = _retrieval_scores(loaded.eval(), *_inputs())
    for key in ("itm", "itc"):
        np.testing.assert_allclose(again[key], retrieval["want"][key], atol=2e-6, err_msg=key)
    reimport_equals("hf", tmp / "back", retrieval["variables"])


def test_vision_model_matches_and_round_trips(retrieval, convert, diff, reimport_equals):
    tmp, ref = retrieval["tmp"], retrieval["ref"].vision_model
    ref.save_pretrained(str(tmp / "vision_hf"))
    convert("--source", "hf", "--checkpoint", tmp / "vision_hf", "--output", tmp / "vision_mm")
    model, variables = mmjax.load(str(tmp / "vision_mm"))
    assert isinstance(model, blip2_models.Blip2Vision) and not model.block_config().k_bias
    images, _ = _inputs()
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    got = model.apply(variables, images)["tokens"]
    assert diff(got, want, "Blip2VisionModel last_hidden_state") <= 1e-5
    convert("--to", "hf", "--input", tmp / "vision_mm", "--output", tmp / "vision_back")
    loaded, info = transformers.Blip2VisionModel.from_pretrained(str(tmp / "vision_back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        again = loaded.eval()(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    np.testing.assert_allclose(again, want, atol=2e-6)
    reimport_equals("hf", tmp / "vision_back", variables)


def _qformer_outputs(ref, model, variables, embeds, mask, context, num_queries):
    with torch.no_grad():
        want = ref(query_embeds=torch.from_numpy(embeds), query_length=num_queries,
                   attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                   encoder_hidden_states=torch.from_numpy(context)).last_hidden_state.numpy()
    got = model.apply(variables, embeds, mask, context, num_queries=num_queries)
    return got["tokens"], want


def test_qformer_model_matches_and_round_trips(retrieval, convert, diff, reimport_equals):
    tmp, ref = retrieval["tmp"], retrieval["ref"].qformer
    ref.save_pretrained(str(tmp / "qformer_hf"))
    convert("--source", "hf", "--checkpoint", tmp / "qformer_hf", "--output", tmp / "qformer_mm")
    model, variables = mmjax.load(str(tmp / "qformer_mm"))
    assert model.text_ffn and [model.has_cross_attention(i) for i in range(4)] == [True, False, True, False]
    rng = np.random.default_rng(1)
    context = rng.normal(size=(2, 17, VISION["hidden_size"])).astype(np.float32)
    queries = rng.normal(size=(2, 8, 64)).astype(np.float32)
    text = rng.normal(size=(2, 6, 64)).astype(np.float32)
    got, want = _qformer_outputs(ref, model, variables, queries, None, context, 8)
    assert diff(got, want, "Blip2QFormerModel, queries only") <= 1e-5
    mask = np.concatenate([np.ones((2, 8), bool), VALID], axis=1)
    got, want = _qformer_outputs(ref, model, variables, np.concatenate([queries, text], 1), mask, context, 8)
    # padded positions compute on (transformers too) but nothing reads them: compare the real ones
    real = mask[..., None]
    assert diff(np.where(real, got, 0), np.where(real, want, 0), "Blip2QFormerModel, queries + padded text") <= 1e-5
    convert("--to", "hf", "--input", tmp / "qformer_mm", "--output", tmp / "qformer_back")
    loaded, info = transformers.Blip2QFormerModel.from_pretrained(str(tmp / "qformer_back"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    reimport_equals("hf", tmp / "qformer_back", variables)


def test_blip2_model_features_through_bridge_plan(tmp_path, randomize, diff):
    """Blip2Model.get_qformer_features and its language_projection through bridge_plan, which leaves
    the language model out (test_hf_blip2_lm.py converts the whole model)."""
    torch.manual_seed(1)
    config = transformers.Blip2Config(vision_config=VISION, qformer_config={**QFORMER, "use_qformer_text_input": False},
                                      text_config=OPT, num_query_tokens=NUM_QUERIES)
    ref = _random_queries(randomize(transformers.Blip2Model(config), seed=7), seed=8)
    ref.save_pretrained(str(tmp_path / "hf"))
    hf_config, state = io.read_hf_folder(str(tmp_path / "hf"))
    plan = blip2.bridge_plan(hf_config, state)
    assert any("language_model" in note for note in plan.notes)
    model = pretrained.build(plan.model_class, plan.fields)
    params = engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs))
    images, _ = _inputs()
    with torch.no_grad():
        features = ref.get_qformer_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
        prompt = ref.language_projection(features).numpy()
    got = model.apply({"params": engine.unflatten(params)}, images)
    assert diff(got["tokens"], features.numpy(), "Blip2Model.get_qformer_features") <= 1e-5
    assert diff(got["prompt_embeds"], prompt, "Blip2Model language_projection(Q-Former features)") <= 1e-5


def test_real_size_vit_g_and_qformer_tables_by_shape():
    """Salesforce/blip2-itm-vit-g's structure: ViT-g/14 (1408 wide, 39 layers) and the BERT-base
    Q-Former with 32 queries, cross-attention every 2nd layer and the text feed-forward."""
    config = transformers.Blip2Config(qformer_config=dict(use_qformer_text_input=True))
    with torch.device("meta"):
        ref = transformers.Blip2ForImageTextRetrieval(config)
    hf_config = config.to_dict()
    hf_config["architectures"] = ["Blip2ForImageTextRetrieval"]
    torch_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    fused = {k: (3 * 1408,) for k in torch_shapes if k.endswith("qkv.bias")}
    assert len(fused) == 39
    plan = blip2.from_hf(hf_config, {k: np.zeros(s, np.float32) for k, s in fused.items()})
    assert plan.fields["vision"]["depth"] == 39 and plan.fields["qformer_fields"]["num_queries"] == 32
    split = {k.replace("qkv.bias", b): (1408,) for k in fused for b in ("q_bias", "v_bias")}
    torch_shapes = {**{k: s for k, s in torch_shapes.items() if k not in fused}, **split}
    expected = pretrained.abstract_params(pretrained.build(plan.model_class, plan.fields), plan.inputs)
    assert expected["vision_model/encoder/layer_38/mlp/fc1/kernel"].shape == (1408, 6144)
    assert expected["qformer/layer_10/cross_attn/key/kernel"].shape == (1408, 12, 64)
    assert "qformer/layer_11/cross_attn/key/kernel" not in expected
    assert shape_problems(plan.table, torch_shapes, expected) == []
    key_biases = 39 * 1408          # the k parts of the fused biases: no mmjax parameter
    assert sum(np.prod(s.shape) for s in expected.values()) == sum(p.numel() for p in ref.parameters()) - key_biases


def test_wrong_image_size_is_named(retrieval):
    _, tokens = _inputs()
    big = np.zeros((1, 48, 48, 3), np.float32)
    with pytest.raises(ValueError, match="Position embedding has 17 positions but the input has 37 tokens"):
        retrieval["model"].apply(retrieval["variables"], big, tokens[:1], VALID[:1])


def test_bad_checkpoint_lists_every_problem(retrieval, tmp_path):
    config, state = io.read_hf_folder(str(retrieval["tmp"] / "hf"))
    del state["qformer.encoder.layer.2.crossattention.attention.key.weight"]
    state["qformer.encoder.layer.1.crossattention.attention.key.weight"] = np.zeros((64, 64), np.float32)
    state["vision_model.encoder.layers.0.self_attn.qkv.bias"] = np.zeros(3 * 32, np.float32)
    io.write_hf_folder(str(tmp_path / "bad"), config, state)
    with pytest.raises(engine.ConversionError) as info:
        api.import_checkpoint("hf", str(tmp_path / "bad"), str(tmp_path / "mm"))
    message = str(info.value)
    assert "1 unexpected keys" in message and "layer.1.crossattention.attention.key.weight" in message
    assert "missing model parameters" in message and "qformer/layer_2/cross_attn/key/kernel (64, 4, 16)" in message
    assert "vision_model.encoder.layers.0.self_attn.q_bias: checkpoint has (32,), the model needs (64,)" in message


def test_lavis_stage1_checkpoint_imports_as_transformers_does(retrieval):
    """A synthetic LAVIS `blip2` / `blip2_feature_extractor` state dict (blip2_names.lavis_names, plus
    the ITG head and temperature LAVIS keeps): the same Blip2Retrieval and parameters as the
    transformers import; the two extras are dropped with a note."""
    ref, variables = retrieval["ref"], retrieval["variables"]
    state = lavis_names(ref.state_dict())
    state.update({"temp": np.float32(0.07), "Qformer.cls.predictions.bias": np.zeros(99, np.float32),
                  "Qformer.cls.predictions.decoder.weight": state["Qformer.bert.embeddings.word_embeddings.weight"]})
    assert "vision_proj.weight" in state and "Qformer.bert.encoder.layer.0.intermediate.dense.weight" in state
    plan = blip2_lavis.from_lavis(state, vision_head_dim=16, qformer_head_dim=16)
    assert plan.model_class == blip2.RETRIEVAL and plan.fields == pretrained.model_config(
        str(retrieval["tmp"] / "mm"))["fields"]
    assert any("Qformer.cls.predictions.bias" in n and "temp" in n for n in plan.notes)
    flat = engine.flatten(variables["params"])
    params = engine.to_mmjax(state, plan.table, flat)
    for path, value in flat.items():
        np.testing.assert_array_equal(params[path], np.asarray(value), err_msg=path)
