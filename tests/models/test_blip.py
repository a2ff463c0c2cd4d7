"""BLIP models: parity with transformers at BLIP-base's full structure (captioner and retrieval,
random weights), cached decoding equal to the full forward, greedy / beam captions and greedy VQA
answers equal to transformers' `generate` through mmjax.generate, the retrieval methods agreeing
with `__call__`, and clear errors for fields BLIP fixes."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

from mmjax import generate, pretrained
from mmjax.convert import blip as blip_convert
from mmjax.convert import engine
from mmjax.models import blip, outputs

VISION = dict(variant=None, width=32, depth=2, num_heads=4, mlp_dim=48, patch_size=8)
TEXT = dict(variant=None, width=24, depth=2, num_heads=4, mlp_dim=40, vocab_size=99, max_len=24)
HF_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
                 patch_size=8)
HF_TEXT = dict(hidden_size=24, encoder_hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=40, vocab_size=99, max_position_embeddings=24, bos_token_id=97, sep_token_id=98,
               pad_token_id=0, eos_token_id=2)


def _images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _from_torch(ref) -> tuple[nn.Module, dict]:
    """transformers model -> (mmjax module, variables) in memory, through the conversion table."""
    config = ref.config.to_dict()
    config["architectures"] = [type(ref).__name__]
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    plan = blip_convert.from_hf(config, state)
    model = pretrained.build(plan.model_class, plan.fields)
    flat = engine.to_mmjax(state, plan.table, pretrained.abstract_params(model, plan.inputs))
    return model, {"params": engine.unflatten(flat)}


def _torch_captioner(seed: int, vision=HF_VISION, text=HF_TEXT, vision_std: float | None = 0.02):
    torch.manual_seed(seed)
    ref = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:     # away from the 1 / 0 init, so that a mis-mapped norm cannot hide
                p.add_(0.1 * torch.randn_like(p))
            elif "vision_model" in name and vision_std:    # transformers draws them with std 1e-10
                p.normal_(0, vision_std)
    return ref


def test_real_structure_captioner_matches_transformers():
    """BLIP-base's captioner structure (ViT-B/16 at 384 pixels, 12 text layers of width 768 with
    12 heads, vocabulary 30524), random weights, one image and a padded caption."""
    start = time.time()
    ref = _torch_captioner(0, vision={}, text=dict(num_attention_heads=12))
    images = _images(2, 384)
    tokens = np.array([[30522, 1037, 3861, 1997, 1037, 4937, 102], [30522, 1037, 3899, 102, 0, 0, 0]], np.int32)
    mask = tokens != 0
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                   input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long()).logits
    model, variables = _from_torch(ref)
    got = jax.jit(model.apply)(variables, images, tokens, mask)["logits"]
    diff = float(np.abs(np.asarray(got)[mask] - want.numpy()[mask]).max())
    print(f"BLIP-base captioner logits: max abs diff {diff:.3g} (max |x| {float(want.abs().max()):.3g}), "
          f"{time.time() - start:.0f} s")
    assert diff <= 1e-4


def test_real_structure_retrieval_matches_transformers():
    """BLIP-base's retrieval structure (blip-itm-base: ViT-B/16 at 384, 12 text layers of width
    768 with 12 heads, ITC at 256): ITM logits and ITC similarity of transformers, random weights."""
    torch.manual_seed(1)
    ref = BlipForImageTextRetrieval(BlipConfig(text_config=dict(num_attention_heads=12))).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif "vision_model" in name:    # transformers draws them with std 1e-10
                p.normal_(0, 0.02)
    images = _images(2, 384, seed=1)
    tokens = np.array([[30523, 1037, 3861, 1997, 1037, 4937, 102], [30523, 1037, 3899, 102, 0, 0, 0]], np.int32)
    mask = tokens != 0
    kwargs = dict(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                  input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long())
    with torch.no_grad():
        itm, itc = (ref(**kwargs, use_itm_head=h).itm_score.numpy() for h in (True, False))
    model, variables = _from_torch(ref)
    out = jax.jit(model.apply)(variables, images, tokens, mask)
    diffs = {"itm_logits": float(np.abs(out["itm_logits"] - itm).max()),
             "similarity": float(np.abs(out["image_embeds"] @ out["text_embeds"].T - itc).max())}
    print(f"BLIP-base retrieval: max abs diffs {diffs} (max |itm| {np.abs(itm).max():.3g}, "
          f"|itc| {np.abs(itc).max():.3g})")
    assert max(diffs.values()) <= 1e-4


def test_cached_decoding_equals_the_full_forward():
    model, variables = _from_torch(_torch_captioner(1))
    images = _images()
    tokens = np.random.default_rng(1).integers(3, 97, (2, 7)).astype(np.int32)
    full = model.apply(variables, images, tokens)["logits"]
    context = model.apply(variables, images, method="encode_images")
    mask = jnp.ones((2, 7), bool)
    _, state = model.apply(variables, tokens, mask=mask, context=context, decode=True, mutable=["cache"],
                           method="decode_text")
    cache, steps = state["cache"], []
    for i in range(7):
        out, state = model.apply({**variables, "cache": cache}, tokens[:, i:i + 1], mask=mask,
                                 context=context if i == 0 else None, decode=True, mutable=["cache"],
                                 method="decode_text")
        cache = state["cache"]
        steps.append(out["logits"])
    diff = float(jnp.abs(jnp.concatenate(steps, axis=1) - full).max())
    print(f"cached decoding vs full forward: max abs diff {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("num_beams", [1, 3])
def test_captions_equal_transformers_generate(num_beams):
    ref = _torch_captioner(2, vision_std=None)
    with torch.no_grad():   # captions that depend on the image, and a stop token some rows reach
        for name, p in ref.named_parameters():
            if p.ndim >= 2 and ("vision_model" in name or "crossattention" in name):
                p.normal_(0, 0.3)
        ref.text_decoder.cls.predictions.bias[HF_TEXT["sep_token_id"]] += 0.5
    model, variables = _from_torch(ref)
    images = _images(4, seed=2)
    with torch.no_grad():
        want = ref.generate(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), num_beams=num_beams,
                            max_length=12, min_length=0, do_sample=False).numpy()
    context = model.apply(variables, images, method="encode_images")
    generator = generate.Generator(generate.FlaxDecoder(model, method="decode_text"), max_length=12)
    config = generate.GenerationConfig(max_length=12, num_beams=num_beams, eos_token_id=HF_TEXT["sep_token_id"],
                                       pad_token_id=HF_TEXT["pad_token_id"])
    out = generator(variables["params"], jnp.full((len(images), 1), HF_TEXT["bos_token_id"], jnp.int32), config,
                    inputs={"context": context})
    got = np.asarray(out.sequences)
    print(f"beams={num_beams}: transformers {want.tolist()}\n          mmjax {got.tolist()}")
    captions = [_until_stop(row) for row in want]
    assert len({tuple(c) for c in captions}) > 2 and sum(c[-1] == HF_TEXT["sep_token_id"] for c in captions) >= 2
    assert [_until_stop(row) for row in got] == captions


def test_vqa_answers_equal_transformers_generate():
    """Greedy answers of BlipForQuestionAnswering (its generate lets the decoder read every
    question position, padding included: no context_mask)."""
    torch.manual_seed(5)
    ref = BlipForQuestionAnswering(BlipConfig(vision_config=HF_VISION, text_config={**HF_TEXT, "hidden_size": 32}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2 and ("vision_model" in name or "crossattention" in name):
                p.normal_(0, 0.3)
    model, variables = _from_torch(ref.eval())
    images = _images(4, seed=3)
    questions = np.random.default_rng(4).integers(3, 97, (4, 5)).astype(np.int32)
    mask = np.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] * 4 + [0]], bool)
    with torch.no_grad():
        want = ref.generate(input_ids=torch.from_numpy(questions).long(), attention_mask=torch.from_numpy(mask).long(),
                            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), max_length=10,
                            num_beams=1).numpy()
    context = model.apply(variables, images, questions, mask, method="encode_question")
    generator = generate.Generator(generate.FlaxDecoder(model, method="decode_text"), max_length=10)
    config = generate.GenerationConfig(max_length=10, eos_token_id=HF_TEXT["sep_token_id"],
                                       pad_token_id=HF_TEXT["pad_token_id"])
    out = generator(variables["params"], jnp.full((4, 1), HF_TEXT["bos_token_id"], jnp.int32), config,
                    inputs={"context": context})
    answers = [_until_stop(row) for row in want]
    print(f"VQA: transformers {answers}")
    assert len({tuple(a) for a in answers}) > 1
    assert [_until_stop(row) for row in np.asarray(out.sequences)] == answers


def _until_stop(row) -> list[int]:
    """The caption up to and including the first stop token (transformers pads after it)."""
    row = [int(t) for t in row]
    sep = HF_TEXT["sep_token_id"]
    return row[:row.index(sep, 1) + 1] if sep in row[1:] else row


def test_retrieval_methods_agree_with_call():
    model = blip.BlipRetrieval(vision=VISION, text=TEXT, embed_dim=16, learn_temperature=True)
    images, tokens = _images(), np.random.default_rng(3).integers(3, 97, (2, 6)).astype(np.int32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    variables = model.init(jax.random.key(0), images, tokens, mask)
    out = outputs.check(model.apply(variables, images, tokens, mask))
    assert out["itm_logits"].shape == (2, 2) and out["image_embeds"].shape == out["text_embeds"].shape == (2, 16)
    np.testing.assert_allclose(jnp.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-6)
    assert float(out["logit_scale"]) == pytest.approx(1 / 0.07)
    image_tokens = model.apply(variables, images, method="encode_image_tokens")
    np.testing.assert_allclose(model.apply(variables, tokens, mask, method="encode_text"), out["text_embeds"],
                               atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, image_tokens, method="embed_image"), out["image_embeds"],
                               atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, tokens, mask, image_tokens, method="match"),
                               out["itm_logits"], atol=1e-6)
    # the unimodal text embedding ignores the image; the fused ITM logits do not
    other = model.apply(variables, images[::-1], tokens, mask)
    np.testing.assert_allclose(other["text_embeds"], out["text_embeds"], atol=1e-6)
    assert float(jnp.abs(other["itm_logits"] - out["itm_logits"]).max()) > 1e-6


@pytest.mark.parametrize("fields,match", [
    (dict(vision=dict(pool="cls")), "pool='none'"),
    (dict(text=dict(causal=True)), "fixes"),
])
def test_fields_blip_fixes_are_refused(fields, match):
    model = blip.BlipRetrieval(**{"vision": VISION, "text": TEXT, **{k: {**({"vision": VISION, "text": TEXT}[k]),
                                                                        **v} for k, v in fields.items()}})
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), _images(), np.ones((2, 6), np.int32))
