"""transformers Blip2ForConditionalGeneration with a Flan-T5 language model <-> mmjax Blip2T5 through
mmjax-convert (small dimensions at the real structure: gated feed-forward with the exact GELU, as
BLIP-2's Flan-T5 configs set dense_act_fn "gelu"; untied head; random weights): the same decoder
logits and loss for right-padded prompts after the queries; the same greedy tokens as transformers'
`generate` for captioning (`</s>` alone) and a prompted question; the export loads into transformers
with strict=True and gives the same logits; a LAVIS blip2_t5 file (key names from LAVIS's
blip2_t5.py, built here from the transformers model) with Flan-T5's transformers folder beside it
imports to the same parameters. The published FlanT5-XL / XXL structures are checked by shapes only."""

import json

import jax
import numpy as np
import pytest
import table_shapes
from blip2_names import lavis_names, shape_problems
from references import require

import mmjax
from mmjax import generate, pretrained
from mmjax.convert import blip2, blip2_lavis, blip2_t5, engine, io
from mmjax.models import blip2_t5 as models

torch = require("torch")
transformers = require("transformers")

VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
              patch_size=8, initializer_range=0.02)
# Larger Q-Former weights than transformers' init (see test_hf_blip2_lm.py): the image shows in the logits.
QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, vocab_size=99,
               max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               initializer_range=0.2)
PAD, EOS, IMAGE = 0, 1, 98          # T5's pad (= decoder start) and </s>; the image placeholder is the last word
T5 = dict(model_type="t5", d_model=48, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, d_ff=64,
          vocab_size=99, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
          decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, dropout_rate=0.0)
Q = 4
PROMPTS = np.array([[5, 6, 7, EOS], [10, 11, EOS, PAD]], np.int32)              # right-padded, T5's </s> last
TARGETS = np.array([[20, 21, 22, 23, EOS], [30, 31, EOS, PAD, PAD]], np.int32)
QUESTIONS = np.array([[40, 41, 42, 43, EOS], [50, 51, EOS, PAD, PAD]], np.int32)
LOGITS_TOL = 1e-5         # measured 3.8e-6 (float32, logits up to ~5)


def _config():
    return transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=T5,
                                    num_query_tokens=Q, image_token_index=IMAGE, initializer_range=0.1)


def _images(n=2):
    return np.random.default_rng(0).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _pixels(images):
    return torch.from_numpy(images.transpose(0, 3, 1, 2))


def _with_placeholders(prompts):
    """transformers' input: Q image placeholders, then the right-padded prompt."""
    ids = np.concatenate([np.full((len(prompts), Q), IMAGE), prompts], 1)
    return torch.from_numpy(ids), torch.from_numpy((ids != PAD).astype(np.int64))


