"""Bert against transformers (random weights, float32): BertModel's last hidden state and pooler
and BertForMaskedLM's logits at base size (the variants table's "base"), a small
BertLMHeadModel decoder with cross-attention and padding on both sides; decoding token by token
through the cache equals the full forward; ALBEF's text / fusion split and BLIP's text-only mode
equal the corresponding full runs, scanned or not; bad input gets clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharded_equality
import torch
from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel

from mmjax import layers
from mmjax.convert import bert as bert_convert
from mmjax.convert import engine
from mmjax.models import outputs
from mmjax.models.bert import Bert, forward_flops

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, vocab_size=97,
             max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             attn_implementation="eager")
VALID = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], bool)     # right-padded second text
CONTEXT_VALID = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves biases and norm parameters off their 0 / 1 init, so a mis-mapped one cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _params(model: Bert, state: dict, inputs: tuple, **kwargs) -> dict:
    """The transformers state dict through the conversion table, checked against the model's own tree."""
    state = {k: v.detach().numpy() for k, v in state.items()}
    plan = bert_convert.from_hf({}, state)
    expected = engine.flatten(nn.meta.unbox(jax.eval_shape(
        lambda *a: model.init(jax.random.key(0), *a, **kwargs), *inputs))["params"])
    return engine.unflatten(engine.to_mmjax(state, plan.table, expected))


def _diff(got, want, label: str) -> float:
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    print(f"\n{label}: max abs diff {diff:.2e} (max |x| {np.abs(np.asarray(want)).max():.3g})")
    return diff


@pytest.fixture(scope="module")
def base():
    """bert-base structure (BertConfig's defaults): a BertForMaskedLM and a BertModel sharing its encoder."""
    torch.manual_seed(0)
    config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    mlm = _randomize(BertForMaskedLM(config), seed=0)
    encoder = BertModel(config)
    encoder.load_state_dict(mlm.bert.state_dict(), strict=False)       # only the pooler is its own
    _randomize(encoder.pooler, seed=1)
    encoder.eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones((2, 16), bool)
    mask[1, 11:] = False
    types = np.zeros((2, 16), np.int32)
    types[:, 8:] = 1
    args = dict(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
                token_type_ids=torch.from_numpy(types).long())
    with torch.no_grad():
        hidden = encoder(**args)
        want = {"tokens": hidden.last_hidden_state.numpy(), "pooled": hidden.pooler_output.numpy(),
                "logits": mlm(**args).logits.numpy()}
    state = {**encoder.state_dict(), **{k: v for k, v in mlm.state_dict().items() if k.startswith("cls.")}}
    model = Bert(variant="base", pool="pooler", lm_head=True, dropout=0.0)
    params = _params(model, state, (tokens[:1],))
    got = jax.jit(lambda p: model.apply({"params": p}, tokens, mask, token_types=types))(params)
    return got, want


def test_base_matches_bert_model_and_masked_lm(base):
    got, want = base
    assert set(outputs.check(got)) == {"tokens", "pooled", "logits"}
    assert got["logits"].shape == (2, 16, 30522)
    assert _diff(got["tokens"], want["tokens"], "BertModel last hidden state (base)") <= 2e-5       # measured 3.7e-6
    assert _diff(got["pooled"], want["pooled"], "BertModel pooler output (base)") <= 1e-5           # measured 2.2e-6
    assert _diff(got["logits"], want["logits"], "BertForMaskedLM logits (base)") <= 2e-5           # measured 3.1e-6


def _small_decoder_model(**overrides) -> Bert:
    fields = dict(width=32, depth=3, num_heads=4, mlp_dim=48, vocab_size=97, max_len=24, causal=True,
                  cross_attention=True, pool="none", lm_head=True, dropout=0.0)
    return Bert(**{**fields, **overrides})


