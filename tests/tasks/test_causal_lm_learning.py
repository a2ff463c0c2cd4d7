"""The frozen LM of the bridge demos learns what they need (experiments/lm/shapes.py, made shorter):
after a short run it answers a question about a held-out shapes caption placed before it far above
chance, and without the caption it cannot (a blind LM stays near chance): the answers come from
reading the context, which is what a soft prompt later stands in for."""

import pytest

from mmjax import checkpoint, configs, train

SPEC = "experiments/lm/shapes.py"
STEPS, BATCH, HELD_OUT = 400, 32, 96


@pytest.fixture(scope="module")
def trained(module_tmp):
    workdir = str(module_tmp("lm"))
    config = configs.load_config(f"{SPEC}:steps={STEPS},batch={BATCH}")
    with config.unlocked():
        config.checkpoint.every_steps = 10_000
    train.train(config, workdir)
    return config, checkpoint.load_train_state(workdir, params_only=True)["params"]


def test_answers_from_the_caption_far_above_chance(trained):
    from benchmarks import shapes_bridges

    config, params = trained
    examples = shapes_bridges.held_out(HELD_OUT)
    scores = shapes_bridges.lm_answers(config, params, examples)
    print(f"after {STEPS} steps of {BATCH}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
    # chance: colour 1/4, shape 1/6, size 1/3, position 1/9 (about 0.21 over the four types)
    assert scores["lm/with_caption_accuracy"] >= 0.6
    assert scores["lm/with_caption_accuracy_color"] >= 0.8
    assert scores["lm/blind_accuracy"] <= 0.4
