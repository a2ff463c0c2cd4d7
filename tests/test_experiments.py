"""Every experiment config loads and documents itself; every recipe, full-size and smoke, runs its
pp strings and traces its train state and step; and one recipe per task trains a few steps of its
smoke mode on the embedded data (tasks whose learning tests train a recipe through the trainer
are trained there)."""

import glob
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import configs, faults, optim, sharding, tasks, train
from mmjax.evaluate import runner

EXPERIMENTS = sorted(glob.glob("experiments/*/*.py"))


def test_experiments_found():
    assert len(EXPERIMENTS) >= 6


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_full_config_loads_and_documents_itself(path):
    config = configs.load_config(path)
    assert config.task in tasks._TASKS
    with open(path) as f:
        source = f.read()
    assert source.lstrip().startswith('"""') and "mmjax-train --config" in source, \
        "recipes state the paper, expected result and command in the docstring"


# Tasks whose learning tests (or, for MAE, the warm-start test) train one of their recipes through
# mmjax.train.train (data pipeline, train step, evaluators, checkpoints): a smoke run of another recipe
# of theirs would repeat that.
TRAINED_BY_LEARNING_TESTS = {
    "contrastive": "tests/test_train.py", "classification": "tests/test_train.py",
    "contrastive_momentum": "tests/tasks/test_momentum.py", "albef": "tests/tasks/test_albef_task.py",
    "blip": "tests/tasks/test_blip_learning.py", "vilt_vqa": "tests/tasks/test_vilt_tasks.py",
    "causal_lm": "tests/tasks/test_causal_lm_learning.py", "resampler_lm": "tests/tasks/test_causal_lm_learning.py",
    "mae": "tests/test_warm_start.py",
}


def _one_recipe_per_task() -> list[str]:
    """The recipes whose smoke mode is trained: one per task, a paper recipe where the task has one,
    none for the tasks of TRAINED_BY_LEARNING_TESTS. The others share its train step, losses and
    evaluators: their own settings (pp strings, model, optimizer, mesh) are run and traced at full
    size and in smoke mode by test_recipe_pp_and_train_state_trace."""
    chosen = {}
    for path in sorted(EXPERIMENTS, key=lambda p: ("shapes" in p, p)):
        task = configs.load_config(f"{path}:smoke=True").task
        if task not in TRAINED_BY_LEARNING_TESTS:
            chosen.setdefault(task, path)
    return sorted(chosen.values())


SMOKE_TRAINED = _one_recipe_per_task()


@pytest.mark.parametrize("task,test_file", sorted(TRAINED_BY_LEARNING_TESTS.items()))
def test_tasks_left_to_learning_tests_are_trained_there(task, test_file):
    with open(test_file) as f:
        source = f.read()
    assert "train.train(" in source, f"{test_file} no longer trains {task} through the trainer"
    assert any(configs.load_config(f"{p}:smoke=True").task == task and p in source for p in EXPERIMENTS), \
        f"{test_file} trains no recipe of task {task!r}"


@pytest.mark.parametrize("path", SMOKE_TRAINED)
def test_smoke_mode_trains(path, tmp_path):
    config = configs.load_config(f"{path}:smoke=True")
    final = train.train(config, str(tmp_path))
    assert all(math.isfinite(v) for v in final.values())
    assert final or not runner.evaluators(config.get("evals")), "a recipe with evaluators reports their metrics"
    with open(tmp_path / "metrics.jsonl") as f:   # recipes without evaluators (ViLT pretraining) log losses
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    assert losses and all(math.isfinite(v) for v in losses)


