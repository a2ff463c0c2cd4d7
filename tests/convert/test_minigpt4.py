"""MiniGPT-4 checkpoints -> mmjax MiniGPT4 through `mmjax-convert --source minigpt4` (small dimensions at
the real structure, random weights). No MiniGPT-4 package builds offline: the reference is what the
official mini_gpt4.py computes, assembled from transformers parts with the same weights:
Blip2ForConditionalGeneration's vision tower, Q-Former and projection (its `get_image_features` is
MiniGPT-4's encode_img + llama_proj) and a LlamaForCausalLM fed [BOS, prompt before, image, prompt
after, text] as `inputs_embeds`. The files are the ones the official code loads (EVA's bare ViT file,
the BLIP-2 file with its stage-1 extras, the Vicuna folder, the released llama_proj-only file), with
key names from its source (see blip2_names.lavis_names)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blip2_names import lavis_names
from references import require

import mmjax
from mmjax import generate
from mmjax.convert import api, blip2_lavis, engine
from mmjax.models import blip2, minigpt4

torch = require("torch")
transformers = require("transformers")

# head widths as the published ones (EVA ViT-g 88, BERT 64): the CLI reads no head counts for these parts
VISION = dict(hidden_size=176, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=32,
              patch_size=8, initializer_range=0.02)
QFORMER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80, vocab_size=99,
               max_position_embeddings=20, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               initializer_range=0.2)
PAD, BOS, EOS = 0, 1, 2
LLAMA = dict(model_type="llama", hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=99, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
             initializer_range=0.3)
Q = 4
BEFORE = np.array([[30, 31, 32]], np.int32)             # "###Human: <Img>"
AFTER = np.array([[33, 34, 35, 36, 37]], np.int32)      # "</Img> Describe this image. ###Assistant: "
TEXT = np.array([[5, 6, 7, 8, 9, 40], [10, 11, 40, PAD, PAD, PAD]], np.int32)    # description + "###"
LOGITS_TOL = 2e-4      # measured 1.0e-4 (logits up to 6.7): the image embeddings agree to 6.5e-6 and the
                       # LLaMA at init std 0.3 amplifies float32 rounding; the BOS and prompt positions agree to 3e-6


def _images():
    return np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


def _save(state: dict, path) -> None:
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}}, path)


@pytest.fixture(scope="module")
def converted(module_tmp, randomize, convert):
    """The reference and the four files MiniGPT-4 is loaded from, converted by the CLI."""
    tmp = module_tmp("minigpt4")
    config = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=LLAMA,
                                      num_query_tokens=Q, image_token_index=98, initializer_range=0.1)
    torch.manual_seed(0)
    ref = randomize(transformers.Blip2ForConditionalGeneration(config), seed=7)
    with torch.no_grad():
        ref.query_tokens.normal_(generator=torch.Generator().manual_seed(8))
    names = {k.replace("opt_model.", "llama_model.").replace("opt_proj.", "llama_proj."): v
             for k, v in lavis_names(ref.state_dict()).items()}
    eva = {k[len("visual_encoder."):]: v for k, v in names.items() if k.startswith("visual_encoder.")}
    blip2_file = {k: v for k, v in names.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    blip2_file.update({"Qformer.cls.predictions.bias": np.zeros(99, np.float32), "temp": np.float32(0.07),
                       "itm_head.weight": np.zeros((2, 128), np.float32)})        # stage-1 parts MiniGPT-4 drops
    _save(eva, tmp / "eva_vit_g.pth")
    _save(blip2_file, tmp / "blip2_pretrained_flant5xxl.pth")
    _save({k: v for k, v in names.items() if k.startswith("llama_proj.")}, tmp / "pretrained_minigpt4.pth")
    ref.language_model.save_pretrained(str(tmp / "vicuna"))
    convert("--source", "minigpt4", "--checkpoint", tmp / "eva_vit_g.pth", "--checkpoint",
            tmp / "blip2_pretrained_flant5xxl.pth", "--checkpoint", tmp / "vicuna", "--checkpoint",
            tmp / "pretrained_minigpt4.pth", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return tmp, ref, model, variables


def _reference_embeds(ref, images, before, after, text):
    """The official forward's inputs_embeds: [BOS, before, image, after, text]."""
    embed = ref.language_model.get_input_embeddings()
    ids = lambda a: torch.from_numpy(np.broadcast_to(a, (images.shape[0], a.shape[1])).astype(np.int64))  # noqa: E731
    image = ref.get_image_features(torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
    bos = torch.full((images.shape[0], 1), BOS)
    return torch.cat([embed(bos), embed(ids(before)), image, embed(ids(after)), embed(ids(text))], dim=1)


def test_logits_and_loss_match_the_official_forward(converted, diff):
    _, ref, model, variables = converted
    assert isinstance(model, minigpt4.MiniGPT4) and model.bos_token_id == BOS
    assert model.lm_fields["num_kv_heads"] == 2           # read from the Vicuna folder's config.json
    images, mask = _images(), TEXT != PAD
    prefix = 1 + BEFORE.shape[1] + Q + AFTER.shape[1]
    attention = np.concatenate([np.ones((2, prefix), bool), mask], 1)
    labels = np.where(attention, np.concatenate([np.zeros((2, prefix), np.int32), TEXT], 1), -100)
    labels[:, :prefix] = -100                           # the official targets: the text alone
    with torch.no_grad():
        embeds = _reference_embeds(ref, images, BEFORE, AFTER, TEXT)
        want = ref.language_model(inputs_embeds=embeds, attention_mask=torch.from_numpy(attention.astype(np.int64)),
                                  labels=torch.from_numpy(labels.astype(np.int64)))
    got = jax.jit(model.apply)(variables, images, TEXT, mask, before=BEFORE, after=AFTER)
    real = attention[..., None]
    assert diff(np.where(real, got["logits"], 0), np.where(real, want.logits.numpy(), 0),
                "MiniGPT-4 logits") <= LOGITS_TOL
    loss, metrics = minigpt4.lm_loss(got["logits"], TEXT, mask)
    assert float(metrics["scored_tokens"]) == 6 + 3
    assert abs(float(loss) - float(want.loss)) <= 1e-5


def test_padding_in_the_prompt_changes_nothing(converted):
    """Prompts of several lengths share one compiled step: left padding is masked and positions
    count real tokens, so the logits of the real positions are the unpadded ones."""
    _, _, model, variables = converted
    images, mask = _images(), TEXT != PAD
    plain = model.apply(variables, images, TEXT, mask, before=BEFORE, after=AFTER)["logits"]
    after = np.concatenate([np.full((1, 3), PAD), AFTER], 1)
    padded = model.apply(variables, images, TEXT, mask, before=BEFORE, after=after, after_mask=after != PAD)["logits"]
    keep = np.r_[0:1 + BEFORE.shape[1] + Q, 1 + BEFORE.shape[1] + Q + 3:padded.shape[1]]
    np.testing.assert_allclose(np.asarray(padded)[:, keep], np.asarray(plain), atol=1e-5)


def test_chat_tokens_match_transformers_generate(converted):
    _, ref, model, variables = converted
    images = _images()
    with torch.no_grad():
        embeds = _reference_embeds(ref, images, BEFORE, AFTER, np.zeros((1, 0), np.int32))
        want = ref.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]),
                                           max_new_tokens=8, do_sample=False, num_beams=1).numpy()
    config = generate.GenerationConfig(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    after = np.broadcast_to(AFTER, (2, AFTER.shape[1]))
    got = minigpt4.chat(model, variables, jnp.asarray(images), after, config,
                        before=np.broadcast_to(BEFORE, (2, BEFORE.shape[1])))
    got = np.asarray(got.generated)[:, :want.shape[1]]
    print(f"\nanswers: {got.tolist()}")
    np.testing.assert_array_equal(got, want)
    assert len({tuple(row) for row in got.tolist()}) == 2       # the image leads somewhere


def test_assembled_files_are_checked(converted, tmp_path):
    """EVA's 40th block is left out (BLIP-2 builds 39); two files disagreeing on a key, or no LM, is an error."""
    tmp = converted[0]
    eva = {f"blocks.{i}.attn.qkv.weight": np.full((3, 1), i, np.float32) for i in range(40)}
    _save(eva, tmp_path / "eva.pth")
    state, notes, _ = blip2_lavis.assemble([str(tmp_path / "eva.pth")], "llama_model.")
    assert sorted(state) == sorted(f"visual_encoder.blocks.{i}.attn.qkv.weight" for i in range(39))
    assert "from 39 on left out" in notes[0]
    _save({"query_tokens": np.ones((1, Q, 128), np.float32)}, tmp_path / "other.pth")
    with pytest.raises(engine.ConversionError, match="query_tokens differs between"):
        blip2_lavis.assemble([str(tmp / "blip2_pretrained_flant5xxl.pth"), str(tmp_path / "other.pth")], "x.")
    with pytest.raises(engine.ConversionError, match="no llama_model.* keys: give the Vicuna folder"):
        api.plan_import("minigpt4", [str(tmp / "eva_vit_g.pth"), str(tmp / "pretrained_minigpt4.pth")])
    with pytest.raises(engine.ConversionError, match="takes one checkpoint, got 2"):
        api.plan_import("albef", [str(tmp / "eva_vit_g.pth"), str(tmp / "eva_vit_g.pth")])


def test_stage1_parts_are_dropped_with_a_note(converted):
    tmp = converted[0]
    files = [str(tmp / n) for n in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "vicuna",
                                    "pretrained_minigpt4.pth")]
    plan, _ = api.plan_import("minigpt4", files)
    assert any("BLIP-2 keys MiniGPT-4 does not use" in n and "itm_head.weight" in n for n in plan.notes)
    assert plan.fields["qformer_fields"]["num_queries"] == Q and plan.model_class == "mmjax.models.minigpt4.MiniGPT4"
    assert issubclass(minigpt4.MiniGPT4, blip2.Blip2LM)
