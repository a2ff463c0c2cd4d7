"""transformers LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM <-> mmjax DecoderLM through
mmjax-convert, at the real structure with small dimensions and random weights: the same logits
for a left-padded batch and for inputs_embeds, the same greedy tokens (and, for LLaMA, beam-search
tokens) through mmjax.generate as transformers' `generate`; the export loads into transformers
with strict=True and gives the same logits. The published shapes (Vicuna-7B/13B = LLaMA-2-7B's,
OPT-2.7B/6.7B, Qwen-7B as Qwen2) are checked by shapes only: transformers on the meta device
against jax.eval_shape, every key both ways."""

import json

import jax
import numpy as np
import pytest
import table_shapes
from references import require

import mmjax
from mmjax import generate, param_paths, pretrained, sharding
from mmjax.convert import decoder_lm, engine, io
from mmjax.models.decoder_lm import DecoderLM, prefix_decoder

torch = require("torch")
transformers = require("transformers")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
ROTARY = dict(num_key_value_heads=2, intermediate_size=96, initializer_range=0.1)
CASES = {   # kind: (transformers class, its config): GQA, linear RoPE scaling, a tied Qwen2 head (as Qwen2-0.5B),
    # OPT with project_in / project_out (word_embed_proj_dim < hidden_size)
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(**ROTARY, rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=5e5))),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(**ROTARY, rope_theta=1e6, tie_word_embeddings=True)),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(ffn_dim=96, word_embed_proj_dim=32, init_std=0.1)),
}
PROMPT = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 20, 31, 40]])
MASK = PROMPT != 0
LOGITS_TOL = 5e-6        # measured <= 1.9e-6 (float32, logits up to ~3.5)


def _reference(kind: str, seed: int = 0):
    cls, config_cls, extra = CASES[kind]
    config = getattr(transformers, config_cls)(**SMALL, **extra, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():        # 1-D parameters away from their 0 / 1 init
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, module_tmp, convert):
    kind = request.param
    ref = _reference(kind)
    folder = module_tmp(kind)
    ref.save_pretrained(str(folder / "hf"))
    convert("--source", "hf", "--checkpoint", folder / "hf", "--output", folder / "mm")
    model, variables = mmjax.load(str(folder / "mm"))
    assert isinstance(model, DecoderLM) and model.arch()["kind"] == kind
    return kind, ref, model, variables["params"], folder


def _torch_logits(ref, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return ref(**{k: torch.from_numpy(v) for k, v in kwargs.items()}).logits.numpy()


def test_logits_match_transformers(converted, diff):
    kind, ref, model, params, _ = converted
    embeds = np.random.default_rng(1).normal(size=(3, 6, model.arch()["embed_dim"])).astype(np.float32)
    both = jax.jit(lambda v: (model.apply(v, PROMPT, MASK)["logits"],                  # one compilation
                              model.apply(v, None, MASK, inputs_embeds=embeds)["logits"]))
    from_tokens, from_embeds = both({"params": params})
    want = _torch_logits(ref, input_ids=PROMPT, attention_mask=MASK.astype(np.int64))
    assert diff(np.asarray(from_tokens)[MASK], want[MASK], f"{kind} padded batch") <= LOGITS_TOL
    want = _torch_logits(ref, inputs_embeds=embeds, attention_mask=MASK.astype(np.int64))
    assert diff(np.asarray(from_embeds)[MASK], want[MASK], f"{kind} inputs_embeds") <= LOGITS_TOL


def test_post_ln_opt_logits_match_transformers(diff):
    """OPT-350m's structure: LayerNorm after each residual, no final LayerNorm, project_in/out."""
    cls, config_cls, extra = CASES["opt"]
    config = transformers.OPTConfig(**SMALL, **extra, do_layer_norm_before=False, attn_implementation="eager")
    torch.manual_seed(2)
    ref = transformers.OPTForCausalLM(config)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    state = {k: v.numpy() for k, v in ref.eval().state_dict().items()}
    plan = decoder_lm.from_hf({**json.loads(config.to_json_string()), "architectures": [cls]}, state)
    model = pretrained.build(plan.model_class, plan.fields)
    assert model.norm == "post"
    params = engine.unflatten(engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs)))
    got = jax.jit(model.apply)({"params": params}, PROMPT, MASK)["logits"]
    want = _torch_logits(ref, input_ids=PROMPT, attention_mask=MASK.astype(np.int64))
    assert diff(np.asarray(got)[MASK], want[MASK], "post-LN opt") <= LOGITS_TOL