# --- Every recipe as it would start: pp strings run and the full-size train state traced ----------
#
# The full recipes name data sets that are not on this machine (ImageNet, LAION), so no data source
# is built: each pp string (training and every evaluation) is parsed and run on one synthetic
# example with the fields of the recipe's source, and the batch shapes it yields are traced,
# at the recipe's global batch size, through the task's init, the optimizer's init and one
# train step with `jax.eval_shape` (shapes only: no parameter memory, nothing compiled).
# The variants and training stages the recipes' docstrings name are traced too; image-text recipes
# get the folder arguments of their docstring commands (paths that are only named, never read).
PAIRS = "image_dir=/data/pairs,captions=/data/pairs/captions.jsonl"
SHAPES_VOCAB = "mmjax/data/tokenizers/shapes_vocab.txt"
FULL_SPECS = [
    "experiments/beit/in1k_finetune.py",
    # The full-size DALL-E encoder with random weights: its real weights come from a converted
    # model directory (`tokenizer=DIR`) that this machine does not have; the dVAE conversion and
    # loading are tested in tests/convert/test_dall_e.py.
    "experiments/beit/in1k_pretrain.py:tokenizer=random",
    f"experiments/clip/openclip_laion400m_b16.py:{PAIRS}",
    "experiments/clip/shapes.py",
    "experiments/clip/shapes.py:loss=siglip",
    "experiments/clip/shapes.py:stem=False",
    "experiments/clip/shapes_momentum.py",
    *[f"experiments/clip/vit_b16.py:variant={v},{PAIRS}" for v in ("B/32", "B/16", "L/14")],
    f"experiments/flip/laion400m.py:{PAIRS}",
    f"experiments/flip/laion400m.py:variant=L/16,{PAIRS}",
    f"experiments/flip/laion400m.py:unmasked_from=runs/flip_b16,{PAIRS}",   # init source only named
    *[f"experiments/mae/in1k_finetune.py:variant={v}" for v in ("B/16", "L/16", "H/14")],
    *[f"experiments/mae/in1k_pretrain.py:variant={v}" for v in ("B/16", "L/16", "H/14")],
    "experiments/mae/shapes.py",
    "experiments/mae/shapes.py:norm_pix=True",
    "experiments/mae/shapes_finetune.py",
    *[f"experiments/vit/augreg_i21k.py:variant={v}" for v in ("Ti/16", "S/32", "S/16", "B/32", "B/16", "L/16")],
    "experiments/vit/shapes.py",
    "experiments/vit/shapes.py:pool=gap,posemb=sincos2d",
    "experiments/vit/vit_i21k.py",
    # --- vilt recipes (ViLT helper adds its specs here) ---
    # bert-base-uncased's vocab.txt is not on this machine: the shapes WordPiece vocabulary stands in
    # for the tokenizer (the model keeps BERT's 30,522 ids).
    f"experiments/vilt/pretrain_4m.py:vocab={SHAPES_VOCAB},{PAIRS}",
    "experiments/vilt/shapes_vqa.py",
    "experiments/vilt/shapes_vqa.py:stem=False",
    # ViLT's 3,129-answer list is not on this machine either: 12 common VQA answers stand in (the head
    # is sized from the list, so only its output width differs from the recipe's).
    f"experiments/vilt/vqa_v2.py:vocab={SHAPES_VOCAB},answers=tests/fixtures/vilt_vqa_answers_sample.txt,"
    "image_dir=/data/coco,questions=/data/vqa/trainval.jsonl,test_questions=/data/vqa/minival.jsonl",
    # --- albef recipes (ALBEF helper adds its specs here) ---
    "experiments/albef/shapes.py",
    f"experiments/albef/pretrain_4m.py:data=4m,{PAIRS},vocab={SHAPES_VOCAB}",
    # --- blip pretraining recipes (BLIP pretraining helper adds its specs here) ---
    "experiments/blip/shapes.py",
    f"experiments/blip/pretrain_14m.py:data=14m,{PAIRS},vocab={SHAPES_VOCAB}",
    # --- blip fine-tuning recipes (BLIP fine-tuning helper adds its specs here) ---
    # The full recipes need the checkpoint's BERT vocabulary (`vocab=`); the shapes vocabulary stands in for it.
    *[f"experiments/blip/retrieval_coco.py:variant={v},vocab={SHAPES_VOCAB},{PAIRS},test_captions=/data/t.jsonl"
      for v in ("B", "L")],
    f"experiments/blip/retrieval_flickr.py:vocab={SHAPES_VOCAB},{PAIRS},test_captions=/data/t.jsonl",
    *[f"experiments/blip/caption_coco.py:variant={v},vocab={SHAPES_VOCAB},{PAIRS},test_captions=/data/t.jsonl"
      for v in ("B", "L")],
    f"experiments/blip/vqa_v2.py:vocab={SHAPES_VOCAB},image_dir=/data/coco,questions=/data/vqa/train.jsonl",
    "experiments/blip/shapes_caption.py",
    # --- blip2 recipes (BLIP-2 helper adds its specs here) ---
    # bert-base-uncased's vocab.txt and OPT's tokenizer files are not on this machine: the shapes
    # vocabularies stand in (the Q-Former keeps the stand-in's size + [DEC], the LM OPT's 50,272 ids).
    f"experiments/blip2/stage1.py:vocab={SHAPES_VOCAB},{PAIRS},init=models/blip2_stage1_init",
    f"experiments/blip2/stage2_opt.py:lm=opt-2.7b,vocab=shapes,{PAIRS},init=models/blip2_stage2_init",
    # Flan-T5's spiece.model is not on this machine either: the shapes words stand in (32,128 LM ids kept)
    f"experiments/blip2/stage2_t5.py:lm=flan-t5-xl,vocab=shapes,{PAIRS},init=models/blip2_stage2_t5_init",
    # Vicuna's tokenizer.model is not on this machine either: the shapes words stand in (32,000 LM ids kept)
    f"experiments/minigpt4/stage1.py:vocab=shapes,{PAIRS},init=models/minigpt4_init",
    f"experiments/minigpt4/stage2.py:lm=vicuna-7b,vocab=shapes,{PAIRS},init=runs/minigpt4_stage1",
    # --- the bridge demos on shapes (their init sources are only named) ---
    "experiments/lm/shapes.py",
    "experiments/blip2/shapes_stage1.py:clip=runs/clip",
    "experiments/blip2/shapes_stage2.py:stage1=runs/blip2_shapes_stage1,lm=runs/lm_shapes",
    "experiments/minigpt4/shapes.py:stage2=runs/blip2_shapes_stage2",
    "experiments/perceiver/shapes.py:clip=runs/clip,lm=runs/lm_shapes",
]
# Variants whose model another spec traces (the same model on other data) or the conversion tests
# check at real size by shape (OPT-6.7B): their configs load and their pp strings run, nothing more.
CONFIG_ONLY_SPECS = [
    # The fusion demos from the main job's image tower (tests/test_warm_start.py builds their models)
    "experiments/albef/shapes.py:clip=runs/clip",
    "experiments/blip/shapes.py:clip=runs/clip",
    "experiments/vilt/shapes_vqa.py:clip=runs/clip",
    f"experiments/albef/pretrain_4m.py:data=14m,{PAIRS},vocab={SHAPES_VOCAB}",
    f"experiments/blip/pretrain_14m.py:data=129m,{PAIRS},vocab={SHAPES_VOCAB}",
    f"experiments/blip2/stage2_opt.py:lm=opt-6.7b,vocab=shapes,{PAIRS},init=models/blip2_stage2_init",
    f"experiments/blip2/stage2_t5.py:lm=flan-t5-xxl,vocab=shapes,{PAIRS},init=models/blip2_stage2_t5_init",
]
# The smoke-trained recipes' smoke modes are run by training them.
SMOKE_SPECS = [f"{path}:smoke=True" for path in EXPERIMENTS if path not in SMOKE_TRAINED]
_SOURCE_FIELDS = {   # what each data source yields per example, as far as the pp strings see it
    "imagenet2012": ("image", "label", "file_name"),
    "imagenet21k": ("image", "label"),
    "folder": ("image", "caption"),             # with captions=; a class-per-folder tree has labels
    "webdataset": ("image", "caption"),
    "vqa_folder": ("image", "question", "answers"),   # experiments/blip/vqa_v2.py's JSONL of questions
}


