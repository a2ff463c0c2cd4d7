"""BLIP pretraining learns on the shapes data (experiments/blip/shapes.py, made smaller): after a
short run, on held-out images, the ITM head scores an image's own caption above a caption of
another colour and shape (chance 0.5), and greedy captions name the image's colour (chance 0.25).
The full recipe's numbers are in its docstring.

Measured (220 steps of 32, lr 1e-3, one run): ITM own-vs-other-class accuracy 0.922, caption
colour accuracy 0.812 on 64 held-out images; 53 s for the run on 2 CPU cores shared with other jobs.
(150 steps gave 0.641 and 0.531: not yet far enough above chance.) The same decoder fine-tuned as a
captioner (tasks/blip_finetune.py) shares this learning; its loss and decoding are tested exactly in
tests/tasks/test_blip_finetune.py."""

import jax
import numpy as np
import pytest

from mmjax import checkpoint, configs, train
from mmjax.data import shapes, shapes_render
from mmjax.evaluate.drivers import captioning

SPEC = "experiments/blip/shapes.py"
STEPS, BATCH, HELD_OUT = 220, 32, 64
SMALL = [
    "--config.model.embed_dim=32",
    "--config.model.vision.width=64", "--config.model.vision.depth=2", "--config.model.vision.mlp_dim=256",
    "--config.model.vision.conv_stem=(16, 32)",
    "--config.model.text.width=64", "--config.model.text.depth=1", "--config.model.text.mlp_dim=256",
    "--config.model.text.max_len=24",
    "--config.evals.every_steps=0", "--config.checkpoint.every_steps=100000", "--config.log_every_steps=50",
]


@pytest.fixture(scope="module")
def trained(module_tmp):
    workdir = str(module_tmp("blip"))
    config = configs.apply_overrides(
        configs.load_config(f"{SPEC}:steps={STEPS},batch={BATCH},queue={4 * BATCH}"), SMALL)
    with config.unlocked():
        config.evals = {"every_steps": 0}
        config.schedule.update(lr=1e-3, warmup_steps=20)
        config.momentum.alpha_warmup_steps = 50
    train.train(config, workdir)
    from mmjax import tasks

    task = tasks.get_task(config)
    return task, checkpoint.load_train_state(workdir, params_only=True)["params"], workdir


def _held_out():
    examples = [shapes.generate_example(i, shapes.SPLIT_SEEDS["test"], 32) for i in range(HELD_OUT)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    return images, examples


def test_itm_and_captions_far_above_chance(trained):
    task, params, _ = trained
    images, examples = _held_out()
    captions = [e["caption"] for e in examples]
    labels = np.array([e["label"] for e in examples])
    # Each image's negative: the next held-out caption of another colour and another shape.
    other = [next(j for k in range(1, HELD_OUT) for j in [(i + k) % HELD_OUT]
                  if examples[j]["color"] != examples[i]["color"] and examples[j]["shape"] != examples[i]["shape"])
             for i in range(HELD_OUT)]
    tokens = task.tokenizer(captions)
    image_tokens = task.image_tokens(params, images)
    own = np.asarray(task.match_tokens(params, image_tokens, tokens))
    wrong = np.asarray(task.match_tokens(params, image_tokens, tokens[np.array(other)]))
    itm_accuracy = float(np.mean(own > wrong))
    ids = np.asarray(task.caption(params, images, {"max_new_tokens": 20}))
    generated = list(task.tokenizer.decode(ids))
    colors = [e["color"] for e in examples]
    color_accuracy = captioning.attribute_accuracy(generated, np.array(colors), list(shapes_render.COLORS),
                                                   "test", "color")
    print(f"after {STEPS} steps of {BATCH}: ITM own-vs-other-class caption accuracy {itm_accuracy:.3f} (chance "
          f"0.5), caption colour accuracy {color_accuracy:.3f} (chance 0.25); e.g. {generated[:3]} for "
          f"{captions[:3]} (classes {labels[:3]})")
    assert itm_accuracy >= 0.8
    assert color_accuracy >= 0.6
    assert jax.tree.leaves(params)


def test_load_which_ema_gives_the_momentum_towers(trained):
    """BLIP keeps momentum copies of four towers only: which="ema" is the online model with those
    four replaced, so the momentum ITC encoders can be exported or evaluated like any model."""
    import mmjax

    _, params, workdir = trained
    momentum = checkpoint.load_train_state(workdir, keys=("momentum_params",))["momentum_params"]
    _, ema = mmjax.load(workdir, which="ema")
    _, online = mmjax.load(workdir)
    assert sorted(momentum) == ["text_encoder", "text_proj", "vision_model", "vision_proj"]
    for name in ema["params"]:
        want = momentum[name] if name in momentum else params[name]
        jax.tree.map(np.testing.assert_array_equal, ema["params"][name], want)
        jax.tree.map(np.testing.assert_array_equal, online["params"][name], params[name])
    kernel = lambda tree: jax.tree.leaves(tree["vision_proj"])[0]  # noqa: E731
    assert not np.array_equal(kernel(ema["params"]), kernel(online["params"]))   # the copy trails the model