def _generate_both(converted, **settings):
    """(mmjax tokens, transformers output) of one generate call on the left-padded prompts."""
    kind, ref, model, params, _ = converted
    settings = dict(settings, eos_token_id=2)
    with torch.no_grad():
        want = ref.generate(torch.from_numpy(PROMPT), attention_mask=torch.from_numpy(MASK.astype(np.int64)),
                            do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
                            **settings)
    generator = generate.Generator(generate.FlaxDecoder(model), PROMPT.shape[1] + settings["max_new_tokens"])
    got = generator(params, PROMPT, generate.GenerationConfig(**settings, pad_token_id=0), prompt_mask=MASK)
    want_tokens = want.sequences[:, PROMPT.shape[1]:].numpy()
    got_tokens = np.asarray(got.generated)[:, :want_tokens.shape[1]]
    print(f"\n{kind} {settings}: {got_tokens.tolist()}")
    np.testing.assert_array_equal(got_tokens, want_tokens)
    assert len({tuple(r) for r in got_tokens.tolist()}) == len(got_tokens)      # the prompts lead apart
    return got, want


def test_greedy_tokens_match_transformers(converted):
    _generate_both(converted, max_new_tokens=8)


@pytest.mark.parametrize("converted", ["llama"], indirect=True)
def test_beam_search_tokens_match_transformers(converted):
    got, want = _generate_both(converted, max_new_tokens=6, num_beams=3, length_penalty=1.5)
    assert np.abs(np.asarray(got.scores) - want.sequences_scores.numpy()).max() < 1e-4


@pytest.mark.parametrize("converted,settings", [
    ("llama", dict(max_new_tokens=8)), ("llama", dict(max_new_tokens=5, num_beams=3, length_penalty=1.5)),
    ("opt", dict(max_new_tokens=8))], indirect=["converted"])
def test_soft_prompt_generation_matches_transformers(converted, settings):
    """A soft prompt (BLIP-2's projected queries) then the left-padded token prompt: the same tokens
    as transformers' generate(inputs_embeds=cat(prefix, embed(prompt)), attention_mask=cat(...)).
    One prefix slot is masked out, so masking and positions count only real slots."""
    kind, ref, model, params, _ = converted
    rng = np.random.default_rng(7)
    prefix = rng.normal(size=(3, 4, model.arch()["embed_dim"])).astype(np.float32)
    prefix_mask = np.ones((3, 4), bool)
    prefix_mask[1, 0] = False
    settings = dict(settings, eos_token_id=2)
    with torch.no_grad():
        embeds = torch.cat([torch.from_numpy(prefix), ref.get_input_embeddings()(torch.from_numpy(PROMPT))], 1)
        mask = torch.from_numpy(np.concatenate([prefix_mask, MASK], 1).astype(np.int64))
        want = ref.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, pad_token_id=0,
                            **settings).numpy()
    generator = generate.Generator(prefix_decoder(model), PROMPT.shape[1] + settings["max_new_tokens"])
    got = generator(params, PROMPT, generate.GenerationConfig(**settings, pad_token_id=0), prompt_mask=MASK,
                    inputs={"prefix_embeds": prefix, "prefix_mask": prefix_mask})
    got_tokens = np.asarray(got.generated)[:, :want.shape[1]]
    print(f"\n{kind} soft prompt {settings}: {got_tokens.tolist()}")
    np.testing.assert_array_equal(got_tokens, want)
    assert len({tuple(r) for r in got_tokens.tolist()}) == len(got_tokens)


def test_export_loads_strictly_and_round_trips(converted, convert, reimport_equals):
    kind, ref, model, params, folder = converted
    convert("--to", "hf", "--input", folder / "mm", "--output", folder / "back")
    with open(folder / "back" / "config.json") as f:
        assert json.load(f)["architectures"] == [CASES[kind][0]]
    written = io.read_state_dict(str(folder / "back" / "model.safetensors"))
    original = {k: v.numpy() for k, v in ref.state_dict().items()}
    embed = "model.decoder.embed_tokens.weight" if kind == "opt" else "model.embed_tokens.weight"
    tied = {"lm_head.weight": written[embed]} if ref.config.tie_word_embeddings else {}
    assert set(original) - set(written) == set(tied)
    strict = _reference(kind, seed=5)
    strict.load_state_dict({k: torch.from_numpy(v) for k, v in {**written, **tied}.items()}, strict=True)
    for key, value in original.items():
        np.testing.assert_array_equal(strict.state_dict()[key].numpy(), value, err_msg=key)
    loaded = getattr(transformers, CASES[kind][0]).from_pretrained(str(folder / "back"),
                                                                   attn_implementation="eager").eval()
    kwargs = dict(input_ids=PROMPT, attention_mask=MASK.astype(np.int64))
    np.testing.assert_array_equal(_torch_logits(loaded, **kwargs), _torch_logits(ref, **kwargs))
    reimport_equals("hf", folder / "back", {"params": params})


