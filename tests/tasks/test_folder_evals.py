"""The evaluators on a user's class-per-folder data: zero-shot and top-1 over a folder of the
shapes test images equal the same evaluations over the TFDS split they came from."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax import configs, sharding, tasks
from mmjax.data import pipeline, shapes, sources
from mmjax.evaluate import split, zeroshot
from mmjax.evaluate.drivers import zeroshot as zeroshot_driver

NUM_TEST = 48


@pytest.fixture(scope="module")
def shapes_test(module_tmp):
    """(TFDS data config of a 48-image shapes test split, folder of the same images as PNG with
    class folders `red_circle`, ..., folder of them with `00_red_circle`, ... (shapes order))."""
    tmp = module_tmp("folder_evals")
    data = {"name": "mmjax_shapes", "split": "test", "data_dir": str(tmp / "tfds"), "num_train": 24,
            "num_test": NUM_TEST}
    source = sources.get_source(data)
    for i in range(len(source)):
        example = source[i]
        name = shapes.CLASS_NAMES[int(example["label"])].replace(" ", "_")
        for folder, cls in (("named", name), ("numbered", f"{int(example['label']):02d}_{name}")):
            (tmp / folder / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(example["image"]).save(tmp / folder / cls / f"{i}.png")
    return data, str(tmp / "named"), str(tmp / "numbered")


def _task_and_params(recipe, image_shape, image_tower=None, **extra):
    config = configs.load_config(recipe)
    if image_tower:
        config.model.image.update(image_tower)
    task = tasks.get_task(config)
    batch = {"image": jnp.zeros((8, *image_shape)), **extra}
    abstract = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch))["params"]
    rng = np.random.default_rng(0)

    def fill(path, x):   # init-like random values, without compiling init (11 s)
        if x.ndim <= 1:
            return np.full(x.shape, float("scale" in jax.tree_util.keystr(path)), np.float32)
        return (rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, abstract)
    return config, task, params, sharding.make_mesh(config.mesh)


def test_zeroshot_over_a_folder_equals_tfds_and_a_hand_count(shapes_test):
    data, named, _ = shapes_test
    # The earlier main job's tower: with these random weights the one-layer tower over a deep conv stem
    # (and the plain tower too) sends every image to one class.
    config, task, params, mesh = _task_and_params("experiments/clip/shapes.py:smoke=True", (32, 32, 3),
                                                  image_tower=dict(width=128, depth=4, num_heads=4, mlp_dim=512,
                                                                   conv_stem_depth=1),
                                                  text=jnp.zeros((8, 16), jnp.int32))
    cfg = config.evals.zeroshot
    with cfg.unlocked():
        cfg.max_examples, cfg.batch_size, cfg.templates = None, NUM_TEST, cfg.templates[:2]
        cfg.data = data
        via_tfds = zeroshot_driver.run(task, params, mesh, cfg, "zeroshot")
        cfg.data = {"name": "folder", "image_dir": named}
        via_folder = zeroshot_driver.run(task, params, mesh, cfg, "zeroshot")
    # By hand: the nearest class name of each image against the folder name it sits in.
    source = sources.get_source(cfg.data)
    names = [c.replace("_", " ") for c in source.classes]
    assert names != shapes.CLASS_NAMES[:len(names)]        # folder order is not TFDS's label order
    batch = next(pipeline.eval_batches(cfg.data, cfg.pp, len(source)))
    on_mesh = split.put_global({"image": batch["image"]}, mesh)["image"]    # the compiled shape
    images = np.asarray(split.fetch(task.embed_images(params, on_mesh)))
    class_embs = zeroshot.class_embeddings(lambda t: zeroshot_driver.embed_strings(task, params, t), names,
                                           list(cfg.templates))
    predicted = np.argmax(zeroshot.normalize(images) @ class_embs.T, axis=1)
    assert len(set(predicted.tolist())) >= 3                # not one class for everything
    hand = float(np.mean(predicted == batch["label"]))
    assert via_folder == via_tfds == {"zeroshot/top1": pytest.approx(hand, abs=1e-7),
                                      "zeroshot/num_classes": 24}


def test_top1_over_a_folder_equals_tfds(shapes_test, tmp_path):
    data, _, numbered = shapes_test
    config, task, params, mesh = _task_and_params("experiments/vit/shapes.py:smoke=True", (32, 32, 3))
    cfg = config.evals
    with cfg.unlocked():
        cfg.top1.max_examples, cfg.top1.batch_size = None, NUM_TEST
        cfg.top1.data = data
        via_tfds = task.evaluate(params, mesh)
        cfg.top1.data = {"name": "folder", "image_dir": numbered}  # 00_red_circle ...: the model's order
        via_folder = task.evaluate(params, mesh)
        assert via_folder == via_tfds and 0 < via_tfds["top1"] < 1
        for i in range(25):
            (tmp_path / f"{i:02d}").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "00" / "a.png")
        cfg.top1.data = {"name": "folder", "image_dir": str(tmp_path)}
        with pytest.raises(ValueError, match="has 25 classes but the model has model.num_classes=24"):
            task.evaluate(params, mesh)