@pytest.fixture(scope="module")
def decoder():
    """A small BertLMHeadModel(is_decoder=True, add_cross_attention=True) and its mmjax twin."""
    torch.manual_seed(1)
    ref = _randomize(BertLMHeadModel(BertConfig(**SMALL, is_decoder=True, add_cross_attention=True)), seed=2)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SMALL["vocab_size"], (2, 7)).astype(np.int32)
    context = rng.normal(size=(2, 5, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(VALID).long(),
                   encoder_hidden_states=torch.from_numpy(context),
                   encoder_attention_mask=torch.from_numpy(CONTEXT_VALID).long(), use_cache=False).logits.numpy()
    model = _small_decoder_model()
    params = _params(model, ref.state_dict(), (tokens, VALID, context))
    return model, params, tokens, context, want


def test_decoder_with_cross_attention_matches_bert_lm_head_model(decoder):
    model, params, tokens, context, want = decoder
    got = model.apply({"params": params}, tokens, VALID, context, CONTEXT_VALID)
    assert set(got) == {"tokens", "logits"}
    assert _diff(got["logits"], want, "BertLMHeadModel logits (causal + padding, cross-attention + padding)") <= 1e-6


def test_decoding_with_the_cache_equals_the_full_forward(decoder):
    """A 3-token prompt, then one token per call: the same logits as one full causal forward.
    The context is given once; later calls read its keys/values from the cache."""
    model, params, tokens, context, _ = decoder
    full = model.apply({"params": params}, tokens, VALID, context, CONTEXT_VALID)["logits"]
    length = tokens.shape[1]
    cache = model.init(jax.random.key(0), jnp.zeros_like(tokens), VALID, context, CONTEXT_VALID, decode=True)["cache"]
    step = jax.jit(lambda cache, t, ctx: model.apply({"params": params, "cache": cache}, t, VALID, ctx, CONTEXT_VALID,
                                                     decode=True, mutable=["cache"]))
    out, variables = step(cache, tokens[:, :3], context)
    pieces = [out["logits"]]
    for i in range(3, length):
        out, variables = step(variables["cache"], tokens[:, i:i + 1], None)
        pieces.append(out["logits"])
    assert int(variables["cache"]["position"]) == length
    assert _diff(jnp.concatenate(pieces, axis=1), full, "decode (prompt of 3, then 1 token per step) vs full") <= 1e-6


def _random_params(model: Bert, *inputs, seed: int = 0) -> dict:
    shapes = nn.meta.unbox(jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *inputs))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_albef_text_then_fusion_equals_the_full_run(scan):
    """ALBEF: layers 0-1 are the text encoder, 2-3 the fusion layers (cross-attention from layer 2).
    mode="text" runs the first part only, mode="fusion" the rest on its output: together the full run."""
    model = Bert(width=32, depth=4, num_heads=4, mlp_dim=48, vocab_size=97, max_len=24, cross_attention=True,
                 cross_attention_from=2, lm_head=True, dropout=0.0)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 97, (2, 7)).astype(np.int32)
    context = rng.normal(size=(2, 5, 32)).astype(np.float32)
    params = _random_params(model, tokens, VALID, context)
    assert "cross_attn" not in params["encoder"]["layer_1"] and "cross_attn" in params["encoder"]["layer_2"]
    if scan:
        unrolled = model
        model = model.clone(scan=True)
        params = {**params, "encoder": layers.to_scanned(params["encoder"], model.stack())}
        assert set(params["encoder"]) == {"layers", "layers_from_2"}
        want = unrolled.apply({"params": _unscanned(params, model)}, tokens, VALID, context, CONTEXT_VALID)
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
    full = apply(tokens, VALID, context, CONTEXT_VALID)
    text = apply(tokens, VALID, mode="text")
    fused = apply(text["tokens"], VALID, context, CONTEXT_VALID, mode="fusion")
    assert "logits" not in text and set(fused) == {"tokens", "pooled", "logits"}
    np.testing.assert_allclose(fused["logits"], full["logits"], atol=1e-5)
    np.testing.assert_allclose(fused["pooled"], full["tokens"][:, 0], atol=1e-6)
    assert np.abs(text["tokens"] - full["tokens"]).max() > 0.1       # the fusion layers do something
    if scan:
        np.testing.assert_allclose(full["logits"], want["logits"], atol=1e-5)


def _unscanned(params: dict, model: Bert) -> dict:
    return {**params, "encoder": layers.to_unrolled(params["encoder"], model.stack())}