# transformers config fields of the published models the bridges use (Vicuna-7B has LLaMA-2-7B's shapes)
REAL = {
    "vicuna-7b/llama-2-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                           intermediate_size=11008, vocab_size=32000)),
    "vicuna-13b": ("llama", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                 intermediate_size=13824, vocab_size=32000)),
    "opt-2.7b": ("opt", dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                             vocab_size=50272, word_embed_proj_dim=2560)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                             vocab_size=50272, word_embed_proj_dim=4096)),
    "qwen-7b": ("qwen2", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                              intermediate_size=11008, vocab_size=151936, max_position_embeddings=8192)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_size_tables_by_shape(name):
    kind, fields = REAL[name]
    cls, config_cls, _ = CASES[kind]
    config = getattr(transformers, config_cls)(**fields)
    with torch.device("meta"):
        ref = getattr(transformers, cls)(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()     # save_pretrained leaves it out
    state = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k not in tied}
    plan = decoder_lm.from_hf({**json.loads(config.to_json_string()), "architectures": [cls]}, state)
    # traced scanned (one layer: fast), each layer's shapes are the stack's without the leading axis
    scanned = pretrained.abstract_params(pretrained.build(plan.model_class, {**plan.fields, "scan": True}), plan.inputs)
    expected = {layer: tuple(s.shape[1:]) if param_paths.is_stacked(p) else tuple(s.shape)
                for p, s in scanned.items() for layer in param_paths.unstacked_paths(p, plan.fields["depth"])}
    paths = table_shapes.imported_paths(state, plan.table, expected)
    assert sorted(paths) == sorted(expected)        # every parameter filled, none twice
    assert table_shapes.exported_shapes(expected, plan.table) == state
    for variant in name.split("/"):        # the presets build this model (max_len shapes OPT's table only)
        arch, want = DecoderLM(variant=variant).arch(), DecoderLM(**plan.fields).arch()
        if kind != "opt":
            arch["max_len"] = want["max_len"]
        assert arch == want


def test_7b_parameters_split_over_fsdp_and_tensor():
    """Vicuna-7B's parameters under fsdp_tp on the 8 simulated devices (data 2 x fsdp 2 x tensor 2),
    from the logical names alone (shapes only): vocab, heads and MLP over tensor, width over fsdp,
    so each device holds a quarter."""
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)], jax.devices())
    model = DecoderLM(variant="vicuna-7b", scan=True)
    inputs = [pretrained.input_spec((1, 8), "int32")]
    shardings = pretrained.param_shardings(model, inputs, mesh, "fsdp_tp")
    specs = {p: tuple(s.spec) for p, s in shardings.items()}
    assert specs["embed/embedding"] == ("tensor", "fsdp") and specs["lm_head/kernel"] == ("fsdp", "tensor")
    assert specs["decoder/layers/attn/query/kernel"] == (None, "fsdp", "tensor", None)
    assert specs["decoder/layers/mlp/gate/kernel"] == (None, "fsdp", "tensor")
    shapes = pretrained.abstract_params(model, inputs)
    total = sum(np.prod(s.shape) for s in shapes.values())
    per_device = sum(np.prod(shardings[p].shard_shape(s.shape)) for p, s in shapes.items())
    assert 6.7e9 < total < 6.8e9 and per_device / total < 0.2501


@pytest.mark.parametrize("change,match", [
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "RoPE type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_configs_are_refused(change, match):
    hf = {**SMALL, **ROTARY, "architectures": ["LlamaForCausalLM"], **change}
    with pytest.raises(engine.ConversionError, match=match):
        decoder_lm.from_hf(hf, {})


def test_untied_opt_head_is_refused():
    state = {"model.decoder.embed_tokens.weight": np.zeros((4, 2), np.float32), "lm_head.weight": np.ones((4, 2))}
    with pytest.raises(engine.ConversionError, match="lm_head.weight differs"):
        decoder_lm.from_hf({"architectures": ["OPTForCausalLM"]}, state)
