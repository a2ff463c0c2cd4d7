"""The frozen LM of the bridge demos learns what they need (experiments/lm/shapes.py, made shorter):
after a short run it answers a question about a held-out shapes caption placed before it far above
chance, and without the caption it cannot (a blind LM stays near chance): the answers come from
reading the context, which is what a soft prompt later stands in for. Then a bridge learns through it:
a Perceiver resampler between a frozen image tower and this LM, frozen, learns to caption images."""

import jax
import ml_collections
import numpy as np
import pytest

from mmjax import checkpoint, configs, train

SPEC = "experiments/lm/shapes.py"
STEPS, BATCH, HELD_OUT = 400, 32, 96
BRIDGE_SPEC = "experiments/perceiver/shapes.py"
BRIDGE_STEPS = 300


@pytest.fixture(scope="module")
def trained(module_tmp):
    workdir = str(module_tmp("lm"))
    config = configs.load_config(f"{SPEC}:steps={STEPS},batch={BATCH}")
    with config.unlocked():
        config.checkpoint.every_steps = 10_000
    train.train(config, workdir)
    return config, checkpoint.load_train_state(workdir, params_only=True)["params"], workdir


def test_answers_from_the_caption_far_above_chance(trained):
    from benchmarks import shapes_bridges

    config, params, _ = trained
    examples = shapes_bridges.held_out(HELD_OUT)
    scores = shapes_bridges.lm_answers(config, params, examples)
    print(f"after {STEPS} steps of {BATCH}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
    # chance: colour 1/4, shape 1/6, size 1/3, position 1/9 (about 0.21 over the four types)
    assert scores["lm/with_caption_accuracy"] >= 0.6
    assert scores["lm/with_caption_accuracy_color"] >= 0.8
    assert scores["lm/blind_accuracy"] <= 0.4


def test_a_resampler_bridge_learns_to_caption_through_the_frozen_lm(trained, module_tmp):
    """experiments/perceiver/shapes.py, shorter, with this module's LM and a random image tower (both
    frozen; colour survives random features, so the main job's CLIP run is not needed): only the
    resampler and the projection train, and greedy captions after "a picture of" name the colour of
    held-out shapes far above chance. The LM's parameters come out of the run unchanged."""
    _, lm_params, lm_workdir = trained
    workdir = str(module_tmp("perceiver"))
    config = configs.load_config(f"{BRIDGE_SPEC}:steps={BRIDGE_STEPS}")
    with config.unlocked():
        config.init = ml_collections.ConfigDict({
            "source": [("language_model/", lm_workdir)],
            "fresh": [r"vision_model/.*", r"resampler/.*", r"language_projection/.*"]})
        # Random and frozen: one plain layer over a one-conv-per-stage stem keeps what colour needs (the
        # main job's deeper random stem washes it out: colour named in 0.36 of the captions).
        config.model.vision.update(width=128, depth=1, num_heads=4, mlp_dim=512, conv_stem_depth=1)
        config.checkpoint.every_steps = 10_000
        del config.evals["vqa"]
        config.evals.caption.max_examples = HELD_OUT
        config.evals.caption.batch_size = HELD_OUT
    final = train.train(config, workdir)
    print(f"resampler bridge after {BRIDGE_STEPS} steps: "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(final.items())))
    assert final["caption/color_accuracy"] >= 0.7          # chance 1/4; 0.99 measured
    bridged = checkpoint.load_train_state(workdir, params_only=True)["params"]["language_model"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(bridged), jax.tree.leaves(lm_params)))