def _synthetic_example(data) -> dict:
    """One example as `data`'s source would yield it, made up here (no data set is read)."""
    name = data["name"].split("/")[0]
    if name == "mmjax_shapes":
        from mmjax.data import shapes

        return shapes.generate_example(0, seed=0, image_size=32)
    if name == "folder" and data.get("captions") is None:
        name = "imagenet21k"   # image + label
    assert name in _SOURCE_FIELDS, f"no synthetic example for data source {name!r}: add it to _SOURCE_FIELDS"
    values = {"image": np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8),
              "label": np.int64(7), "file_name": "n01440764_10026.JPEG",
              "caption": "a photo of a small dog running on the grass.",
              "question": "what is the dog doing?", "answers": ["running"] * 7 + ["playing"] * 3}
    return {key: values[key] for key in _SOURCE_FIELDS[name]}


def _pp_shapes(data, pp: str, tokenizer, where: str, text_keys: frozenset = frozenset()) -> dict:
    """Runs the pp string on a synthetic example; the batch element's shapes and dtypes. Only
    `text_keys` (an evaluator's reference captions or answers) may hold strings."""
    from mmjax.data.pipeline import _canonical  # the trainer's dtype canonicalisation
    from mmjax.data.preprocess import Preprocess

    out = _canonical(Preprocess(pp, tokenizer)(_synthetic_example(data), np.random.default_rng(0)))
    shapes = {}
    for key, value in out.items():
        value = np.asarray(value)
        allowed = "biufUSO" if key in text_keys else "biuf"
        assert value.dtype.kind in allowed, f"{where}: pp {pp!r} leaves non-numeric {key!r}; keep() only arrays"
        shapes[key] = (value.shape, value.dtype)
    return shapes


