"""mmjax.flops: analytic FLOPs against XLA's cost analysis of the compiled (unrolled) model, the
FLIP cost reduction, the tasks' training FLOPs, and the peak table / MFU the trainer logs."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mmjax import flops, tasks
from mmjax.models import clip, vit

# Wide enough that matmuls dominate as in real models (XLA's extra count shrinks with width).
VIT = {"width": 256, "depth": 2, "num_heads": 4, "mlp_dim": 1024, "patch_size": 8}
TEXT = {"vocab_size": 100, "context_length": 24, "width": 256, "depth": 2, "num_heads": 4}


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _abstract_params(model, *inputs):
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)


def _vit_step_flops(model, images, train_mode):
    """XLA FLOPs of a forward pass, or of forward + backward (grad w.r.t. the parameters)."""
    variables = _abstract_params(model, images)
    if not train_mode:
        return _xla_flops(lambda v, x: model.apply(v, x), variables, images)

    def loss(v, x):
        return model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}).sum()
    return _xla_flops(jax.grad(loss), variables, images)


@pytest.mark.parametrize("train_mode", [False, True], ids=["forward", "train"])
def test_vit_analytic_flops_match_xla(train_mode):
    model = vit.ViT(**VIT, num_classes=10)
    images = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
    parts = flops.vit_flops(model, (64, 64))
    analytic = 4 * flops.total(parts)
    if train_mode:   # the images need no gradient: XLA skips the patch embedding's input gradient
        analytic = flops.TRAIN_FACTOR * analytic - 4 * parts["patch_embed"]
    xla = _vit_step_flops(model, images, train_mode)
    print(f"ViT {'train' if train_mode else 'forward'}: XLA / analytic = {xla / analytic:.4f}")
    # XLA also counts norms, softmax, GELU, (in training) their gradients and the attention
    # probabilities the backward recomputes: a few % more.
    assert 1.0 <= xla / analytic < 1.06


def test_clip_analytic_flops_match_xla():
    model = clip.CLIP(embed_dim=64, image=VIT, text=TEXT)
    images = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((4, 24), jnp.int32)
    variables = _abstract_params(model, images, tokens)
    xla = _xla_flops(lambda v, x, t: model.apply(v, x, t), variables, images, tokens)
    parts = flops.clip_flops(model, (64, 64), 24)
    analytic = 4 * flops.total(parts)
    print(f"CLIP forward: XLA / analytic = {xla / analytic:.4f}")
    assert 1.0 <= xla / analytic < 1.06
    assert parts["logits"] == 0 and flops.clip_flops(model, (64, 64), 24, batch_size=4)["logits"] == 2 * 4 * 64


def test_scanned_model_is_counted_once_by_xla():
    """Why benchmarks compare FLOPs on the unrolled model: XLA counts a scan body once."""
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    unrolled = _vit_step_flops(vit.ViT(**dict(VIT, depth=4)), images, False)
    scanned = _vit_step_flops(vit.ViT(**dict(VIT, depth=4), scan=True), images, False)
    assert scanned < 0.5 * unrolled


def test_patch_dropping_halves_the_image_tower_cost():
    model = vit.ViT(variant="B/16", patch_drop_ratio=0.5)
    full = flops.vit_flops(model, (224, 224), train=False)
    dropped = flops.vit_flops(model, (224, 224), train=True)
    ratio = flops.total(dropped) / flops.total(full)
    assert flops.vit_tokens(model, (224, 224), train=True) == 1 + 98
    assert 0.45 < ratio < 0.52, ratio

    small = vit.ViT(**VIT, patch_drop_ratio=0.5)
    images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)   # 256 patches
    xla_ratio = _vit_step_flops(small, images, True) / _vit_step_flops(vit.ViT(**VIT), images, True)
    analytic_ratio = (flops.total(flops.vit_flops(small, (128, 128), train=True))
                      / flops.total(flops.vit_flops(small, (128, 128))))
    print(f"patch_drop_ratio 0.5: analytic ViT-B/16 cost x{ratio:.3f}; compiled small-ViT train step "
          f"x{xla_ratio:.3f} (analytic x{analytic_ratio:.3f})")
    assert 0.45 < xla_ratio < 0.55 and abs(xla_ratio - analytic_ratio) < 0.03


def test_vit_b16_forward_is_the_known_count():
    # 17.6 GMACs per 224-px image for ViT-B/16 (the figure timm and the DeiT paper quote).
    gflops = flops.total(flops.vit_flops(vit.ViT(variant="B/16", num_classes=1000), (224, 224))) / 1e9
    assert abs(gflops / 2 - 17.6) < 0.1, gflops


def test_remat_recompute():
    parts = flops.vit_flops(vit.ViT(variant="B/16"), (224, 224))
    assert flops.remat_recompute_flops(parts, "none") == 0
    assert flops.remat_recompute_flops(parts, "full") == parts["blocks_linear"] + parts["blocks_attention"]
    assert flops.remat_recompute_flops(parts, "dots_no_batch") == parts["blocks_attention"]


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989),
                                       ("NVIDIA A100-SXM4-40GB", 312), ("TPU v4", 275), ("TPU v5 lite", 197),
                                       ("TPU v5p", 459), ("TPU v6 lite", 918), ("NVIDIA H100 PCIe", 756),
                                       ("cpu", None)])
def test_peak_table(kind, peak):
    assert flops.peak_tflops(kind) == peak
    assert flops.mfu(100e12, kind) == (None if peak is None else pytest.approx(100 / peak))


def test_throughput():
    got = flops.throughput(2e9, 1000.0, 4, "NVIDIA H100 80GB HBM3")
    assert got == {"tflops_per_device": pytest.approx(0.5), "mfu": pytest.approx(0.5 / 989)}
    assert flops.throughput(2e9, 1000.0, 4, "cpu") == {"tflops_per_device": pytest.approx(0.5)}


def _task(name, model):
    c = ml_collections.ConfigDict({"task": name, "model": model})
    if name == "contrastive":
        c.input = {"tokenizer": {"name": "shapes", "context_length": 24}}
    return tasks.get_task(c)


def test_tasks_report_training_flops():
    task = _task("classification", dict(VIT, num_classes=10, patch_drop_ratio=0.5))
    got = task.train_flops_per_example({"image": (32, 64, 64, 3), "label": (32,)})
    assert got == 3 * flops.total(flops.vit_flops(task.model, (64, 64), train=True))
    task = _task("contrastive", {"embed_dim": 64, "image": VIT, "text": TEXT})
    got = task.train_flops_per_example({"image": (32, 64, 64, 3), "text": (32, 24)})
    assert got == 3 * flops.total(flops.clip_flops(task.model, (64, 64), 24, batch_size=32, train=True))