@pytest.fixture(scope="module")
def converted(module_tmp, randomize, convert):
    tmp = module_tmp("blip2_t5")
    torch.manual_seed(3)        # a seed whose random T5 writes no single token over and over
    ref = randomize(transformers.Blip2ForConditionalGeneration(_config()), seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():       # transformers starts the queries at zero and ties the head (Flan-T5 unties it)
        ref.query_tokens.normal_(generator=gen)
        head = ref.language_model.lm_head
        head.weight = torch.nn.Parameter(0.2 * torch.randn(head.weight.shape, generator=gen))
    ref.save_pretrained(str(tmp / "hf"))
    convert("--source", "hf", "--checkpoint", tmp / "hf", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    assert isinstance(model, models.Blip2T5) and model.lm["mlp"] == "geglu_exact" and not model.lm["tie_embeddings"]
    return tmp, ref, model, variables


def _torch_forward(ref, images, prompts, targets):
    ids, attention = _with_placeholders(prompts)
    labels = np.where(targets != PAD, targets, -100).astype(np.int64)
    decoder_ids = np.array(models.shift_right(targets), np.int64)
    with torch.no_grad():
        return ref(pixel_values=_pixels(images), input_ids=ids, attention_mask=attention,
                   decoder_input_ids=torch.from_numpy(decoder_ids),
                   decoder_attention_mask=torch.from_numpy((targets != PAD).astype(np.int64)),
                   labels=torch.from_numpy(labels))


def test_logits_and_loss_match_transformers(converted, diff):
    _, ref, model, variables = converted
    images, mask = _images(), TARGETS != PAD
    want = _torch_forward(ref, images, PROMPTS, TARGETS)
    run = jax.jit(lambda x: model.apply(variables, x, PROMPTS, PROMPTS != PAD, models.shift_right(TARGETS), mask))
    got = run(images)
    assert got["logits"].shape == (2, 5, 99) and got["prompt_embeds"].shape == (2, Q, 48)
    assert got["encoder"].shape == (2, Q + PROMPTS.shape[1], 48)
    real = mask[..., None]          # padded targets compute on but nothing reads them
    err = diff(np.where(real, got["logits"], 0), np.where(real, want.logits.numpy(), 0), "BLIP-2 T5 decoder logits")
    assert err <= LOGITS_TOL
    seen = np.abs(np.asarray(run(images[::-1])["logits"]) - np.asarray(got["logits"]))[mask].max()
    assert seen > 1000 * LOGITS_TOL, "the image reaches the logits"
    loss, metrics = models.t5_lm_loss(got["logits"], TARGETS, mask)
    assert float(metrics["scored_tokens"]) == 5 + 3
    print(f"LM loss: mmjax {float(loss):.7f}, transformers {float(want.loss):.7f}")
    assert abs(float(loss) - float(want.loss)) <= 1e-5


def test_greedy_tokens_match_transformers_generate(converted):
    """One right-padded batch: each image captioned (`</s>` alone, as an empty text tokenizes) and
    asked a prompt."""
    _, ref, model, variables = converted
    captions = np.full((2, QUESTIONS.shape[1]), PAD, np.int32)
    captions[:, 0] = EOS
    prompts, images = np.concatenate([captions, QUESTIONS]), np.concatenate([_images(), _images()])
    ids, attention = _with_placeholders(prompts)
    with torch.no_grad():
        want = ref.generate(pixel_values=_pixels(images), input_ids=ids, attention_mask=attention,
                            max_new_tokens=6, do_sample=False, num_beams=1).numpy()
    assert (want[:, 0] == PAD).all()            # the decoder start token
    want = want[:, 1:]
    config = generate.GenerationConfig(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    got = models.generate_text(model, variables, images, prompts, config, prompt_mask=prompts != PAD)
    got = np.asarray(got.generated)[:, :want.shape[1]]
    print(f"\ncaptions: {got[:2].tolist()}, answers: {got[2:].tolist()}")
    np.testing.assert_array_equal(got, want)
    assert len({tuple(row) for row in got.tolist()}) == 4       # images and prompts lead elsewhere


def test_export_loads_strictly_and_gives_the_same_logits(converted, convert, reimport_equals):
    tmp, ref, _, variables = converted
    convert("--to", "hf", "--input", tmp / "mm", "--output", tmp / "back")
    with open(tmp / "back" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["Blip2ForConditionalGeneration"] and config["image_token_index"] == IMAGE
    assert config["text_config"]["dense_act_fn"] == "gelu" and config["text_config"]["model_type"] == "t5"
    written = io.read_state_dict(str(tmp / "back" / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    copies = {"language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight"}
    assert set(original) - set(written) == copies and set(written) <= set(original)
    loaded, info = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tmp / "back"),
                                                                             output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images = _images()
    want, got = (_torch_forward(m.eval(), images, PROMPTS, TARGETS).logits.numpy() for m in (ref, loaded))
    for key, value in original.items():
        if key.endswith("qkv.bias"):            # the key part is written as zero: softmax cancels it
            q, _, v = np.split(value, 3)
            value = np.concatenate([q, np.zeros_like(q), v])
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value, err_msg=key)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)    # measured 1.8e-6: the zero key bias rounds
    reimport_equals("hf", tmp / "back", variables)


def _lavis_t5_names(hf_state: dict) -> dict:
    """LAVIS blip2_t5's names (blip2_t5.py: `t5_proj`, `t5_model` = transformers' T5ForConditionalGeneration
    names): blip2_opt's, with its opt_ prefixes spelled t5_."""
    renamed = {}
    for key, value in lavis_names(hf_state).items():
        for old, new in (("opt_proj.", "t5_proj."), ("opt_model.", "t5_model.")):
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
    return renamed


def test_lavis_blip2_t5_imports_as_transformers_does(converted, tmp_path):
    """LAVIS's released files keep the trained parameters only: the Flan-T5 comes from its transformers
    folder, merged under t5_model. (its config.json read). Sizes from the shapes alone give the same model."""
    tmp, ref, _, variables = converted
    state = _lavis_t5_names(ref.state_dict())
    assert "t5_proj.weight" in state and "t5_model.encoder.embed_tokens.weight" in state
    released = {k: v for k, v in state.items() if not k.startswith("t5_model.")}
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in released.items()}}, tmp_path / "lavis.pth")
    ref.language_model.save_pretrained(str(tmp_path / "flan_t5"))
    merged, _, lm_config = blip2_lavis.assemble([str(tmp_path / "lavis.pth"), str(tmp_path / "flan_t5")],
                                                blip2_lavis.lm_prefix)
    assert lm_config["model_type"] == "t5" and "t5_model.shared.weight" in merged
    fields = pretrained.model_config(str(tmp / "mm"))["fields"]
    flat = engine.flatten(variables["params"])
    for given, config in ((merged, lm_config), (state, None)):
        plan = blip2_lavis.from_lavis(given, vision_head_dim=16, qformer_head_dim=16, lm_config=config)
        assert plan.model_class == blip2_t5.T5_CLASS and plan.fields == fields
        params = engine.to_mmjax(given, plan.table, flat)
        for path, value in flat.items():
            np.testing.assert_array_equal(params[path], np.asarray(value), err_msg=path)
    with pytest.raises(engine.ConversionError, match="has no t5_model.shared.weight"):
        blip2_lavis.from_lavis(released, vision_head_dim=16, qformer_head_dim=16)


