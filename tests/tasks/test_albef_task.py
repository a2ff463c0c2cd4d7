"""The ALBEF pretraining task (mmjax/tasks/albef.py):

* it learns on the shapes data (a tiny ALBEF, a short trainer run): ITM accuracy, ITC retrieval,
  ITM re-ranked retrieval and MLM accuracy on colour / shape words of held-out captions, far above
  chance, measured through the task's predict functions;
* killed after its first checkpoint and resumed, its final train state (momentum model, queues,
  α step) equals the uninterrupted run's byte for byte;
* invariants: α = 0 gives the plain queue ITC loss; decay 1 leaves the momentum copy frozen (the
  config refuses decay 1, so ema_update is checked directly) and the EMA follows its formula; the
  queues are FIFO ring buffers across steps;
* the loss, gradients and new extra state under fsdp_tp on 8 CPU devices equal one device's.
"""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import trainer_process

from mmjax import checkpoint, configs, tasks, train
from mmjax.data import shapes
from mmjax.evaluate import retrieval
from mmjax.losses import contrastive_queue
from mmjax.tasks import momentum_state

SPEC = "experiments/albef/shapes.py"
# Measured on 2 CPU cores shared with 2 other jobs: the run takes about 80 s (compiles included).
# Then MLM fills in the colour word of held-out captions 0.51 (chance 0.25; 0.79 after 300 steps,
# 0.21 after 150), ITC i2t R@1 0.023 and ITM re-ranked 0.023 (chance 0.004); ITM accuracy is still at
# chance (0.50) at this budget.
STEPS, BATCH, TEST, RESUME_FROM = 220, 32, 256, 200
TINY = ["--config.model.embed_dim=32", "--config.model.vision.width=64", "--config.model.vision.mlp_dim=256",
        "--config.model.vision.depth=2", "--config.model.text.width=64", "--config.model.text.mlp_dim=256",
        "--config.model.text.num_heads=4", "--config.model.vision.conv_stem=(16, 32)"]


