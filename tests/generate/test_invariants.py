"""Generation invariants on the tiny decoder: one compilation for every length, prompt and
traced option; padded rows (left or right) generate what they would alone (checked against full
forwards without a cache); scanned and unrolled stacks agree; stop tokens end rows with padding;
clear errors for requests that cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_models import TinyBertDecoder, greedy_without_cache, params_from_reference, reference_model

from mmjax import generate

ROWS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 31, 1], [44, 2, 7, 9, 30]]
WIDTH = 6


def _padded(side: str) -> tuple[np.ndarray, np.ndarray]:
    prompt, mask = np.zeros((len(ROWS), WIDTH), np.int32), np.zeros((len(ROWS), WIDTH), bool)
    for i, row in enumerate(ROWS):
        place = slice(WIDTH - len(row), WIDTH) if side == "left" else slice(0, len(row))
        prompt[i, place], mask[i, place] = row, True
    return prompt, mask


@pytest.fixture(scope="module")
def tiny():
    model = TinyBertDecoder()
    params = params_from_reference(reference_model(False))
    return model, params, generate.Generator(generate.FlaxDecoder(model), max_length=20)


def test_one_compilation_for_every_length_prompt_and_padding(tiny):
    model, params, generator = tiny
    before = generator.traces
    for new_tokens, side in [(3, "left"), (9, "right"), (14, "left")]:
        prompt, mask = _padded(side)
        out = generator(params, prompt, generate.GenerationConfig(max_new_tokens=new_tokens), prompt_mask=mask)
        generated = np.asarray(out.generated)
        assert np.all(generated[:, new_tokens:] == 0) and np.all(np.asarray(out.lengths) == new_tokens)
    assert generator.traces - before == 1


def test_sampling_options_are_traced(tiny):
    _, params, generator = tiny
    prompt, mask = _padded("left")
    before = generator.traces
    for temperature, top_p, penalty in [(0.7, 0.9, 1.2), (1.3, 0.5, 1.5)]:
        config = generate.GenerationConfig(max_new_tokens=5, do_sample=True, temperature=temperature, top_p=top_p,
                                           repetition_penalty=penalty)
        generator(params, prompt, config, prompt_mask=mask, key=jax.random.key(0))
    assert generator.traces - before == 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_generate_what_they_would_alone(tiny, side):
    """Against full forwards of each unpadded prompt (no cache, no padding, no generation loop)."""
    model, params, generator = tiny
    prompt, mask = _padded(side)
    out = generator(params, prompt, generate.GenerationConfig(max_new_tokens=8), prompt_mask=mask)
    want = np.stack([greedy_without_cache(model, params, np.asarray(row), 8) for row in ROWS])
    np.testing.assert_array_equal(np.asarray(out.generated)[:, :8], want)
    left, _ = _padded("left")                  # the returned prompt is left-aligned whatever came in
    np.testing.assert_array_equal(np.asarray(out.sequences)[:, :WIDTH], left)


def test_stop_tokens_end_rows_with_padding(tiny):
    model, params, generator = tiny
    prompt, mask = _padded("left")
    plain = np.asarray(generator(params, prompt, generate.GenerationConfig(max_new_tokens=10), prompt_mask=mask
                                 ).generated)[:, :10]
    stop = int(plain[0, 2])                                        # a token some row does generate
    out = generator(params, prompt, generate.GenerationConfig(max_new_tokens=10, eos_token_id=(stop, 47),
                                                              pad_token_id=1), prompt_mask=mask)
    generated, lengths = np.asarray(out.generated), np.asarray(out.lengths)
    for row, got, n in zip(plain, generated, lengths):
        hits = np.flatnonzero(row == stop)
        expected = hits[0] + 1 if hits.size else 10
        assert n == expected
        np.testing.assert_array_equal(got[:n], row[:n])
        assert np.all(got[n:] == 1)
    assert lengths.min() < 10


def test_scanned_stack_generates_the_same(tiny):
    model, params, generator = tiny
    ref = reference_model(False)
    scanned = generate.Generator(generate.FlaxDecoder(TinyBertDecoder(scan=True)), max_length=20)
    scanned_params = params_from_reference(ref, scan=True)
    prompt, mask = _padded("left")
    config = generate.GenerationConfig(max_new_tokens=8, num_beams=3, eos_token_id=3)  # beams reorder the cache
    want = generator(params, prompt, config, prompt_mask=mask)
    got = scanned(scanned_params, prompt, config, prompt_mask=mask)
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences))


def test_clear_errors(tiny):
    _, params, generator = tiny
    prompt, mask = _padded("left")
    with pytest.raises(ValueError, match="needs 26 positions .* cache holds 20"):
        generator(params, prompt, generate.GenerationConfig(max_new_tokens=20), prompt_mask=mask)
    with pytest.raises(ValueError, match="needs a jax random key"):
        generator(params, prompt, generate.GenerationConfig(max_new_tokens=2, do_sample=True), prompt_mask=mask)
    with pytest.raises(ValueError, match="integer token ids"):
        generator(params, prompt.astype(np.float32), generate.GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="batch 4 first"):
        generator(params, prompt, generate.GenerationConfig(max_new_tokens=2),
                  inputs={"context": jnp.zeros((3, 2, 32))})
    with pytest.raises(ValueError, match="at least one real token"):
        generator(params, prompt, generate.GenerationConfig(max_new_tokens=2), prompt_mask=mask & (prompt == 5))
    with pytest.raises(ValueError, match="no room after the prompt"):
        generator(params, prompt, generate.GenerationConfig(max_length=WIDTH))
    with pytest.raises(ValueError, match="max_new_tokens or max_length"):
        generate.GenerationConfig()
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate.GenerationConfig(max_new_tokens=2, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="Unknown cache leaf"):
        generate.layers_cache_layout((jax.tree_util.DictKey("mystery"),), jnp.zeros((2, 3)))
