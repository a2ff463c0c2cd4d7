"""Official salesforce/BLIP checkpoints <-> mmjax (mmjax/convert/blip_official.py).

No official BLIP package can be built offline, so the reference is transformers' BLIP (random
weights, tiny dims, real structure; vision LayerNorm eps 1e-6 as BLIP's models/vit.py), whose state
dict is renamed to the official key names by `official_names` below, a mapping written from the
official source (models/vit.py: timm-style `visual_encoder.blocks.N.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}`; models/med.py: the BERT names transformers' BLIP text model also uses),
independently of the module under test. Official extras are added as the .pth files hold them:
`temp`, the position_ids buffers, the momentum copies and queues (retrieval), the pretraining
decoder's copies of the encoder weights it shares. Checked: `mmjax-convert --source blip` gives
transformers' ITM logits / ITC similarities (retrieval) and logits (captioner); a pretraining file
gives both, its decoder reading the shared weights; `--to blip` writes the official state dict back
exactly; bad checkpoints raise errors naming the problem; BLIP-base retrieval at real size maps
key for key (shapes only).
"""

import re

import jax
import numpy as np
import pytest
import torch
from references import require

import mmjax
from mmjax import pretrained
from mmjax.convert import api, blip_official, engine, io

transformers = require("transformers")

VISION = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=160, image_size=32,
              patch_size=8, layer_norm_eps=1e-6)      # heads = width / 64, as the import assumes
TEXT = dict(hidden_size=128, encoder_hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=160, vocab_size=99, max_position_embeddings=24, bos_token_id=97, sep_token_id=98,
            pad_token_id=0, eos_token_id=2)
VALID = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
# transformers' BLIP vision names -> the official ones (models/vit.py); the text names are med.py's.
OFFICIAL_NAMES = [
    (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(.*)", r"visual_encoder.patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(.*)", r"visual_encoder.blocks.\1.norm1.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(.*)", r"visual_encoder.blocks.\1.norm2.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(.*)", r"visual_encoder.blocks.\1.attn.qkv.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(.*)", r"visual_encoder.blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(.*)", r"visual_encoder.blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(.*)", r"visual_encoder.norm.\1"),
    (r"((text_encoder|text_decoder\.bert)\.(embeddings|encoder\.layer)|text_decoder\.cls|vision_proj|text_proj"
     r"|itm_head)\b.*", r"\g<0>"),
]


def official_names(hf_state: dict) -> dict[str, np.ndarray]:
    out = {}
    for key, value in hf_state.items():
        name = next((m.expand(new) for old, new in OFFICIAL_NAMES if (m := re.fullmatch(old, key))), None)
        assert name is not None, f"no official name for {key}"
        out[name] = value.detach().numpy().copy()
    for prefix in ("text_encoder", "text_decoder.bert"):    # med.py's BertEmbeddings buffer
        if f"{prefix}.embeddings.word_embeddings.weight" in out:
            out[f"{prefix}.embeddings.position_ids"] = np.arange(TEXT["max_position_embeddings"])[None]
    return out


def _reference(cls, seed: int):
    """transformers draws BLIP's vision weights at std 1e-10: redraw every weight (and move the
    1-D ones off 0/1) so a mis-mapped parameter cannot hide."""
    torch.manual_seed(seed)
    config = transformers.BlipConfig(vision_config=VISION, text_config=TEXT, image_text_hidden_size=16)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embeddings.word" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, TEXT["vocab_size"] - 2, (2, 6)).astype(np.int32)
    tokens[:, 0] = TEXT["bos_token_id"]
    tokens[~VALID] = 0
    return rng.normal(size=(2, 32, 32, 3)).astype(np.float32), tokens


@torch.no_grad()
def _torch_outputs(model, images, tokens) -> dict[str, np.ndarray]:
    kwargs = dict(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(VALID).long(),
                  pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    if isinstance(model, transformers.BlipForConditionalGeneration):
        return {"logits": model(**kwargs).logits.numpy()}
    return {"itm_logits": model(**kwargs, use_itm_head=True).itm_score.numpy(),
            "similarity": model(**kwargs, use_itm_head=False).itm_score.numpy()}


def _mmjax_outputs(model, variables, images, tokens) -> dict[str, np.ndarray]:
    out = dict(jax.jit(model.apply)(variables, images, tokens, VALID))
    if "image_embeds" in out:
        out["similarity"] = np.asarray(out["image_embeds"] @ out["text_embeds"].T)
    return out


@pytest.fixture(scope="module")
def references():
    retrieval = _reference(transformers.BlipForImageTextRetrieval, seed=1)
    captioner = _reference(transformers.BlipForConditionalGeneration, seed=2)
    images, tokens = _inputs()
    states = {"retrieval": {**official_names(retrieval.state_dict()), "temp": np.array(0.05, np.float32)},
              "captioner": official_names(captioner.state_dict())}
    return {"models": {"retrieval": retrieval, "captioner": captioner}, "states": states,
            "want": {k: _torch_outputs(m, images, tokens) for k, m in (("retrieval", retrieval),
                                                                        ("captioner", captioner))}}


def _training_state(state: dict) -> dict:
    """The momentum copies and queues BLIP_Retrieval's files also hold."""
    rng = np.random.default_rng(5)
    extra = {k.replace(p, f"{p}_m", 1): v + 0.01 for k, v in state.items()
             for p in ("visual_encoder", "text_encoder", "vision_proj", "text_proj") if k.startswith(p + ".")}
    extra.update(image_queue=rng.normal(size=(16, 32)).astype(np.float32),
                 text_queue=rng.normal(size=(16, 32)).astype(np.float32),
                 idx_queue=np.full((1, 32), -100, np.int64), ptr_queue=np.zeros((1,), np.int64))
    return extra


def _save_pth(path, state: dict) -> str:
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, "epoch": 0}, str(path))
    return str(path)


