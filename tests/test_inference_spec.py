"""Inference specs of converted checkpoints: the pp strings follow timm / transformers / open_clip's
own evaluation transforms, run through mmjax's preprocessing, and the stored keys win."""

import numpy as np
import pytest

from mmjax import inference_spec
from mmjax.data import image_ops, preprocess


def _config(cls="mmjax.models.vit.ViT", size=224, source=None, **fields):
    return {"class": cls, "fields": fields, "inputs": [{"shape": [1, size, size, 3], "dtype": "float32"}],
            "source": source or {}}


def _run(pp, size=300):
    image = np.random.default_rng(0).integers(0, 256, size=(size, size + 40, 3), dtype=np.uint8)
    return preprocess.Preprocess(pp)({"image": image}, np.random.default_rng(0))["image"]


def test_timm_pp_uses_the_models_pretrained_config():
    # timm's vit_base_patch16_224: crop_pct 0.9, bicubic, mean = std = 0.5 (the same as value_range(-1, 1))
    spec = inference_spec.spec(_config(source={"library": "timm", "model": "vit_base_patch16_224"}, num_classes=1000))
    assert spec == {"preprocess": "resize_small(248, 'bicubic')|central_crop(224)|value_range(-1, 1)",
                    "tokenizer": None, "class_names": None, "kind": "classifier"}
    unknown = inference_spec.spec(_config(source={"library": "timm", "model": "not_a_timm_model"}))
    assert unknown["preprocess"] == "resize_small(256, 'bicubic')|central_crop(224)|normalize('imagenet')"
    # Conversion records no timm transform (that would import torch); `spec` looks it up when used.
    assert inference_spec.for_source(_config(source={"library": "timm", "model": "vit_base_patch16_224"}))[
        "preprocess"] is None
    out = _run(spec["preprocess"])
    assert out.shape == (224, 224, 3) and out.dtype == np.float32 and -1 <= out.min() < out.max() <= 1


def test_siglip_sources_get_siglips_transform_and_no_clip_tokenizer():
    """A SigLIP (a CLIP with a logit bias) tokenizes with SentencePiece, which is not carried over:
    no tokenizer is recorded (zero-shot then asks for one instead of using CLIP's BPE), and its
    images are squashed to size and mapped to [-1, 1] as open_clip's SigLIP transform does."""
    fields = {"image": {"patch_size": 16}, "text": {"context_length": 64}, "logit_bias_init": -10.0}
    spec = inference_spec.for_source(_config("mmjax.models.clip.CLIP", 256, {"library": "open_clip"}, **fields))
    assert spec["tokenizer"] is None and spec["preprocess"] == "resize(256, 'bicubic')|value_range(-1,1)"
    out = _run(spec["preprocess"])
    assert out.shape == (256, 256, 3) and -1 <= out.min() < out.max() <= 1


def test_clip_sources_get_the_clip_transform_and_tokenizer():
    fields = {"image": {"patch_size": 16}, "text": {"context_length": 77}}
    for library in ("open_clip", "hf"):
        spec = inference_spec.spec(_config("mmjax.models.clip.CLIP", 336, {"library": library}, **fields))
        assert spec == {"preprocess": "resize_small(336, 'bicubic')|central_crop(336)|normalize('clip')",
                        "tokenizer": {"name": "clip", "context_length": 77}, "class_names": None,
                        "kind": "contrastive"}
    out = _run(spec["preprocess"])
    want = image_ops.normalize(image_ops.central_crop(image_ops.resize_small(
        np.random.default_rng(0).integers(0, 256, size=(300, 340, 3), dtype=np.uint8), 336, "bicubic"), 336), "clip")
    np.testing.assert_array_equal(out, want)


def test_hf_preprocessor_config_and_labels_are_read():
    processor = {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    hf = {"library": "hf", "config": {"id2label": {"1": "dog", "0": "cat"}}}
    out = inference_spec.for_source(_config(source=hf, num_classes=2), processor)
    assert out == {"preprocess": "resize((224, 224), 'bilinear')|value_range(-1, 1)", "tokenizer": None,
                   "class_names": ["cat", "dog"]}
    clip_processor = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                      "do_center_crop": True, "resample": 3, "image_mean": image_ops.NORMALIZE_PRESETS["clip"][0],
                      "image_std": image_ops.NORMALIZE_PRESETS["clip"][1]}
    want = "resize_small(224, 'bicubic')|central_crop((224, 224))|normalize('clip')"
    assert inference_spec.hf_pp(clip_processor) == want
    placeholders = {"library": "hf", "config": {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}}
    assert inference_spec.for_source(_config(source=placeholders, num_classes=2))["class_names"] is None
    odd = inference_spec.normalize_op((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert odd == "normalize((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))" and _run(odd).dtype == np.float32


def test_stored_keys_win_and_eval_pp_keeps_only_image_ops():
    stored = dict(_config(source={"library": "timm", "model": "vit_base_patch16_224"}), preprocess="resize(32)",
                  tokenizer=None, class_names=["a", "b"])
    assert inference_spec.spec(stored)["preprocess"] == "resize(32)"
    assert inference_spec.image_pp("decode|resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')"
                                   "|rename(label='y')|keep('image','text')") == "resize(32)|value_range(-1,1)"
    assert inference_spec.image_pp("keep('image')") is None and inference_spec.image_pp(None) is None
    with pytest.raises(ValueError, match="cannot parse pp op"):
        inference_spec.image_pp("resize(32")