def test_plain_t5_text_configs_keep_the_tanh_gate():
    """A Flan-T5 config without dense_act_fn (gelu_new) keeps the tanh gate; the export says which."""
    assert blip2_t5.t5.fields_from_hf({"feed_forward_proj": "gated-gelu"})["mlp"] == "geglu"
    assert blip2_t5.t5.hf_config({"variant": "flan-t5-base", "mlp": "geglu_exact"})["dense_act_fn"] == "gelu"
    with pytest.raises(engine.ConversionError, match="dense_act_fn 'silu'"):
        blip2_t5.t5.fields_from_hf({"feed_forward_proj": "gated-gelu", "dense_act_fn": "silu"})


# transformers config fields of BLIP-2's language models (Salesforce/blip2-flan-t5-xl / -xxl text_config)
REAL = {
    "flan-t5-xl": dict(d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120, vocab_size=32128),
    "flan-t5-xxl": dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=32128),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_blip2_flan_t5_tables_by_shape(name):
    """Salesforce/blip2-{name}'s structure: ViT-g/14 (39 layers), the Q-Former with 32 queries, Flan-T5."""
    text = {**REAL[name], "model_type": "t5", "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu",
            "tie_word_embeddings": False}
    config = transformers.Blip2Config(text_config=text, image_token_index=32100)
    with torch.device("meta"):
        ref = transformers.Blip2ForConditionalGeneration(config)
    copies = {"language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight"}
    state = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k not in copies}   # as the published files
    fused = [k for k in state if k.endswith("qkv.bias")]
    hf_config = {**config.to_dict(), "architectures": ["Blip2ForConditionalGeneration"]}
    plan = blip2.from_hf(hf_config, {k: np.zeros(state[k], np.float32) for k in fused})
    for key in fused:       # split_qkv_bias's rewrite, by shape
        state.pop(key)
        state[key.replace("qkv.bias", "q_bias")] = state[key.replace("qkv.bias", "v_bias")] = (1408,)
    assert plan.model_class == blip2_t5.T5_CLASS and plan.fields["lm"]["mlp"] == "geglu_exact"
    fields = {**plan.fields, "vision": {**plan.fields["vision"], "scan": True},
              "lm": {**plan.fields["lm"], "scan": True}}       # traced scanned: fast
    scanned = pretrained.abstract_params(pretrained.build(plan.model_class, fields), plan.inputs)
    expected = table_shapes.unrolled_shapes(scanned)
    assert expected["language_projection/kernel"] == (768, REAL[name]["d_model"])
    assert expected["language_model/decoder/layer_23/mlp/gate/kernel"] == (REAL[name]["d_model"], REAL[name]["d_ff"])
    assert shape_problems(plan.table, state, expected) == []      # every key placed, every parameter filled
    language = {p: s for p, s in expected.items() if p.startswith("language_model/")}
    assert table_shapes.exported_shapes(language, plan.table) == {k: s for k, s in state.items()
                                                                  if k.startswith("language_model.")}
    preset = models.t5.T5(variant=name)
    assert preset.arch() == models.t5.T5(**plan.fields["lm"]).arch()