def _text_keys(name: str, block) -> frozenset:
    """The string columns an evaluator reads on the host (captioning references, VQA answers,
    the captions whose attribute words retrieval reads)."""
    kind = runner.kind_of(name, block)
    if kind == "captioning":
        return frozenset({block.get("references_key", "caption")})
    if kind == "vqa":
        return frozenset({block.get("answers_key", "answer")})
    if kind in ("retrieval", "itm_retrieval") and block.get("attribute_words"):
        return frozenset({"caption"})     # which attributes each caption names
    return frozenset()


def _evals_with_pp(evals, prefix="evals"):
    """(name, data, pp, string columns) of every evaluation block, nested ones (probe train/test) included."""
    for key, value in evals.items():
        if isinstance(value, ml_collections.ConfigDict):
            if "pp" in value:
                yield f"{prefix}.{key}", value.data, value.pp, _text_keys(key, value)
            else:
                yield from _evals_with_pp(value, f"{prefix}.{key}")


def test_every_recipe_is_traced_at_full_size():
    assert {spec.split(":")[0] for spec in FULL_SPECS} == set(EXPERIMENTS)


@pytest.mark.parametrize("spec", CONFIG_ONLY_SPECS, ids=lambda spec: spec.replace(PAIRS, "PAIRS"))
def test_variant_configs_load_and_run_their_pp(spec):
    config = configs.load_config(spec)
    task = tasks.get_task(config)
    example = _pp_shapes(config.input.data, config.input.pp, task.tokenizer, "input.pp")
    assert "image" in example and int(config.input.batch_size) > 0


@pytest.mark.parametrize("spec", FULL_SPECS + SMOKE_SPECS, ids=lambda spec: spec.replace(PAIRS, "PAIRS"))
def test_recipe_pp_and_train_state_trace(spec):
    config = configs.load_config(spec)
    task = tasks.get_task(config)
    example = _pp_shapes(config.input.data, config.input.pp, task.tokenizer, "input.pp")
    for name, data, pp, text_keys in _evals_with_pp(config.get("evals", {})):
        got = _pp_shapes(data, pp, task.tokenizer, f"{name}.pp", text_keys)
        for key in set(got) & set(example):   # e.g. eval images at the model's training size
            assert got[key] == example[key], f"{name}.pp gives {key} {got[key]}, input.pp {example[key]}"

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.get_rules(config.get("sharding", "dp"))
    global_batch = int(config.input.batch_size)
    assert global_batch % sharding.data_parallel_size(mesh) == 0
    batch = {k: jax.ShapeDtypeStruct((global_batch, *shape), dtype) for k, (shape, dtype) in example.items()}
    # num_epochs-only recipes count their data set, which is not read here: any length will do.
    steps = train.total_steps(config) if config.get("total_steps") else 1_000
    rng = jax.random.key(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(task.init_variables, rng, batch)
        sharding.logical_shardings(boxed, mesh, rules)   # every logical axis name has a rule
        params = jax.eval_shape(lambda r, b: nn.meta.unbox(task.init_variables(r, b)), rng, batch)["params"]
        tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, steps, params)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                 "opt_state": jax.eval_shape(tx.init, params), "nonfinite": jax.eval_shape(faults.init_counters),
                 **jax.eval_shape(lambda p, r: nn.meta.unbox(task.init_extra_state(p, r) or {}), boxed["params"], rng)}
        new_state, metrics = jax.eval_shape(train.make_train_step(task, tx, schedule, rng), state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert all(a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True))
    assert metrics["loss"].shape == ()
