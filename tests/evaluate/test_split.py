"""mmjax.evaluate.split: a split runs on the mesh with its padding dropped, and one that yields no
examples is an error naming the evaluator, not a 0.0 metric."""

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from mmjax import configs, sharding, tasks
from mmjax.evaluate import split


@pytest.fixture(scope="module")
def folder(module_tmp):
    """Two class folders of two 8px images each."""
    root = module_tmp("eval_folder")
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    return str(root)


def _eval_cfg(folder, **extra):
    return ConfigDict(dict(data=dict(name="folder", image_dir=folder), pp="keep('image','label')",
                           batch_size=4, **extra))


def test_run_over_split_yields_the_examples(folder):
    mesh = sharding.make_mesh([("data", -1)])
    out = list(split.run_over_split(_eval_cfg(folder, max_examples=3), mesh, lambda b: b["label"],
                                    name="evals.top1"))
    assert sum(len(labels) for _, labels in out) == 3


def test_run_over_split_raises_on_an_empty_split(folder):
    mesh = sharding.make_mesh([("data", -1)])
    with pytest.raises(ValueError, match=r"evals\.top1: .*no examples.*max_examples=0.*image_dir"):
        list(split.run_over_split(_eval_cfg(folder, max_examples=0), mesh, lambda b: b["label"],
                                  name="evals.top1"))


@pytest.mark.parametrize("recipe, evaluator", [
    ("experiments/vit/shapes.py:smoke=True", "top1"),          # used to report top1 0.0
    ("experiments/clip/shapes.py:smoke=True", "retrieval"),    # used to fail in np.concatenate
    ("experiments/mae/shapes.py:smoke=True", "recon"),
    ("experiments/mae/shapes.py:smoke=True", "probe.train"),
    ("experiments/beit/in1k_pretrain.py:smoke=True", "mim"),   # used to fail unpacking a 0
])
def test_every_evaluator_names_itself_on_an_empty_split(folder, recipe, evaluator):
    """The recipe's evaluator alone, its split emptied by max_examples=0. No batch runs, so no
    parameters are needed."""
    config = configs.load_config(recipe)
    top, _, sub = evaluator.partition(".")
    with config.unlocked():
        config.evals = ConfigDict({top: config.evals[top]})
        cfg = config.evals[top][sub] if sub else config.evals[top]
        cfg.data, cfg.max_examples = {"name": "folder", "image_dir": folder}, 0
    task = tasks.get_task(config)
    with pytest.raises(ValueError, match=rf"evals\.{evaluator}: .*no examples"):
        task.evaluate(None, sharding.make_mesh(config.mesh))
