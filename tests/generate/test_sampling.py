"""Sampling. torch's and jax's random streams differ, so sampling is checked through invariants:
the score processors equal transformers' on the same scores; top-k = 1, a near-zero temperature
and a tiny top-p all give the greedy tokens; draws repeat per key and differ across keys; the
empirical first-token distribution matches transformers' processed distribution; beam sampling
at a near-zero temperature is beam search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from generation_models import TinyBertDecoder, params_from_reference, reference_model
from transformers.generation import logits_process as hf

from mmjax import generate
from mmjax.generate import logits as processors

PROMPT = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 20, 31, 1], [0, 44, 2, 7, 9, 30]])
MASK = PROMPT != 0


@pytest.fixture(scope="module")
def tiny():
    ref = reference_model(False)
    generator = generate.Generator(generate.FlaxDecoder(TinyBertDecoder()), max_length=16)
    return ref, params_from_reference(ref), generator


def _same(got: jax.Array, want: torch.Tensor) -> None:
    got, want = np.asarray(got), want.numpy()
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_processors_equal_transformers():
    gen = torch.Generator().manual_seed(0)
    scores = 3 * torch.randn(6, 48, generator=gen)
    tokens = torch.randint(0, 48, (6, 9), generator=gen)
    ignore = torch.tensor([0, 2, 5, 0, 9, 1])            # left padding per row
    valid = jnp.arange(9)[None] >= jnp.asarray(ignore.numpy())[:, None]
    seen = processors.seen_tokens(jnp.asarray(tokens.numpy()), valid, 48)
    _same(processors.repetition_penalty(jnp.asarray(scores.numpy()), seen, 1.3),
          hf.RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=ignore)(tokens, scores.clone()))
    for length in (8, 9, 10):
        _same(processors.forbid_stop_before(jnp.asarray(scores.numpy()), (3, 7), jnp.int32(length), jnp.int32(10)),
              hf.MinLengthLogitsProcessor(10, [3, 7])(tokens[:, :length] if length <= 9 else
                                                       torch.cat([tokens, tokens[:, :1]], 1), scores.clone()))
    _same(processors.top_k_filter(jnp.asarray(scores.numpy()), 4), hf.TopKLogitsWarper(4)(tokens, scores.clone()))
    for top_p, keep in [(0.7, 1), (0.3, 3), (0.999, 1)]:
        _same(processors.top_p_filter(jnp.asarray(scores.numpy()), jnp.float32(top_p), keep),
              hf.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(tokens, scores.clone()))


@pytest.mark.parametrize("options", [dict(top_k=1), dict(temperature=1e-3), dict(top_p=1e-6)],
                         ids=["top_k_1", "temperature_to_0", "top_p_to_0"])
def test_degenerate_sampling_is_greedy(tiny, options):
    _, params, generator = tiny
    greedy = generator(params, PROMPT, generate.GenerationConfig(max_new_tokens=8), prompt_mask=MASK)
    sampled = generator(params, PROMPT, generate.GenerationConfig(max_new_tokens=8, do_sample=True, **options),
                        prompt_mask=MASK, key=jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(sampled.sequences), np.asarray(greedy.sequences))


def test_draws_repeat_per_key_and_differ_across_keys(tiny):
    _, params, generator = tiny
    config = generate.GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5)
    draw = lambda seed: np.asarray(generator(params, PROMPT, config, prompt_mask=MASK,
                                             key=jax.random.key(seed)).sequences)
    first = draw(1)
    np.testing.assert_array_equal(draw(1), first)
    assert not np.array_equal(draw(2), first)


def test_first_token_distribution_matches_transformers(tiny):
    """8,000 draws of the first new token with temperature 1.5, top-k 8, top-p 0.9 against the
    probabilities transformers' warpers give the reference model's logits."""
    ref, params, generator = tiny
    draws = 8000
    prompt = PROMPT[1:2]
    config = generate.GenerationConfig(max_new_tokens=1, do_sample=True, temperature=1.5, top_k=8, top_p=0.9,
                                       num_return_sequences=draws)
    got = np.asarray(generator(params, prompt, config, key=jax.random.key(3)).generated[:, 0])
    with torch.no_grad():
        logits = ref(torch.from_numpy(prompt)).logits[:, -1]
        warped = hf.TopPLogitsWarper(0.9)(None, hf.TopKLogitsWarper(8)(None, hf.TemperatureLogitsWarper(1.5)(
            None, logits)))
        want = torch.softmax(warped, -1)[0].numpy()
    frequency = np.bincount(got, minlength=want.size) / draws
    total_variation = 0.5 * np.abs(frequency - want).sum()
    print(f"\nfirst-token frequencies vs transformers' probabilities: total variation {total_variation:.3f} "
          f"over {int((want > 0).sum())} allowed tokens")
    assert set(np.unique(got)) <= set(np.flatnonzero(want > 0))
    assert (want > 0).sum() >= 4 and total_variation < 0.03


def test_beam_sampling_at_zero_temperature_is_beam_search(tiny):
    _, params, generator = tiny
    beam = dict(max_new_tokens=8, num_beams=3, eos_token_id=3, length_penalty=1.5)
    want = generator(params, PROMPT, generate.GenerationConfig(**beam), prompt_mask=MASK)
    got = generator(params, PROMPT, generate.GenerationConfig(**beam, do_sample=True, temperature=1e-3),
                    prompt_mask=MASK, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences))
