"""transformers T5ForConditionalGeneration <-> mmjax T5 through mmjax-convert, at Flan-T5's structure
(gated-GELU, untied head, relative position buckets) with small dimensions and random weights: the
same logits for a padded encoder batch and for encoder inputs_embeds (BLIP-2's path), the same
greedy and beam tokens through mmjax.generate as transformers' `generate`; the export loads into
transformers and gives the same logits. T5 v1.0's tied, scaled head with a ReLU feed-forward by
logits. FlanT5-XL / XXL checked by shapes only (the meta device against jax.eval_shape)."""

import json

import jax
import numpy as np
import pytest
import table_shapes
from references import require

import mmjax
from mmjax import generate, pretrained, sharding
from mmjax.convert import engine, io
from mmjax.convert import t5 as t5_convert
from mmjax.models.t5 import T5, relative_position_buckets

torch = require("torch")
transformers = require("transformers")

SMALL = dict(d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, d_ff=128, vocab_size=256,
             relative_attention_num_buckets=32, relative_attention_max_distance=128, decoder_start_token_id=0,
             pad_token_id=0, eos_token_id=1)
ARCH = "T5ForConditionalGeneration"
INPUT = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [10, 11, 12, 13, 14, 15, 16, 1], [20, 31, 40, 1, 0, 0, 0, 0]])
MASK = INPUT != 0
DECODER = np.array([[0, 3, 4, 5, 6], [0, 7, 8, 9, 10], [0, 11, 12, 13, 14]])
LOGITS_TOL = 1e-5        # measured <= 3e-6 (float32, logits up to ~6)


def _reference(seed: int = 0, **changes):
    """Flan-T5's structure. transformers 5 ties the head in a model built from a config whatever
    tie_word_embeddings says (it only drops the output scaling): untie it by hand, as a Flan-T5
    checkpoint loads."""
    flan = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    config = transformers.T5Config(**SMALL, **{**flan, **changes}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if not config.scale_decoder_outputs:
            model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(model.lm_head.weight.shape, generator=gen))
        for p in model.parameters():       # 1-D parameters away from their 1 init
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def converted(module_tmp, convert):
    ref = _reference()
    folder = module_tmp("t5")
    ref.save_pretrained(str(folder / "hf"))
    convert("--source", "hf", "--checkpoint", folder / "hf", "--output", folder / "mm")
    model, variables = mmjax.load(str(folder / "mm"))
    assert isinstance(model, T5) and not model.tie_embeddings and model.mlp == "geglu"
    return ref, model, variables["params"], folder


def _torch_logits(ref, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return ref(**{k: torch.from_numpy(v) for k, v in kwargs.items()}).logits.numpy()


def test_bucket_function_matches_transformers():
    relative = np.arange(-3000, 3000)
    for bidirectional in (True, False):
        want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128).numpy()
        np.testing.assert_array_equal(np.asarray(relative_position_buckets(relative, bidirectional, 32, 128)), want)


def test_logits_match_transformers(converted, diff):
    ref, model, params, _ = converted
    embeds = np.random.default_rng(1).normal(size=(3, 8, 64)).astype(np.float32)
    both = jax.jit(lambda v: (model.apply(v, INPUT, DECODER, MASK)["logits"],
                              model.apply(v, None, DECODER, MASK, inputs_embeds=embeds)["logits"]))
    from_tokens, from_embeds = both({"params": params})
    mask = MASK.astype(np.int64)
    want = _torch_logits(ref, input_ids=INPUT, attention_mask=mask, decoder_input_ids=DECODER)
    assert diff(from_tokens, want, "flan-t5 padded encoder batch") <= LOGITS_TOL
    want = _torch_logits(ref, inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=DECODER)
    assert diff(from_embeds, want, "flan-t5 encoder inputs_embeds") <= LOGITS_TOL


def test_t5_v1_tied_relu_logits_match_transformers(diff):
    """T5 v1.0: ReLU feed-forward (wi / wo), the head tied to the embeddings after d_model**-0.5."""
    ref = _reference(seed=3, feed_forward_proj="relu", tie_word_embeddings=True)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    plan = t5_convert.from_hf({**json.loads(ref.config.to_json_string()), "architectures": [ARCH]}, state)
    model = pretrained.build(plan.model_class, plan.fields)
    assert model.tie_embeddings and model.mlp == "relu"
    params = engine.unflatten(engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs)))
    got = jax.jit(model.apply)({"params": params}, INPUT, DECODER, MASK)["logits"]
    want = _torch_logits(ref, input_ids=INPUT, attention_mask=MASK.astype(np.int64), decoder_input_ids=DECODER)
    assert diff(got, want, "t5 v1.0 tied head") <= LOGITS_TOL
    written = engine.to_torch(engine.flatten(params), plan.table)
    assert set(state) - set(written) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.parametrize("settings", [dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3, length_penalty=1.5)])
