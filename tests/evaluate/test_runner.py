"""mmjax.evaluate.runner: which evaluators run is config (the kind defaults to the name; a bad
kind, an unknown key or an evaluator the task cannot serve is an error naming it when the task is
built), metrics keep their names, and the one reconstruction driver serves MAE and BEiT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from mmjax import configs, sharding, tasks
from mmjax.data import pipeline
from mmjax.evaluate import runner, split
from mmjax.evaluate.zeroshot import normalize
from mmjax.losses import masked_modeling
from mmjax.models import mae

SPLIT = {"data": {"name": "mmjax_shapes", "split": "test"}, "pp": "keep('image','label')"}


def _task_and_params(recipe, batch, scale=0.1, evals=None):
    """The recipe's task (with `evals` instead of its own when given) and random parameters,
    drawn without compiling init."""
    config = configs.load_config(recipe)
    if evals is not None:
        with config.unlocked():
            config.evals = ConfigDict(evals)
    task = tasks.get_task(config)
    shapes = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), shapes)
    return task, params, sharding.make_mesh(config.mesh)


def test_the_kind_defaults_to_the_name():
    evals = ConfigDict({"every_steps": 10, "zeroshot": dict(SPLIT, templates=["{}"]), "retrieval": SPLIT,
                        "top1": SPLIT, "probe": {"train": SPLIT, "test": SPLIT}, "recon": dict(SPLIT, seed=0),
                        "mim": SPLIT, "v2": dict(SPLIT, kind="top1"), "probe2": {"kind": "linear_probe",
                                                                                  "train": SPLIT, "test": SPLIT}})
    assert {e.name: e.kind for e in runner.evaluators(evals)} == {
        "zeroshot": "zeroshot", "retrieval": "retrieval", "top1": "top1", "probe": "linear_probe",
        "recon": "reconstruction", "mim": "reconstruction", "v2": "top1", "probe2": "linear_probe"}
    assert runner.evaluators(None) == runner.evaluators(ConfigDict({"every_steps": 0})) == []


@pytest.mark.parametrize("evals, match", [
    ({"val": SPLIT}, r"evals\.val: unknown evaluator kind 'val'; set evals\.val\.kind to one of \["),
    ({"val": dict(SPLIT, kind="captions")}, r"evals\.val: unknown evaluator kind 'captions'"),
    ({"top1": dict(SPLIT, template=["{}"])}, r"evals\.top1 \(kind 'top1'\): unknown key\(s\) \['template'\]"),
    ({"zeroshot": SPLIT}, r"evals\.zeroshot \(kind 'zeroshot'\): missing \['templates'\]"),
    ({"probe": {"train": SPLIT}}, r"evals\.probe \(kind 'linear_probe'\): missing \['test'\]"),
    ({"top1": 5}, r"evals\.top1 must be a dict of evaluator settings"),
])
def test_bad_evaluator_configs_are_named(evals, match):
    with pytest.raises(ValueError, match=match):
        runner.evaluators(ConfigDict(evals))


@pytest.mark.parametrize("recipe, name, block, task_class, missing", [
    ("experiments/vit/shapes.py:smoke=True", "retrieval", SPLIT, "ClassificationTask", "'embed_images', 'embed_texts'"),
    ("experiments/clip/shapes.py:smoke=True", "top1", SPLIT, "ContrastiveTask", "'classify'"),
    ("experiments/mae/shapes.py:smoke=True", "zs", dict(SPLIT, kind="zeroshot", templates=["{}"]), "MAETask",
     "'embed_images', 'embed_texts'"),
    ("experiments/beit/in1k_pretrain.py:smoke=True", "probe", {"train": SPLIT, "test": SPLIT}, "BEiTTask",
     "'image_features'"),
])
def test_an_evaluator_the_task_cannot_serve_fails_when_the_task_is_built(recipe, name, block, task_class, missing):
    config = configs.load_config(recipe)
    with config.unlocked():
        config.evals[name] = ConfigDict(block)
    kind = block.get("kind", runner.DEFAULT_KINDS.get(name, name))
    with pytest.raises(ValueError, match=rf"evals\.{name} \(kind '{kind}'\) needs the task to provide \[{missing}\], "
                                         rf"which the {task_class} .*does not; it provides \["):
        tasks.get_task(config)


def test_a_second_top1_evaluator_is_named_after_itself():
    block = dict(data={"name": "mmjax_shapes", "split": "test"}, batch_size=32, max_examples=32,
                 pp="resize(32)|value_range(-1,1)|keep('image','label')")
    evals = {"every_steps": 0, "top1": block, "v2": dict(block, kind="top1")}
    task, params, mesh = _task_and_params("experiments/vit/shapes.py:smoke=True", {"image": jnp.zeros((8, 32, 32, 3))},
                                          evals=evals)
    got = task.evaluate(params, mesh)
    assert set(got) == {"top1", "v2/top1"} and got["v2/top1"] == got["top1"]


def _first_batch(cfg):
    batch = next(pipeline.eval_batches(cfg.data, cfg.pp, int(cfg.batch_size), max_examples=cfg.max_examples))
    assert batch["mask"].all(), "the evaluation is one full batch"
    return jnp.asarray(batch["image"])


def test_one_reconstruction_driver_serves_mae():
    """recon/loss of the driver (masks from fold_in(key(seed), 0), the batch sharded over 8
    devices) equals the MAE loss of the same batch and masks computed here."""
    task, params, mesh = _task_and_params("experiments/mae/shapes.py:smoke=True", {"image": jnp.zeros((8, 32, 32, 3))})
    cfg = task.config.evals.recon
    got = task.evaluate(params, mesh)
    images = _first_batch(cfg)
    noise = task._noise(jax.random.fold_in(jax.random.key(int(cfg.seed)), 0), images)
    out = task.model.apply({"params": params}, images, noise)
    want, _ = masked_modeling.mim_pixels(out["pred"], mae.patchify(images, task.patch), out["mask"],
                                         norm_pix=task.norm_pix)
    assert got["recon/loss"] == pytest.approx(float(want), rel=1e-5)


def test_one_reconstruction_driver_serves_beit():
    task, params, mesh = _task_and_params("experiments/beit/in1k_pretrain.py:smoke=True",
                                          {"image": jnp.zeros((4, 32, 32, 3))}, scale=0.3)
    cfg = task.config.evals.mim
    got = task.evaluate(params, mesh)
    images = _first_batch(cfg)
    mask = task._masks(jax.random.fold_in(jax.random.key(int(cfg.get("seed", 0))), 0), images)
    logits = task.model.apply({"params": params["beit"]}, images, mask)["logits"]
    loss, metrics = masked_modeling.mim_tokens(logits, task.targets(params["tokenizer"], images), mask)
    assert set(got) == {"mim/loss", "mim/accuracy"}
    assert got["mim/loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["mim/accuracy"] == pytest.approx(float(metrics["masked_accuracy"]), abs=1e-6)


def test_contrastive_predict_functions_agree():
    """score_pairs(image i, text i) = scale · cos(embed_images, embed_texts), the CLIP logit."""
    batch = {"image": jnp.zeros((8, 32, 32, 3)), "text": jnp.zeros((8, 16), jnp.int32)}
    task, params, mesh = _task_and_params("experiments/clip/shapes.py:smoke=True", batch)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    tokens = task.tokenizer(["a red circle", "a blue square"] * 4)
    on_mesh = split.put_global({"image": images, "text": tokens}, mesh)
    scores = np.asarray(split.fetch(task.score_pairs(params, on_mesh["image"], on_mesh["text"])))
    zimg = normalize(np.asarray(split.fetch(task.embed_images(params, on_mesh["image"]))))
    ztxt = normalize(np.asarray(split.fetch(task.embed_texts(params, on_mesh["text"]))))
    scale = np.exp(min(float(params["logit_scale"]), np.log(100.0)))
    np.testing.assert_allclose(scores, scale * (zimg * ztxt).sum(-1), rtol=1e-4, atol=1e-5)
    assert np.ptp(scores) > 0
