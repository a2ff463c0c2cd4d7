"""mmjax.flops and every family's `forward_flops`: analytic FLOPs against XLA's cost analysis of
the compiled (unrolled) model and of every task's training step, the FLIP cost reduction, and the
peak table / MFU the trainer logs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mmjax import configs, flops, tasks
from mmjax.models import beit, clip, dvae, mae, vit

# Wide enough that matmuls dominate as in real models (XLA's extra count shrinks with width).
VIT = {"width": 256, "depth": 2, "num_heads": 4, "mlp_dim": 1024, "patch_size": 8}
TEXT = {"vocab_size": 100, "context_length": 24, "width": 256, "depth": 2, "num_heads": 4}
LM = dict(kind="llama", width=64, depth=2, num_heads=4, mlp_dim=128, vocab_size=80, max_len=64)
DECODER = {"decoder_width": 128, "decoder_depth": 2, "decoder_heads": 4, "decoder_mlp_dim": 512}
IMAGES = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)       # 8x8 patches of 8 px


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _abstract_params(model, *inputs):
    return jax.eval_shape(model.init, jax.random.key(0), *inputs)


def _primary(out) -> jax.Array:
    """The model's main result (a loss stand-in): logits, MAE's pixel predictions or features."""
    return next(out[k] for k in ("logits", "pred", "pooled") if k in out)


def _step_flops(model, inputs, train_mode, **kwargs):
    """XLA FLOPs of a forward pass, or of forward + backward (grad w.r.t. the parameters)."""
    variables = _abstract_params(model, *inputs)
    if not train_mode:
        return _xla_flops(lambda v, *x: model.apply(v, *x, **kwargs), variables, *inputs)

    def loss(v, *x):
        out = _primary(model.apply(v, *x, train=True, rngs={"dropout": jax.random.key(0)}, **kwargs))
        return jnp.square(out).sum()   # not .sum(): XLA turns matmuls with a constant cotangent into sums
    return _xla_flops(jax.grad(loss), variables, *inputs)


def _check_against_xla(name, parts, xla, train_mode, batch=4):
    analytic = batch * flops.total(parts)
    if train_mode:   # the images need no gradient: XLA skips the patch embedding's input gradient
        analytic = flops.TRAIN_FACTOR * analytic - batch * parts["patch_embed"]
    print(f"{name} {'train' if train_mode else 'forward'}: XLA / analytic = {xla / analytic:.4f}")
    # XLA also counts norms, softmax, GELU, (in training) their gradients and the attention
    # probabilities the backward recomputes: a few % more.
    assert 1.0 <= xla / analytic < 1.06


TRAIN_OR_FORWARD = pytest.mark.parametrize("train_mode", [False, True], ids=["forward", "train"])


@TRAIN_OR_FORWARD
def test_vit_analytic_flops_match_xla(train_mode):
    model = vit.ViT(**VIT, num_classes=10)
    _check_against_xla("ViT", vit.forward_flops(model, (64, 64)), _step_flops(model, [IMAGES], train_mode),
                       train_mode)


def test_clip_analytic_flops_match_xla():
    model = clip.CLIP(embed_dim=64, image=VIT, text=TEXT)
    tokens = jax.ShapeDtypeStruct((4, 24), jnp.int32)
    variables = _abstract_params(model, IMAGES, tokens)
    xla = _xla_flops(lambda v, x, t: model.apply(v, x, t), variables, IMAGES, tokens)
    parts = clip.forward_flops(model, (64, 64), 24)
    _check_against_xla("CLIP", parts, xla, train_mode=False)
    assert parts["logits"] == 0 and clip.forward_flops(model, (64, 64), 24, batch_size=4)["logits"] == 2 * 4 * 64


@TRAIN_OR_FORWARD
def test_mae_analytic_flops_match_xla(train_mode):
    """The encoder on the 16 visible patches (+ [CLS]), the decoder on all 64 (+ [CLS])."""
    model = mae.MAE(**VIT, **DECODER)
    noise = jax.ShapeDtypeStruct((4, 64), jnp.float32)
    parts = mae.forward_flops(model, (64, 64))
    _check_against_xla("MAE", parts, _step_flops(model, [IMAGES, noise], train_mode), train_mode)
    unmasked = mae.forward_flops(mae.MAE(**VIT, **DECODER, mask_ratio=0.0), (64, 64))
    assert parts["blocks_linear"] == pytest.approx(unmasked["blocks_linear"] * 17 / 65)
    assert parts["decoder_blocks_linear"] == unmasked["decoder_blocks_linear"]


@TRAIN_OR_FORWARD
@pytest.mark.parametrize("fields", [dict(vocab_size=512, rel_pos="shared"), dict(num_classes=10, rel_pos="layer")],
                         ids=["pretraining", "classifier"])
def test_beit_analytic_flops_match_xla(fields, train_mode):
    model = beit.BEiT(**VIT, **fields)
    inputs = [IMAGES]
    if "vocab_size" in fields:
        inputs.append(jax.ShapeDtypeStruct((4, 64), jnp.bool_))
    parts = beit.forward_flops(model, (64, 64))
    assert parts["rel_pos_bias"] == 2 * 4 * 65 * 65 and parts["head"] > 0
    _check_against_xla(f"BEiT {'vocab' if 'vocab_size' in fields else 'classes'}", parts,
                       _step_flops(model, inputs, train_mode), train_mode)


def test_convolutions_count_the_kernel_taps_inside_the_input():
    """SAME padding: taps on the zero border multiply nothing (XLA leaves them out too)."""
    assert flops.conv((32, 32), (3, 3), 1, 1) == 2 * (32 * 3 - 2) ** 2
    assert flops.conv((32, 32), (7, 7), 3, 8) == 2 * (32 * 7 - 12) ** 2 * 3 * 8
    assert flops.conv((32, 32), (3, 3), 1, 1, stride=2) == 2 * (16 * 3 - 1) ** 2     # SAME pads (0, 1)
    assert flops.patch_embed((224, 224), (16, 16), 3, 768) == 2 * 196 * 16 * 16 * 3 * 768


def test_dvae_encoder_analytic_flops_match_xla():
    model = dvae.DVAEEncoder(n_hid=64, blocks_per_group=2, vocab_size=512)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    xla = _xla_flops(lambda v, x: model.apply(v, x), _abstract_params(model, images), images)
    analytic = 2 * flops.total(dvae.encoder_flops(model, (32, 32)))
    print(f"dVAE encoder forward: XLA / analytic = {xla / analytic:.4f}")
    assert 1.0 <= xla / analytic < 1.06


def test_scanned_model_is_counted_once_by_xla():
    """Why benchmarks compare FLOPs on the unrolled model: XLA counts a scan body once."""
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    unrolled = _xla_flops(lambda v, x: vit.ViT(**dict(VIT, depth=4)).apply(v, x),
                          _abstract_params(vit.ViT(**dict(VIT, depth=4)), images), images)
    scanned_model = vit.ViT(**dict(VIT, depth=4), scan=True)
    scanned = _xla_flops(lambda v, x: scanned_model.apply(v, x), _abstract_params(scanned_model, images), images)
    assert scanned < 0.5 * unrolled


def test_patch_dropping_halves_the_image_tower_cost():
    model = vit.ViT(variant="B/16", patch_drop_ratio=0.5)
    full = vit.forward_flops(model, (224, 224), train=False)
    dropped = vit.forward_flops(model, (224, 224), train=True)
    ratio = flops.total(dropped) / flops.total(full)
    assert vit.tokens_seen(model, (224, 224), train=True) == 1 + 98
    assert 0.45 < ratio < 0.52, ratio

    small = vit.ViT(**VIT, patch_drop_ratio=0.5)
    images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)   # 256 patches
    xla_ratio = _step_flops(small, [images], True) / _step_flops(vit.ViT(**VIT), [images], True)
    analytic_ratio = (flops.total(vit.forward_flops(small, (128, 128), train=True))
                      / flops.total(vit.forward_flops(small, (128, 128))))
    print(f"patch_drop_ratio 0.5: analytic ViT-B/16 cost x{ratio:.3f}; compiled small-ViT train step "
          f"x{xla_ratio:.3f} (analytic x{analytic_ratio:.3f})")
    assert 0.45 < xla_ratio < 0.55 and abs(xla_ratio - analytic_ratio) < 0.03


def test_known_counts():
    # 17.6 GMACs per 224-px image for ViT-B/16 (the figure timm and the DeiT paper quote).
    gflops = flops.total(vit.forward_flops(vit.ViT(variant="B/16", num_classes=1000), (224, 224))) / 1e9
    assert abs(gflops / 2 - 17.6) < 0.1, gflops
    # BEiT-B/16's backbone is ViT-B/16's; its 8192-way token head on 196 patches adds 2.5 GFLOPs.
    parts = beit.forward_flops(beit.BEiT(variant="B/16", vocab_size=8192), (224, 224))
    assert parts["head"] == 2 * 196 * 768 * 8192


def test_remat_recompute():
    parts = vit.forward_flops(vit.ViT(variant="B/16"), (224, 224))
    assert flops.remat_recompute_flops(parts, "none") == 0
    assert flops.remat_recompute_flops(parts, "full") == parts["blocks_linear"] + parts["blocks_attention"]
    assert flops.remat_recompute_flops(parts, "dots_no_batch") == parts["blocks_attention"]
    both = mae.forward_flops(mae.MAE(variant="B/16"), (224, 224))   # encoder and decoder stacks
    assert flops.remat_recompute_flops(both, "dots_no_batch") == both["blocks_attention"] + both[
        "decoder_blocks_attention"]


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


# ---------------------------------------------------------------------------------------------
# Every task's training FLOPs against XLA's count of its (unrolled) training step
# ---------------------------------------------------------------------------------------------

BEIT_SMOKE = "experiments/beit/in1k_pretrain.py:smoke=True"
MOMENTUM_SMOKE = "experiments/clip/shapes_momentum.py:smoke=True"
TOKENIZER = {"checkpoint": "random", "image_size": 64, "n_hid": 64, "blocks_per_group": 1, "vocab_size": 512}


def _task(name):
    """A task of every kind with unrolled, matmul-dominated models; (task, batch shapes, the
    per-example FLOPs of its patch embeddings, whose input gradient XLA skips)."""
    image = (4, 64, 64, 3)
    if name == "beit":
        config = configs.load_config(BEIT_SMOKE)
        config.model.update(VIT, vocab_size=512, scan=False)
        config.tokenizer.update(TOKENIZER)
    elif name == "contrastive_momentum":
        config = configs.load_config(MOMENTUM_SMOKE)
        config.model = {"embed_dim": 64, "image": VIT, "text": TEXT}
        config.input.batch_size = image[0]
        config.input.tokenizer.context_length = 24
        config.momentum.queue_size = 4 * image[0]
    else:
        models = {"classification": dict(VIT, num_classes=10, patch_drop_ratio=0.5),
                  "beit_classification": dict(VIT, num_classes=10, rel_pos="layer"),
                  "mae": dict(VIT, **DECODER),
                  "contrastive": {"embed_dim": 64, "image": VIT, "text": TEXT},
                  "causal_lm": LM,
                  "resampler_lm": {"vision": VIT, "resampler": {"depth": 2, "num_heads": 4, "head_dim": 16,
                                                                "num_latents": 8}, "lm": LM}}
        if name not in models:
            pytest.fail(f"task {name!r} has no case here: every task must report its training FLOPs")
        model = models[name]
        config = ml_collections.ConfigDict({"task": name, "model": model, "optimizer": {}})
        if name in ("contrastive", "causal_lm", "resampler_lm"):
            config.input = {"tokenizer": {"name": "shapes", "context_length": 24}}
    task = tasks.get_task(config)
    shapes = {"image": image, "label": (4,), "text": (4, 24)}
    clip_patch_embed = lambda m: {"patch_embed": clip.forward_flops(m, (64, 64), 24)["image_patch_embed"]}  # noqa: E731
    family = {"classification": lambda m: vit.forward_flops(m, (64, 64), train=True),
              "contrastive": clip_patch_embed, "contrastive_momentum": clip_patch_embed,
              "mae": lambda m: mae.forward_flops(m, (64, 64)),
              "beit": lambda m: beit.forward_flops(m, (64, 64)),
              "beit_classification": lambda m: beit.forward_flops(m, (64, 64)),
              "causal_lm": lambda m: {"patch_embed": 0.0},
              "resampler_lm": lambda m: {"patch_embed": flops.TRAIN_FACTOR * vit.forward_flops(
                  m.vision_tower(), (64, 64))["patch_embed"]}}[name]
    return task, shapes, family(task.model)["patch_embed"]


def _params_and_extra(task, batch):
    params = task.init_variables(jax.random.key(0), batch)["params"]
    return params, task.init_extra_state(params, jax.random.key(2)) or {}


# Tasks whose batches need their own data (masked text, questions, answers): their test files
# run the same comparison against XLA on a tiny unrolled model of the task.
COVERED_ELSEWHERE = {
    "vilt": "tests/tasks/test_vilt_tasks.py::test_training_flops_match_xla",
    "vilt_vqa": "tests/tasks/test_vilt_tasks.py::test_training_flops_match_xla",
    "blip": "tests/tasks/test_blip_task.py::test_training_flops_match_xla",
    "blip_caption": "tests/tasks/test_blip_finetune_flops.py::test_training_flops_match_xla",
    "blip_vqa": "tests/tasks/test_blip_finetune_flops.py::test_training_flops_match_xla",
    "blip_retrieval": "tests/tasks/test_blip_finetune_flops.py::test_training_flops_match_xla",
    "albef": "tests/tasks/test_albef_task.py::test_training_flops_match_xla",
    "blip2_stage1": "tests/tasks/test_blip2_task.py::test_training_flops_match_xla",
    "blip2_stage2": "tests/tasks/test_blip2_task.py::test_training_flops_match_xla",
    "blip2_stage2_t5": "tests/tasks/test_blip2_t5_task.py::test_training_flops_match_xla",
    "minigpt4": "tests/tasks/test_blip2_task.py::test_training_flops_match_xla",
}


@pytest.mark.parametrize("name", sorted(COVERED_ELSEWHERE))
def test_other_tasks_flops_are_checked_where_named(name):
    """Every task counts its training FLOPs, and a test compares the count with XLA's."""
    path, test = COVERED_ELSEWHERE[name].split("::")
    with open(path) as f:
        source = f.read()
    assert f"def {test}(" in source and name in source, f"{COVERED_ELSEWHERE[name]} does not check {name!r}"


@pytest.mark.parametrize("name", sorted(set(tasks._TASKS) - set(COVERED_ELSEWHERE)))
def test_task_training_flops_match_xla(name):
    """What the trainer logs as TFLOP/s and MFU, for every task: BEiT's includes its frozen dVAE
    tokenizer's forward pass (no backward), CLIP's the share of the (B, B) logits."""
    task, shapes, patch_embed = _task(name)
    per_example = task.train_flops_per_example(shapes)
    assert per_example and per_example > 0
    batch = {"image": jnp.zeros(shapes["image"]), "label": jnp.zeros(shapes["label"], jnp.int32),
             "text": jnp.ones(shapes["text"], jnp.int32)}
    params, extra = jax.eval_shape(lambda: nn.meta.unbox(_params_and_extra(task, batch)))
    grad = jax.grad(lambda p, e, b: task.train_loss(p, e, b, jax.random.key(1))[0])    # the trainer's step
    xla = _xla_flops(grad, params, extra, batch)
    analytic = 4 * (per_example - patch_embed)      # XLA skips the images' gradient
    print(f"task {name}: XLA / analytic = {xla / analytic:.4f}")
    assert 1.0 <= xla / analytic < 1.06