def test_generated_tokens_match_transformers(converted, settings):
    """Encoder states as the decoder's cross-attention context (projected once, at prefill), the
    decoder start token (0) as the prompt: transformers' generate picks the same tokens."""
    ref, model, params, _ = converted
    settings = dict(settings, eos_token_id=1)
    with torch.no_grad():
        want = ref.generate(torch.from_numpy(INPUT), attention_mask=torch.from_numpy(MASK.astype(np.int64)),
                            do_sample=False, return_dict_in_generate=True, output_scores=True, **settings)
    context = jax.jit(lambda p: model.apply({"params": p}, INPUT, MASK, method="encode")["tokens"])(params)
    start = np.zeros((3, 1), np.int32)
    generator = generate.Generator(generate.FlaxDecoder(model, method="decode"), 1 + settings["max_new_tokens"])
    got = generator(params, start, generate.GenerationConfig(**settings, pad_token_id=0),
                    inputs={"context": context, "context_mask": MASK})
    want_tokens = want.sequences[:, 1:].numpy()
    got_tokens = np.asarray(got.generated)[:, :want_tokens.shape[1]]
    print(f"\nflan-t5 {settings}: {got_tokens.tolist()}")
    np.testing.assert_array_equal(got_tokens, want_tokens)
    assert len({tuple(r) for r in got_tokens.tolist()}) == len(got_tokens)      # the inputs lead apart
    if settings.get("num_beams", 1) > 1:
        assert np.abs(np.asarray(got.scores) - want.sequences_scores.numpy()).max() < 1e-4


def test_export_loads_into_transformers_and_round_trips(converted, convert, reimport_equals):
    ref, model, params, folder = converted
    convert("--to", "hf", "--input", folder / "mm", "--output", folder / "back")
    with open(folder / "back" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == [ARCH] and config["tie_word_embeddings"] is False
    written = io.read_state_dict(str(folder / "back" / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(original) - set(written) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    for key, value in written.items():
        np.testing.assert_allclose(value, original[key], rtol=1e-6, atol=0, err_msg=key)
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(str(folder / "back"),
                                                                     attn_implementation="eager").eval()
    kwargs = dict(input_ids=INPUT, attention_mask=MASK.astype(np.int64), decoder_input_ids=DECODER)
    np.testing.assert_allclose(_torch_logits(loaded, **kwargs), _torch_logits(ref, **kwargs), rtol=0, atol=1e-6)
    reimport_equals("hf", folder / "back", {"params": params})


# transformers config fields of BLIP-2's language models (google/flan-t5-xl, google/flan-t5-xxl)
REAL = {
    "flan-t5-xl": dict(d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120, vocab_size=32128),
    "flan-t5-xxl": dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=32128),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_tables_by_shape(name):
    config = transformers.T5Config(**REAL[name], feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        ref = transformers.T5ForConditionalGeneration(config)
    # a Flan-T5 file: shared.weight and lm_head.weight, no embed_tokens copies
    state = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k not in t5_convert.COPIES}
    hf = {**json.loads(config.to_json_string()), "architectures": [ARCH], "tie_word_embeddings": False}
    hf.pop("scale_decoder_outputs")         # as the published (transformers 4) config.json
    plan = t5_convert.from_hf(hf, {})
    scanned = pretrained.build(plan.model_class, {**plan.fields, "scan": True})
    expected = table_shapes.unrolled_shapes(pretrained.abstract_params(scanned, plan.inputs))
    assert sorted(table_shapes.imported_paths(state, plan.table, expected)) == sorted(expected)
    assert table_shapes.exported_shapes(expected, plan.table) == state
    preset = T5(variant=name)
    assert {**preset.arch(), "tie": preset.tie_embeddings} == {**T5(**plan.fields).arch(), "tie": False}


def test_flan_t5_xxl_parameters_split_over_fsdp_and_tensor():
    """FlanT5-XXL's parameters under fsdp_tp on the 8 simulated devices (data 2 x fsdp 2 x tensor 2),
    from the logical names alone (shapes only): vocab, heads and MLP over tensor, width over fsdp."""
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)], jax.devices())
    model = T5(variant="flan-t5-xxl", scan=True)
    inputs = [pretrained.input_spec((1, 8), "int32"), pretrained.input_spec((1, 4), "int32")]
    shardings = pretrained.param_shardings(model, inputs, mesh, "fsdp_tp")
    specs = {p: tuple(s.spec) for p, s in shardings.items()}
    assert specs["shared/embedding"] == ("tensor", "fsdp") and specs["lm_head/kernel"] == ("fsdp", "tensor")
    assert specs["decoder/layers/cross_attn/query/kernel"] == (None, "fsdp", "tensor", None)
    assert specs["encoder/layers/mlp/gate/kernel"] == (None, "fsdp", "tensor")
    shapes = pretrained.abstract_params(model, inputs)
    total = sum(np.prod(s.shape) for s in shapes.values())
    per_device = sum(np.prod(shardings[p].shard_shape(s.shape)) for p, s in shapes.items())
    assert 11.1e9 < total < 11.2e9 and per_device / total < 0.2501


@pytest.mark.parametrize("change,match", [(dict(feed_forward_proj="gated-silu"), "feed_forward_proj 'gated-silu'"),
                                          (dict(architectures=["T5EncoderModel"]), "Not a T5 architecture")])
def test_unsupported_configs_are_refused(change, match):
    with pytest.raises(engine.ConversionError, match=match):
        t5_convert.from_hf({**SMALL, "architectures": [ARCH], **change}, {})


def test_differing_embedding_copy_is_refused():
    state = {"shared.weight": np.zeros((4, 2), np.float32), "decoder.embed_tokens.weight": np.ones((4, 2), np.float32)}
    with pytest.raises(engine.ConversionError, match="decoder.embed_tokens.weight differs"):
        t5_convert.from_hf({**SMALL, "architectures": [ARCH]}, state)
