"""timm's EVA-CLIP ViT-g/14 (`eva_giant_patch14_clip_224`, BLIP-2's vision tower before it drops the last
block) <-> mmjax ViT with q and v biases but no k bias (`qkv_bias="qv"`): the same logits as timm's Eva
at its real structure with small dimensions, the exact state dict back, and the published size's table
checked by shapes only (timm on the meta device against jax.eval_shape)."""

import jax
import numpy as np
from blip2_names import shape_problems
from references import require

from mmjax import pretrained
from mmjax.convert import engine, library_configs
from mmjax.convert import vit as vit_convert
from mmjax.models import vit

torch = require("torch")
timm = require("timm")

NAME = "eva_giant_patch14_clip_224"
SMALL = dict(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=1.5, num_classes=16)


def test_small_eva_matches_timm_both_ways(randomize, diff):
    from timm.models.eva import Eva
    torch.manual_seed(0)
    ref = randomize(Eva(**SMALL, global_pool="token"), seed=2)
    with torch.no_grad():       # timm scales the head's init down: the logits would show only its bias
        ref.head.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert "blocks.0.attn.q_bias" in state and not any(k.endswith("k_bias") for k in state)
    fields, _ = vit_convert.timm_architecture(NAME)
    fields.update(width=64, depth=2, num_heads=4, mlp_dim=96, patch_size=14, num_classes=16)
    model = vit.ViT(**fields)
    inputs = [pretrained.input_spec((1, 28, 28, 3))]
    params = engine.to_mmjax(state, vit_convert.EVA_TABLE, pretrained.abstract_params(model, inputs))
    assert "encoder/layer_0/attn/query/bias" in params and "encoder/layer_0/attn/key/bias" not in params
    images = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    got = jax.jit(model.apply)({"params": engine.unflatten(params)}, images)["logits"]
    assert diff(got, want, "EVA logits") <= 5e-6            # measured 1e-6 (logits up to ~2.5)
    back = engine.to_torch(params, vit_convert.EVA_TABLE)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    config = {"class": "mmjax.models.vit.ViT", "fields": fields, "inputs": inputs}
    assert library_configs.timm_vit_config(config)["architecture"] == NAME


def test_published_eva_g_table_by_shape():
    with torch.device("meta"):
        ref = timm.create_model(NAME, pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    plan = vit_convert.from_timm(NAME, {k: np.zeros(s, np.float32) if k == "head.weight" else np.empty(0)
                                        for k, s in shapes.items()})
    assert plan.fields["num_classes"] == 1024 and plan.fields["qkv_bias"] == "qv"
    scanned = pretrained.build(plan.model_class, {**plan.fields, "scan": True})
    expected = pretrained.abstract_params(scanned, plan.inputs)
    layers = {p.replace("encoder/layers/", f"encoder/layer_{i}/"): s.shape[1:]
              for p, s in expected.items() if "encoder/layers/" in p for i in range(40)}
    expected = {**{p: s.shape for p, s in expected.items() if "encoder/layers/" not in p}, **layers}
    assert shape_problems(plan.table, shapes, expected) == []       # every key placed, every parameter filled