def test_blip_text_mode_skips_every_cross_attention():
    """BLIP's unimodal text encoder: the same layers with their cross-attention sub-layers skipped,
    i.e. a Bert without cross-attention given the same parameters."""
    model = Bert(width=32, depth=2, num_heads=4, mlp_dim=48, vocab_size=97, max_len=24, cross_attention=True,
                 dropout=0.0)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 97, (2, 7)).astype(np.int32)
    context = rng.normal(size=(2, 5, 32)).astype(np.float32)
    params = _random_params(model, tokens, VALID, context)
    plain = model.clone(cross_attention=False)
    stripped = {**params, "encoder": {name: {k: v for k, v in layer.items() if k not in ("cross_attn", "ln_cross")}
                                      for name, layer in params["encoder"].items()}}
    want = plain.apply({"params": stripped}, tokens, VALID)["tokens"]
    np.testing.assert_allclose(model.apply({"params": params}, tokens, VALID, mode="text")["tokens"], want, atol=1e-6)
    full = model.apply({"params": params}, tokens, VALID, context)["tokens"]
    assert np.abs(full - want).max() > 0.1


def test_variants_and_flops():
    base = Bert(variant="base")
    assert base.arch() == dict(width=768, depth=12, mlp_dim=3072, num_heads=12)
    assert Bert(variant="large", depth=2).arch() == dict(width=1024, depth=2, mlp_dim=4096, num_heads=16)
    parts = forward_flops(Bert(variant="base", lm_head=True, cross_attention=True, cross_attention_from=6), 32, 577)
    assert parts["cross_blocks_attention"] == 6 * 4 * 32 * 577 * 768
    assert parts["lm_head"] == 2 * 32 * 768 * (768 + 30522)


@pytest.mark.parametrize("call,match", [
    (lambda m, t, c: m.apply(m.init(jax.random.key(0), t, None, c), t),
     "has cross-attention: mode 'full' needs the `context`"),
    (lambda m, t, c: m.init(jax.random.key(0), t, mode="text"), "Initialise a cross-attention Bert with mode='full'"),
    (lambda m, t, c: m.init(jax.random.key(0), jnp.zeros((1, 30), jnp.int32), None, c), "exceed the 24 position"),
    (lambda m, t, c: m.init(jax.random.key(0), t.astype(jnp.float32), None, c), "integer token ids"),
    (lambda m, t, c: m.clone(causal=False).init(jax.random.key(0), t, None, c, decode=True), "decode=True is for"),
    (lambda m, t, c: m.clone(cross_attention=False).init(jax.random.key(0), t, mode="fusion"), "needs a model with"),
    (lambda m, t, c: m.init(jax.random.key(0), t, None, c, mode="both"), "Unknown mode"),
    (lambda m, t, c: m.clone(variant="huge").init(jax.random.key(0), t, None, c), "Unknown BERT variant"),
    (lambda m, t, c: m.clone(type_vocab_size=0).init(jax.random.key(0), t, None, c, token_types=t), "no token-type"),
], ids=["no-context", "init-text", "too-long", "float-ids", "decode-bidirectional", "fusion-plain", "mode",
        "variant", "token-types"])
def test_bad_input_gets_clear_errors(call, match):
    model = _small_decoder_model()
    with pytest.raises(ValueError, match=match):
        call(model, jnp.zeros((1, 7), jnp.int32), jnp.zeros((1, 5, 32)))


def test_sharded_equals_one_device():
    """fsdp_tp on the 8 simulated devices: parameters born sharded (vocab, heads and MLP split
    over `tensor`), the same logits and gradients as on one device."""
    model = _small_decoder_model(vocab_size=96, depth=2, scan=True)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 96, (4, 7)).astype(np.int32)
    valid = np.concatenate([VALID, VALID])
    context = rng.normal(size=(4, 5, 32)).astype(np.float32)

    def loss(params):
        logits = model.apply({"params": params}, tokens, valid, context)["logits"]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    init = lambda key: model.init(key, tokens, valid, context)
    sharded_equality.assert_fsdp_tp_matches_one_device(init, loss, lambda p: p["embeddings"]["word"]["embedding"])


def test_a_layer_range_must_not_cut_a_scanned_segment():
    model = Bert(width=32, depth=4, num_heads=4, mlp_dim=48, vocab_size=97, max_len=24, cross_attention=True,
                 cross_attention_from=2, dropout=0.0, scan=True)
    stack = model.stack()
    x, context = jnp.zeros((1, 3, 32)), jnp.zeros((1, 2, 32))
    variables = jax.eval_shape(lambda: stack.init(jax.random.key(0), x, context=context))   # the checks come first
    with pytest.raises(ValueError, match="cuts the scanned segment 'layers'"):
        stack.apply(variables, x, layer_range=(0, 1))
    with pytest.raises(ValueError, match="not a non-empty range"):
        stack.apply(variables, x, context=context, layer_range=(2, 2))