def _assert_exact(written: dict, state: dict) -> None:
    assert sorted(written) == sorted(state)
    for key, value in state.items():
        assert np.asarray(written[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["retrieval", "captioner"])
def test_cli_import_matches_transformers_and_export_round_trips(references, tmp_path, convert, diff, name):
    state = references["states"][name]
    extra = _training_state(state) if name == "retrieval" else {}
    convert("--source", "blip", "--checkpoint", _save_pth(tmp_path / "official.pth", {**state, **extra}),
            "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert type(model).__name__ == {"retrieval": "BlipRetrieval", "captioner": "BlipCaptioner"}[name]
    got = _mmjax_outputs(model, variables, *_inputs())
    for key, value in references["want"][name].items():
        assert diff(got[key], value, f"official BLIP {name} {key}") <= 1e-5
    if name == "retrieval":
        assert float(got["logit_scale"]) == pytest.approx(1 / 0.05)
        plan, _ = api.plan_import("blip", str(tmp_path / "official.pth"))
        assert "momentum" in plan.notes[0] and "idx_queue" in plan.notes[0]
    convert("--to", "blip", "--input", tmp_path / "mm", "--output", tmp_path / "back.pth")
    _assert_exact(io.read_state_dict(str(tmp_path / "back.pth")), state)


def _pretraining_state(states: dict) -> dict:
    """model_base.pth's layout: the retrieval modules plus the decoder, which repeats every encoder
    weight but its self-attention (blip_pretrain.py ties them), its LM decoder tied to them too."""
    state = dict(states["retrieval"])
    for key, value in states["captioner"].items():
        if key.startswith("text_decoder."):
            shared = key.replace("text_decoder.bert.", "text_encoder.", 1)
            own = ".attention." in key or key.startswith("text_decoder.cls.") or shared not in state
            state[key] = value if own else state[shared]
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_encoder.embeddings.word_embeddings.weight"]
    state["queue_ptr"] = np.zeros((1,), np.int64)
    return state


def _convert(state: dict):
    plan = blip_official.from_official(state)
    module = pretrained.build(plan.model_class, plan.fields)
    flat = engine.to_mmjax(state, plan.table, pretrained.abstract_params(module, plan.inputs))
    return plan, module, {"params": engine.unflatten(flat)}


def test_pretraining_checkpoint_shares_the_encoder_weights(references, diff):
    state = _pretraining_state(references["states"])
    plan, module, variables = _convert(state)
    assert plan.model_class == blip_official.PRETRAIN and "queue_ptr" in plan.notes[0]
    captioner = references["models"]["captioner"]
    # The reference decoder: transformers' captioner with the pretraining decoder's (partly shared) weights.
    decoder = {k[len("text_decoder."):]: torch.from_numpy(np.asarray(v)) for k, v in state.items()
               if k.startswith("text_decoder.") and not k.endswith("position_ids")}
    original = {k: v.clone() for k, v in captioner.state_dict().items()}
    captioner.text_decoder.load_state_dict(decoder)
    captioner.vision_model.load_state_dict(references["models"]["retrieval"].vision_model.state_dict())
    try:
        want = {**references["want"]["retrieval"], **_torch_outputs(captioner, *_inputs())}
    finally:
        captioner.load_state_dict(original)
    got = _mmjax_outputs(module, variables, *_inputs())
    for key, value in want.items():
        assert diff(got[key], value, f"official BLIP pretraining {key}") <= 1e-5
    export = api.as_export(blip_official.official_export({"class": plan.model_class, "fields": plan.fields}))
    written = export.state_dict(engine.flatten(variables["params"]), what="BLIP state dict")
    _assert_exact(written, {k: v for k, v in state.items() if k != "queue_ptr"})


def test_vqa_checkpoint_maps_every_key_and_round_trips(references):
    """model_base_vqa_capfilt_large.pth's layout: question encoder + answer decoder, no ITM head
    (its parity through these modules is transformers' BlipForQuestionAnswering's: test_hf_blip.py)."""
    states = references["states"]
    state = {**{k: v for k, v in states["retrieval"].items() if k.startswith(("visual_encoder.", "text_encoder."))},
             **{k: v for k, v in states["captioner"].items() if k.startswith("text_decoder.")}}
    plan, _, variables = _convert(state)
    assert plan.model_class == blip_official.QUESTION_ANSWERING and len(plan.inputs) == 5
    export = api.as_export(blip_official.official_export({"class": plan.model_class, "fields": plan.fields}))
    _assert_exact(export.state_dict(engine.flatten(variables["params"]), what="BLIP state dict"), state)


def test_bad_checkpoints_name_the_problem(references):
    state = references["states"]["retrieval"]
    plan, module, _ = _convert(state)
    broken = dict(state)
    del broken["visual_encoder.blocks.1.norm2.weight"]
    broken["itm_head.weight"] = np.zeros((3, 128), np.float32)
    broken["text_encoder.pooler.dense.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(engine.ConversionError) as err:
        engine.to_mmjax(broken, plan.table, pretrained.abstract_params(module, plan.inputs))
    for text in ("vision_model/encoder/layer_1/ln2/scale", "itm_head.weight: checkpoint has (3, 128)",
                 "text_encoder.pooler.dense.weight"):
        assert text in str(err.value), str(err.value)
    caption = dict(references["states"]["captioner"])
    caption["text_decoder.cls.predictions.decoder.bias"] = caption["text_decoder.cls.predictions.bias"] + 1
    with pytest.raises(engine.ConversionError, match="untied LM decoder"):
        blip_official.from_official(caption)
    pretraining = _pretraining_state(references["states"])
    pretraining["text_decoder.bert.encoder.layer.1.output.dense.bias"] = np.zeros(128, np.float32)
    with pytest.raises(engine.ConversionError, match="shares every decoder weight"):
        blip_official.from_official(pretraining)
    base = {k: v for k, v in state.items() if k.startswith(("visual_encoder.", "text_encoder."))}
    with pytest.raises(engine.ConversionError, match="BLIP_Base"):
        blip_official.from_official(base)
    transformers_eps = {**plan.fields, "vision": {**plan.fields["vision"], "ln_eps": 1e-5}}   # transformers' default
    with pytest.raises(engine.ConversionError, match=r"BLIP vision tower checkpoint: ln_eps=1e-05 \(needs 1e-06"):
        blip_official.official_export({"class": plan.model_class, "fields": transformers_eps})
    with pytest.raises(engine.ConversionError, match="Not a BLIP checkpoint"):
        blip_official.from_official({"cls_token": np.zeros((1, 1, 8), np.float32)})


def test_real_size_blip_base_retrieval_maps_key_for_key():
    """model_base_retrieval_coco.pth's structure (ViT-B/16 at 384, BERT-base, 30524 tokens), shapes only."""
    config = transformers.BlipConfig(vision_config={"layer_norm_eps": 1e-6}, image_text_hidden_size=256)
    with torch.device("meta"):
        hf = transformers.BlipForImageTextRetrieval(config)
    state = {official: value for key, value in hf.state_dict().items()
             for old, new in OFFICIAL_NAMES if (m := re.fullmatch(old, key)) for official in (m.expand(new),)}
    state["temp"] = torch.zeros((), device="meta")
    assert len(state) == len(hf.state_dict()) + 1
    plan = blip_official.from_official(state)
    assert plan.fields["vision"]["num_heads"] == 12 and plan.fields["text"]["vocab_size"] == 30524
    assert plan.inputs[0]["shape"] == [1, 384, 384, 3]
    module = pretrained.build(plan.model_class, plan.fields)
    expected = {p: tuple(s.shape) for p, s in pretrained.abstract_params(module, plan.inputs).items()}
    filled = []
    for key, value in state.items():      # engine.to_mmjax's shape check, fused qkv included, reading no array
        if key.endswith("position_ids"):
            continue
        rl, match = next((r, m) for r, t in zip(plan.table.rules, plan.table._torch_res) if (m := t.fullmatch(key)))
        paths = [p.format(**match.groupdict()) for p in rl.mmjax_paths]
        parts = [rl.transform.torch_shape(expected[p]) for p in paths]
        want = parts[0] if len(parts) == 1 else (sum(s[0] for s in parts), *parts[0][1:])
        assert tuple(value.shape) == tuple(want), key
        filled += paths
    assert sorted(filled) == sorted(expected)
