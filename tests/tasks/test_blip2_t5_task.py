"""BLIP-2 stage 2 with Flan-T5 (prefix LM) on the recipe's tiny smoke model: the prefix / suffix split
of the captions, the loss against numpy cross-entropy on the model's own logits, the recipe's frozen
towers, greedy captions consistent with the teacher-forced logits, and the
analytic training FLOPs against XLA's count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_blip2_task import _batch, _init

from mmjax import configs, optim, tasks
from mmjax.models import blip2_t5

SMOKE = "experiments/blip2/stage2_t5.py:smoke=True"
STD = 0.3      # random weights large enough that the image shows in the logits


@pytest.fixture(scope="module")
def task():
    return tasks.get_task(configs.load_config(SMOKE))


def _words(task, row):
    """A T5 row's words (before its </s>), as a list."""
    row = [int(t) for t in row]
    return row[:row.index(task.eos)]


def test_prefix_split_covers_the_caption(task):
    batch = _batch(task, n=32)
    text = np.asarray(batch["text"])
    assert (text[:, 0] == task.tokenizer.sot_token_id).all() and task.lead == 1   # the shapes start token goes
    draws = []
    for seed in range(3):
        parts = task.split_text(batch["text"], jax.random.key(seed))
        prefix, prefix_mask, suffix, suffix_mask = map(np.asarray, parts)
        for i in range(len(text)):
            caption = _words(task, text[i, 1:])
            before, after = _words(task, prefix[i]), _words(task, suffix[i])
            assert before + after == caption and after, "the suffix keeps at least one word"
            assert prefix_mask[i].sum() == len(before) + 1 and suffix_mask[i].sum() == len(after) + 1   # + </s>
            assert (prefix[i][~prefix_mask[i]] == 0).all() and (suffix[i][~suffix_mask[i]] == 0).all()
            draws.append((len(before), len(caption)))
    lengths = np.array(draws)
    assert (lengths[:, 0] == 0).any() and (lengths[:, 0] > 0).any()       # captioning and continuations
    assert (lengths[:, 0] == lengths[:, 1] - 1).any()                  # up to all words but one
    assert draws[:32] != draws[32:64], "each step's key draws other split points"


def test_no_split_makes_the_whole_caption_the_target():
    config = configs.load_config(SMOKE)
    config.loss.split = "none"
    task = tasks.get_task(config)
    batch = _batch(task, n=4)
    prefix, prefix_mask, suffix, _ = map(np.asarray, task.split_text(batch["text"], jax.random.key(0)))
    assert (prefix[:, 0] == task.eos).all() and (prefix_mask.sum(1) == 1).all()
    np.testing.assert_array_equal(suffix, np.asarray(batch["text"])[:, 1:])
    config.loss.split = "half"
    with pytest.raises(ValueError, match="loss.split must be one of"):
        tasks.get_task(config)


def _xent(logits, labels):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]


def test_loss_is_the_suffix_cross_entropy_and_the_recipe_freezes_the_towers(task):
    config = configs.load_config(SMOKE)
    batch = _batch(task)
    params = _init(task, batch, std=STD)
    rng = jax.random.key(0)
    split_key = jax.random.split(rng)[0]       # split as the task splits its step key

    @jax.jit
    def pieces(p, b):
        loss = task.loss(p, b, rng)[0]
        split = task.split_text(b["text"], split_key)
        apply = lambda images: task.model.apply({"params": p}, images, split[0], split[1],  # noqa: E731
                                                blip2_t5.shift_right(split[2]), split[3])["logits"]
        return loss, split, apply(b["image"]), apply(b["image"][::-1])

    loss, (_, _, targets, target_mask), logits, other = pieces(params, batch)
    mask = np.asarray(target_mask)
    expected = (_xent(logits, targets) * mask).sum() / mask.sum()
    print(f"prefix-LM loss |diff| {abs(float(loss) - expected):.2e}")
    assert float(loss) == pytest.approx(expected, abs=2e-5)
    assert np.abs(np.asarray(other) - np.asarray(logits))[mask].max() > 1e-3, "the image reaches the decoder"
    trainable = optim.trainable_mask(config.optimizer, params)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    frozen = {path for path, keep in zip(paths, jax.tree.leaves(trainable)) if not keep}
    assert all(p in frozen for p in paths if p.startswith("['language_model']")), "all of T5 is frozen"
    assert all(p.startswith(("['vision_model']", "['language_model']")) for p in frozen)
    assert any(p.startswith("['vision_model']['norm']") for p in set(paths) - frozen), "ln_vision trains"


def test_greedy_caption_follows_the_teacher_forced_logits(task):
    """`caption` decodes with the cache after the image and </s>; fed back teacher-forced, every
    generated token is the argmax of the logits before it."""
    batch = _batch(task, n=2)
    params = _init(task, batch, std=STD)
    generated = np.asarray(task.caption(params, batch["image"], {"max_new_tokens": 6}))
    assert generated.shape == (2, 6) and generated.dtype == np.int32
    prompt = jnp.full((2, 1), task.eos, jnp.int32)
    logits = jax.jit(task.model.apply)({"params": params}, batch["image"], prompt, None,
                                       blip2_t5.shift_right(jnp.asarray(generated)))["logits"]
    greedy = np.asarray(logits).argmax(-1)
    for row, want in zip(generated, greedy):
        end = list(row).index(task.eos) + 1 if task.eos in row else len(row)
        np.testing.assert_array_equal(row[:end], want[:end])


def test_training_flops_match_xla():
    """Wide enough that matmuls dominate; the frozen vision tower and T5 are differentiated as the
    trainer does (weights not at all, T5's activations back to the queries)."""
    config = configs.load_config(SMOKE)
    config.model.vision = dict(variant=None, width=128, depth=1, num_heads=4, mlp_dim=512, patch_size=8)
    config.model.qformer = dict(width=128, depth=2, num_heads=4, mlp_dim=512, num_queries=8)
    config.model.lm = dict(width=128, encoder_depth=2, decoder_depth=2, num_heads=4, head_dim=32, mlp_dim=512,
                           vocab_size=78, mlp="geglu_exact")
    task = tasks.get_task(config)
    batch = _batch(task, n=4)
    params = jax.eval_shape(lambda b: nn.meta.unbox(task.init_variables(jax.random.key(0), b)), batch)["params"]
    trainable = optim.trainable_mask(config.optimizer, params)
    live, frozen = optim.split_frozen(params, trainable)
    grad = jax.grad(lambda p, f, b: task.loss(optim.merge_frozen(p, f, trainable), b, jax.random.key(0))[0])
    cost = jax.jit(grad).lower(live, frozen, batch).cost_analysis()    # before XLA optimises: no compile
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = 4 * task.train_flops_per_example({k: v.shape for k, v in batch.items()})
    print(f"blip2_stage2_t5: XLA / analytic = {xla / analytic:.4f}")
    assert 1.0 <= xla / analytic < 1.05
