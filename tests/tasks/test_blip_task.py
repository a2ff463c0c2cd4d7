"""The BLIP pretraining task (mmjax/tasks/blip.py) on a tiny model:

* config errors name the problem (unknown keys, queue not a multiple of the batch, tokenizer /
  model vocabulary mismatch, text longer than the context);
* one train step (ITC with momentum + queue + distillation, ITM on hard negatives, LM) under
  fsdp_tp on 8 simulated CPU devices equals the one-device step: loss, every gradient and every
  leaf of the new extra state (momentum towers, queues, α step);
* the predict functions keep the evaluators' contract (shapes, [ENC]/[DEC] handling, captions
  that decode, beam and nucleus search);
* the analytic training FLOPs match XLA's count of the compiled step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs, tasks
from mmjax.models import blip, vit

SPEC = "experiments/blip/shapes.py:smoke=True"
BATCH, LENGTH = 16, 16
TINY = dict(width=32, depth=1, num_heads=2, mlp_dim=64)


def _config(*overrides):
    config = configs.load_config(SPEC)
    return configs.apply_overrides(config, [
        f"--config.input.batch_size={BATCH}", "--config.momentum.queue_size=32", "--config.model.embed_dim=16",
        f"--config.input.tokenizer.context_length={LENGTH}", "--config.model.text.max_len=16",
        "--config.model.vision.conv_stem=()",
        *[f"--config.model.vision.{k}={v}" for k, v in TINY.items()],
        *[f"--config.model.text.{k}={v}" for k, v in TINY.items()], *overrides])


def _batch(step):
    rng = np.random.default_rng(step)
    text = rng.integers(5, 198, size=(BATCH, LENGTH)).astype(np.int32)
    text[:, 0] = 2                                          # [CLS]
    lengths = rng.integers(4, LENGTH, size=BATCH)
    text[np.arange(LENGTH)[None] >= lengths[:, None]] = 0   # padding
    return {"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32), "text": text}


# --- config validation --------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--config.momentum.queue_size=40", "multiple of the global batch"),
    ("--config.model.text.vocab_size=198", r"tokenizer's vocabulary 198 \+ 2"),
    ("--config.model.text.max_len=8", "exceeds the text tower's 8 positions"),
    ("--config.momentum.alpha=1.5", "alpha must be in"),
])
def test_bad_configs_are_refused_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        tasks.get_task(_config(override))


def test_unknown_keys_are_refused():
    for block, key in (("momentum", "queue"), ("loss", "smoothing"), ("model", "vocab")):
        config = _config()
        with config.unlocked():
            config[block][key] = 1
        with pytest.raises(ValueError, match=f"Unknown {block} key"):
            tasks.get_task(config)


# --- sharded == one device ----------------------------------------------------------------------

def test_fsdp_tp_step_equals_one_device(task_and_params):
    from sharded_equality import assert_trees_close, fsdp_tp_loss_and_grads, loss_and_grads

    task, params = task_and_params
    extra = nn.meta.unbox(task.init_extra_state(params, jax.random.key(1)))
    want, got = (fn(task, params, extra, _batch(1), jax.random.key(3))
                 for fn in (loss_and_grads, fsdp_tp_loss_and_grads))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    for name in ("itc_loss", "itm_loss", "lm_loss", "itm_accuracy"):
        np.testing.assert_allclose(got["metrics"][name], want["metrics"][name], rtol=2e-5, atol=2e-6, err_msg=name)
    worst = assert_trees_close(got["grads"], want["grads"], "gradient")
    assert_trees_close(got["extra"], want["extra"], "extra state")
    extra = got["extra"]
    assert int(extra["queue"]["pointer"]) == BATCH and int(extra["distill_step"]) == 1
    assert sorted(extra["momentum_params"]) == ["text_encoder", "text_proj", "vision_model", "vision_proj"]
    assert got["unsharded"] < 1.0
    print(f"fsdp_tp: loss {got['loss']:.6f} (one device {want['loss']:.6f}), max |grad diff| {worst:.2g}")


# --- predict functions --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_and_params():
    task = tasks.get_task(_config())
    params = nn.meta.unbox(task.init_variables(jax.random.key(0), _batch(0)))["params"]
    return task, params


def test_predict_functions_keep_the_evaluators_contract(task_and_params):
    task, params = task_and_params
    batch = _batch(2)
    images, text = batch["image"][:4], batch["text"][:4]
    zimg, ztxt = task.embed_images(params, images), task.embed_texts(params, text)
    assert zimg.shape == ztxt.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
    tokens = task.image_tokens(params, images)
    assert tokens.shape == (4, 1 + 16, 32)
    logits = task.match_tokens(params, tokens, text)
    assert logits.shape == (4,)
    enc = jnp.asarray(text).at[:, 0].set(task.special["enc"])
    want = task.model.apply({"params": params}, enc, text != 0, tokens, method="match")[:, 1]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)      # [CLS] -> [ENC], as BLIP
    for settings in ({"max_new_tokens": 6}, {"max_new_tokens": 6, "num_beams": 3},
                     {"max_new_tokens": 6, "do_sample": True, "top_p": 0.9, "key": jax.random.key(1)}):
        ids = np.asarray(task.caption(params, images, settings))
        assert ids.shape == (4, 6) and ids.dtype == np.int32, settings
        assert ids.max() < task.tokenizer.vocab_size, settings      # never [DEC] / [ENC]
        captions = task.tokenizer.decode(ids)
        assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    description = task.model_description(batch)
    assert description["module"] is task.model and len(description["inputs"]) == 3


def test_loss_alone_is_refused(task_and_params):
    task, params = task_and_params
    with pytest.raises(NotImplementedError, match="train_loss"):
        task.loss(params, _batch(0), jax.random.key(0))


# --- analytic FLOPs -----------------------------------------------------------------------------

def test_training_flops_match_xla():
    """Wide enough that matmuls dominate (tests/test_flops.py's sizes); hard-negative sampling,
    softmaxes and norms are the few % XLA counts on top."""
    wide = dict(width=128, depth=1, num_heads=4, mlp_dim=512)
    task = tasks.get_task(_config(*[f"--config.model.vision.{k}={v}" for k, v in wide.items()],
                                  *[f"--config.model.text.{k}={v}" for k, v in wide.items()]))
    batch = _batch(0)
    params = jax.eval_shape(task.init_variables, jax.random.key(0), batch)["params"]
    extra = jax.eval_shape(task.init_extra_state, params, jax.random.key(0))
    params, extra = nn.meta.unbox(params), nn.meta.unbox(extra)
    grad = jax.grad(lambda p, e, b: task.train_loss(p, e, b, jax.random.key(0))[0])
    cost = jax.jit(grad).lower(params, extra, batch).compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = BATCH * task.train_flops_per_example({k: v.shape for k, v in batch.items()})
    vision = blip.vision_tower(task.model.vision, task.model.dtype)
    analytic -= BATCH * vit.patch_embed_flops(vision, (32, 32))   # no gradient into the images
    print(f"BLIP train step: XLA / analytic = {xla / analytic:.4f}")
    assert 0.98 <= xla / analytic < 1.10
