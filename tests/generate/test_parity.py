"""Same tokens (and beam scores) as transformers' `generate` for a random BertLMHeadModel decoder
converted by mmjax-convert (mmjax.models.bert.Bert through mmjax/convert/bert.py) with the same
settings: greedy, stop tokens, repetition penalty, minimum length, beam search with length
penalty under each early-stopping rule, several returned beams, and a cross-attending decoder
(BLIP captioning's shape) with a padded context. Prompts are left-padded to one width."""

import numpy as np
import pytest
import torch
from generation_models import reference_model
from transformers import DynamicCache, EncoderDecoderCache

import mmjax
from mmjax import generate
from mmjax.convert import api

PROMPT = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 20, 31, 1], [0, 44, 2, 7, 9, 30]])
MASK = PROMPT != 0
CONTEXT = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(1)).numpy()
CONTEXT_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], bool)
MAX_LENGTH = 20
CROSS_EOS = {18: 12, 3: 20, 46: 39}     # stop tokens the cross-attending decoder does generate


@pytest.fixture(scope="module", params=[False, True], ids=["decoder", "cross_attention"])
def models(request, module_tmp):
    cross = request.param
    ref = reference_model(cross)
    folder = module_tmp("bert_decoder")
    ref.save_pretrained(str(folder / "hf"))
    api.import_checkpoint("hf", str(folder / "hf"), str(folder / "mmjax"))
    model, variables = mmjax.load(str(folder / "mmjax"))
    assert model.causal and model.cross_attention == cross
    return cross, ref, generate.Generator(generate.FlaxDecoder(model), MAX_LENGTH), variables["params"]


def _reference(ref, cross: bool, settings: dict):
    kwargs = dict(attention_mask=torch.from_numpy(MASK.astype(np.int64)), pad_token_id=0, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    if cross:   # transformers 5.25's BertLMHeadModel needs an explicit encoder-decoder cache here
        kwargs.update(encoder_hidden_states=torch.from_numpy(CONTEXT),
                      encoder_attention_mask=torch.from_numpy(CONTEXT_MASK.astype(np.int64)),
                      past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))
    with torch.no_grad():
        return ref.generate(torch.from_numpy(PROMPT), **kwargs, **settings)


def _rows(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Each row up to and including its first stop token (the rest is fill)."""
    out = []
    for row in tokens.tolist():
        out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


SETTINGS = {
    "greedy": dict(max_new_tokens=12, eos_token_id=18),
    "greedy_repetition_min_length": dict(max_new_tokens=12, eos_token_id=3, repetition_penalty=1.5, min_length=10),
    "beam3_length_penalty": dict(max_new_tokens=10, num_beams=3, length_penalty=1.5, eos_token_id=3),
    "beam3_early_stopping_two_returned": dict(max_new_tokens=10, num_beams=3, length_penalty=0.5,
                                              early_stopping=True, eos_token_id=46, num_return_sequences=2),
    "beam3_never_repetition_min_new": dict(max_new_tokens=10, num_beams=3, length_penalty=1.5,
                                           early_stopping="never", eos_token_id=18, repetition_penalty=1.2,
                                           min_new_tokens=3),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_tokens_as_transformers(models, name):
    cross, ref, generator, params = models
    settings = SETTINGS[name]
    if cross:
        settings = {**settings, "eos_token_id": CROSS_EOS[settings["eos_token_id"]]}
    want = _reference(ref, cross, settings)
    inputs = dict(context=CONTEXT, context_mask=CONTEXT_MASK) if cross else None
    got = generator(params, PROMPT, generate.GenerationConfig(**settings, pad_token_id=0), prompt_mask=MASK,
                    inputs=inputs)
    eos = settings["eos_token_id"]
    want_rows = _rows(want.sequences[:, PROMPT.shape[1]:].numpy(), eos)
    got_rows = [row[:n] for row, n in zip(np.asarray(got.generated).tolist(), np.asarray(got.lengths))]
    print(f"\n{name} ({'cross-attention' if cross else 'decoder'}): {got_rows}")
    assert got_rows == want_rows
    assert len({len(r) for r in got_rows}) > 1 or name.startswith("beam")   # rows stop at different steps
    if settings.get("num_beams", 1) > 1:
        diff = np.abs(np.asarray(got.scores) - want.sequences_scores.numpy()).max()
        print(f"beam scores: max abs diff {diff:.1e}")
        assert diff < 1e-4