def _config(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
    config = configs.apply_overrides(configs.load_config(spec), TINY + overrides)
    with config.unlocked():
        config.evals = ml_collections.ConfigDict({"every_steps": 0})   # measured below, from the predict functions
    return config


# --- Learning and resume ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(module_tmp):
    workdir = str(module_tmp("albef"))
    config = _config(f"{SPEC}:steps={STEPS},batch={BATCH},queue={4 * BATCH}", [
        f"--config.checkpoint.every_steps={RESUME_FROM}", "--config.checkpoint.keep=3",
        "--config.log_every_steps=50"])
    train.train(config, workdir)
    return config, workdir


def test_albef_learns_far_above_chance(run):
    """Measured with benchmarks/shapes_fusion.py's functions (the README's fusion table uses them)."""
    from benchmarks.shapes_fusion import itm_scores, masked_word_accuracy

    config, workdir = run
    task = tasks.get_task(config)
    params = checkpoint.load_train_state(workdir)["params"]
    examples = [shapes.generate_example(i, seed=shapes.SPLIT_SEEDS["test"], image_size=32) for i in range(TEST)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    tokens = np.asarray(task.tokenizer([e["caption"] for e in examples]), np.int32)
    zimg, ztxt = np.asarray(task.embed_images(params, images)), np.asarray(task.embed_texts(params, tokens))
    itc = retrieval.recall_at_k(zimg, ztxt, (1,))
    image_tokens = task.image_tokens(params, images)
    # ALBEF's retrieval protocol: the ITC top-k of every image, re-ranked by the ITM score.
    k = 8
    top = np.argsort(-(zimg @ ztxt.T), axis=1)[:, :k]
    scores = np.stack([np.asarray(task.match_tokens(params, image_tokens, tokens[top[:, j]])) for j in range(k)], 1)
    reranked_r1 = float(np.mean(top[np.arange(TEST), scores.argmax(axis=1)] == np.arange(TEST)))
    itm = itm_scores("albef", task, params, examples)
    mlm = masked_word_accuracy(task, params, examples)
    print(f"\nALBEF after {STEPS} steps of {BATCH}: ITM accuracy {itm['albef/itm_accuracy']:.3f} (chance 0.5); "
          f"i2t R@1 ITC {itc['i2t_r1']:.3f} -> ITM re-ranked top-{k} {reranked_r1:.3f} (chance {1 / TEST:.3f}); "
          f"MLM {', '.join(f'{k} {v:.3f}' for k, v in mlm.items())} (chance colour 0.25, shape 1/6, size 1/3)")
    assert mlm["albef/mlm_color_accuracy"] > 0.4                       # 1.6x chance; 0.51 measured
    assert itc["i2t_r1"] >= 3 / TEST and reranked_r1 >= 3 / TEST     # chance 1 / TEST; 6 / TEST measured


def test_resume_after_a_kill_is_bit_exact(run, tmp_path):
    config, reference = run
    workdir = str(tmp_path / "resumed")
    shutil.copytree(reference, workdir)
    newest = os.path.join(workdir, "checkpoints", str(STEPS))
    assert os.path.isdir(newest), os.listdir(os.path.join(workdir, "checkpoints"))
    shutil.rmtree(newest)                        # as if killed before the last checkpoint
    train.train(config, workdir)
    nbytes = trainer_process.assert_same_train_state(reference, workdir)
    state = checkpoint.load_train_state(workdir)
    assert int(state["queue"]["pointer"]) == STEPS * BATCH % (4 * BATCH) and int(state["distill_step"]) == STEPS
    print(f"\nALBEF resumed from step {RESUME_FROM}: {nbytes} train-state bytes equal (momentum model, queues)")


# --- Invariants ---------------------------------------------------------------------------------

def _tiny_config(**momentum):
    config = _config(f"{SPEC}:smoke=True", [
        "--config.input.batch_size=8", "--config.momentum.queue_size=16", "--config.model.embed_dim=16",
        "--config.model.vision.width=32", "--config.model.vision.depth=1", "--config.model.vision.num_heads=2",
        "--config.model.vision.mlp_dim=64", "--config.model.vision.conv_stem=()", "--config.model.text.width=32",
        "--config.model.text.num_heads=2", "--config.model.text.mlp_dim=64", "--config.model.text.depth=2",
        "--config.model.text.cross_attention_from=1",   # one text-only layer, one fusion layer
        *[f"--config.momentum.{k}={v}" for k, v in momentum.items()]])
    return config


def _batch(step: int, n: int = 8):
    rng = np.random.default_rng(step)
    text = rng.integers(5, 198, (n, 10)).astype(np.int32)
    text[:, 0], text[:, -2:] = 2, 0
    masked = rng.random(text.shape) < 0.3
    masked[:, 0] = masked[:, -2:] = False
    return {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32), "text": text,
            "mlm_input": np.where(masked, 4, text).astype(np.int32),
            "mlm_labels": np.where(masked, text, -100).astype(np.int32)}


@pytest.fixture(scope="module")
def tiny():
    """(task with α 0.4 ramped over 10 steps, its jitted train_loss, initial params and extra state)."""
    task = tasks.get_task(_tiny_config(alpha=0.4, alpha_warmup_steps=10))
    variables = nn.meta.unbox(jax.jit(task.init_variables)(jax.random.key(0), _batch(0)))
    extra = nn.meta.unbox(jax.jit(task.init_extra_state)(variables["params"], jax.random.key(1)))
    return task, jax.jit(task.train_loss), variables["params"], extra


def test_alpha_zero_is_the_plain_queue_itc_loss(tiny):
    task, train_loss, params, extra = tiny
    batch = _batch(1)
    _, (start, new_extra) = train_loss(params, extra, batch, jax.random.key(2))             # step 0: α = 0
    _, (ramped, _) = train_loss(params, dict(extra, distill_step=jnp.int32(5)), batch, jax.random.key(2))
    _, (full, _) = train_loss(params, dict(extra, distill_step=jnp.int32(50)), batch, jax.random.key(2))
    # At step 0 the momentum model equals the online one (no dropout): the plain loss uses its embeddings.
    out = task.model.apply({"params": params}, batch["image"], batch["text"], batch["text"] != 0)
    want, _ = contrastive_queue.itc_queue_loss(out["image_embeds"], out["text_embeds"], out["image_embeds"],
                                               out["text_embeds"], extra["queue"]["image"], extra["queue"]["text"],
                                               out["logit_scale"])
    np.testing.assert_allclose(start["itc_loss"], want, rtol=1e-5)
    assert [float(m["alpha"]) for m in (start, ramped, full)] == pytest.approx([0.0, 0.2, 0.4])
    assert abs(float(full["itc_loss"]) - float(want)) > 1e-3               # distillation changes it
    assert int(new_extra["distill_step"]) == 1


def test_momentum_follows_the_ema_and_decay_one_freezes_it(tiny):
    task, train_loss, params, extra = tiny
    moved = jax.tree.map(lambda p: p + 1.0, params)
    frozen = momentum_state.ema_update(extra["ema_params"], moved, 1.0)
    jax.tree.map(np.testing.assert_array_equal, frozen, extra["ema_params"])
    _, (_, new_extra) = train_loss(moved, extra, _batch(1), jax.random.key(2))
    decay = task.decay
    jax.tree.map(lambda m, e, p: np.testing.assert_allclose(m, decay * e + (1 - decay) * p, rtol=1e-6, atol=1e-6),
                 new_extra["ema_params"], extra["ema_params"], moved)
    with pytest.raises(ValueError, match=r"momentum.decay must be in \[0, 1\)"):
        tasks.get_task(_tiny_config(decay=1.0))
    with pytest.raises(ValueError, match="multiple of the global batch"):
        tasks.get_task(_tiny_config(queue_size=12))


def test_missing_mlm_inputs_are_named(tiny):
    task, _, params, extra = tiny
    batch = {k: v for k, v in _batch(1).items() if k != "mlm_labels"}
    with pytest.raises(ValueError, match=r"missing \['mlm_labels'\]"):
        task.train_loss(params, extra, batch, jax.random.key(0))


# --- Queues, and sharded == unsharded -----------------------------------------------------------

def test_queues_are_fifo_across_steps(tiny):
    """Each step writes its batch's momentum image embeddings at the pointer: step 1 -> rows 0-7,
    step 2 -> rows 8-15, and the pointer wraps to 0 (queue of 16, batch of 8)."""
    task, train_loss, params, extra = tiny
    _, (_, after_one) = train_loss(params, extra, _batch(1), jax.random.key(2))
    _, (_, after_two) = train_loss(params, after_one, _batch(2), jax.random.key(3))
    assert int(after_one["queue"]["pointer"]) == 8 and int(after_two["queue"]["pointer"]) == 0
    expected_rows = task.embed_images(after_one["ema_params"], _batch(1)["image"])
    np.testing.assert_allclose(after_one["queue"]["image"][:8], expected_rows, atol=1e-6)
    np.testing.assert_array_equal(after_two["queue"]["image"][:8], after_one["queue"]["image"][:8])
    np.testing.assert_allclose(after_two["queue"]["image"][8:],
                               task.embed_images(after_two["ema_params"], _batch(2)["image"]), atol=1e-6)
    assert int(after_two["distill_step"]) == 2


def test_fsdp_tp_step_equals_one_device(tiny):
    """Loss, every gradient and every leaf of the new extra state (momentum model, queues with
    the global batch's embeddings, α step) under fsdp_tp equal one device's; the ITM hard
    negatives are drawn from the global batch's similarities on both."""
    from sharded_equality import assert_trees_close, fsdp_tp_loss_and_grads, loss_and_grads

    task, _, params, extra = tiny
    want, got = (fn(task, params, extra, _batch(1), jax.random.key(1))
                 for fn in (loss_and_grads, fsdp_tp_loss_and_grads))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    worst = assert_trees_close(got["grads"], want["grads"], "gradient")
    assert_trees_close(got["extra"], want["extra"], "extra state")
    assert got["unsharded"] < 1.0 and int(got["extra"]["queue"]["pointer"]) == 8
    print(f"fsdp_tp: max |grad diff| {worst:.2g}")


# --- Analytic FLOPs -----------------------------------------------------------------------------

def test_training_flops_match_xla():
    """What the trainer logs as TFLOP/s for task "albef": the analytic count of the online passes
    (forward + backward) and the momentum passes (forward) against XLA's count of the step, on a
    model wide enough that matmuls dominate (the images' gradient, which XLA skips, left out)."""
    from mmjax.models import albef, vit

    wide = ["--config.model.vision.width=128", "--config.model.vision.mlp_dim=512", "--config.model.vision.num_heads=4",
            "--config.model.text.width=128", "--config.model.text.mlp_dim=512", "--config.model.text.num_heads=4"]
    task = tasks.get_task(configs.apply_overrides(_tiny_config(), wide))
    batch = _batch(0)
    params = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch)["params"])
    extra = nn.meta.unbox(jax.eval_shape(task.init_extra_state, params, jax.random.key(0)))
    grad = jax.grad(lambda p, e, b: task.train_loss(p, e, b, jax.random.key(0))[0])
    cost = jax.jit(grad).lower(params, extra, batch).compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    n = batch["image"].shape[0]
    vision = albef.vision_tower(task.model.vision, task.model.dtype)
    analytic = n * (task.train_flops_per_example({k: v.shape for k, v in batch.items()})
                    - vit.patch_embed_flops(vision, (32, 32)))   # no gradient into the images
    print(f"ALBEF train step: XLA / analytic = {xla / analytic:.4f}")
    assert 0.98 <= xla / analytic < 1.10
