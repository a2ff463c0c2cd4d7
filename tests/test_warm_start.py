"""Warm start (`config.init`): mapping rules, presets (registered by their families), layouts,
resampling, errors, and the trainer starting a fine-tune from an MAE run (and a resumed
fine-tune keeping its own params)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import checkpoint, configs, layers, pretrained, sharding, train, warm_start
from mmjax.models import beit, mae, vit
from mmjax.param_paths import flatten, unstack_layers

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
IMAGES = jnp.zeros((8, 32, 32, 3))


def _init(model, *args):
    return jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), *args))["params"])


def _mae_params(scan=False):
    model = mae.MAE(**TINY, decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32, scan=scan)
    params = _init(model, IMAGES, jnp.zeros((8, 16)))
    params["norm"]["scale"] = params["norm"]["scale"] + 1.0    # differs from a fresh norm
    return params


def _save_run(workdir, params, step=7):
    """A run workdir holding `params` and an optimizer entry, as the trainer writes them."""
    ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1)
    ckpt.save(step, {"params": jax.tree.map(np.asarray, params), "opt_state": {"mu": np.zeros(3)}}, force=True)
    ckpt.close()
    return str(workdir)


def _target(model, images=IMAGES):
    """Sharded fresh params of `model` on an 8-device fsdp mesh: (params, shardings)."""
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    variables, shardings = sharding.init_sharded(lambda rng, x: model.init(rng, x), mesh,
                                                 sharding.get_rules("fsdp"), jax.random.key(0), images)
    return variables["params"], shardings["params"]


CLASSIFIER = dict(**TINY, pool="gap", class_token=True, fc_norm=True, posemb="learn", num_classes=5)
SMALL = dict(**TINY, num_classes=3)


@pytest.fixture(scope="module")
def mae_run(module_tmp):
    """A scanned MAE's params and a run workdir holding them."""
    params = _mae_params(scan=True)
    return _save_run(module_tmp("mae"), params), params


@pytest.fixture(scope="module")
def classifier():
    """An MAE-style ViT classifier, sharded: (params, shardings)."""
    return _target(vit.ViT(**CLASSIFIER))


@pytest.fixture(scope="module")
def small_vit():
    return _init(vit.ViT(**SMALL), IMAGES)


@pytest.fixture(scope="module")
def scanned_vit_48px():
    return _target(vit.ViT(**SMALL, scan=True), jnp.zeros((8, 48, 48, 3)))


def _config(model_fields, **init):
    return ml_collections.ConfigDict(dict(model=model_fields, init=init))


def _unscanned(params):
    return unstack_layers(flatten(jax.tree.map(np.asarray, params)))


# ---------------------------------------------------------------------------------------------
# Presets through `apply` (sharded targets, both layouts)
# ---------------------------------------------------------------------------------------------

def test_mae_to_vit_from_scanned_run(mae_run, classifier, capsys):
    (source, mae_params), (params, shardings) = mae_run, classifier
    out = warm_start.apply(_config(CLASSIFIER, source=source, preset="mae_to_vit"), params, shardings)

    src, got, fresh = _unscanned(mae_params), _unscanned(out), _unscanned(params)
    for path in ("embedding/conv/kernel", "cls", "encoder/layer_1/attn/query/kernel", "encoder/layer_0/mlp/fc2/bias"):
        np.testing.assert_array_equal(got[path], src[path])
    table = np.concatenate([np.zeros((1, 1, 32)), layers.sincos_2d((4, 4), 32)], axis=1)
    np.testing.assert_allclose(got["posemb/pos_embedding"], table, atol=1e-6)
    for path in ("head/kernel", "norm/scale", "norm/bias"):     # fresh: still the init
        np.testing.assert_array_equal(got[path], fresh[path])
    assert jax.tree.map(lambda x: x.sharding, out) == shardings
    line = capsys.readouterr().out
    n = len(got)        # all loaded but the 4 fresh and the sin-cos posemb
    assert f"init: {n - 5} of {n} parameter arrays from {source} (step 7) with preset 'mae_to_vit'" in line
    assert "kept at init: head (2), norm (2)" in line and "dropped from the source: decoder" in line


def test_beit_pretraining_run_to_scanned_classifier_with_per_layer_bias(tmp_path):
    pre = beit.BEiT(**TINY, vocab_size=16, rel_pos="shared")
    pre_params = _init(pre, IMAGES)
    pre_params["rel_pos_bias"]["table"] = np.random.default_rng(0).normal(size=(52, 2)).astype(np.float32)
    source = _save_run(tmp_path / "beit", {"beit": pre_params, "tokenizer": {"conv": {"kernel": np.ones((3, 3))}}})
    fields = dict(**TINY, num_classes=5, rel_pos="layer", scan=True)
    params, shardings = _target(beit.BEiT(**fields))
    out = warm_start.apply(_config(fields, source=source, preset="beit_to_classifier"), params, shardings)

    got, fresh = flatten(jax.tree.map(np.asarray, out)), flatten(jax.tree.map(np.asarray, params))
    tables = got["encoder/layers/rel_pos_bias/table"]
    assert tables.shape == (2, 52, 2)
    for i in range(2):
        np.testing.assert_array_equal(tables[i], pre_params["rel_pos_bias"]["table"])
        np.testing.assert_array_equal(got["encoder/layers/attn/query/kernel"][i],
                                      pre_params["encoder"][f"layer_{i}"]["attn"]["query"]["kernel"])
    np.testing.assert_array_equal(got["cls"], pre_params["cls"])
    for path in ("head/kernel", "norm/scale"):
        np.testing.assert_array_equal(got[path], fresh[path])


def test_beit_fine_tune_at_a_larger_image_resizes_the_relative_position_table(tmp_path, capsys):
    """BEiT pretrained at 32 px (4x4 window) -> classifier at 48 px (6x6): the shared table is
    resized as BEiT's fine-tuning does, then copied into every layer."""
    pre = beit.BEiT(**TINY, vocab_size=16, rel_pos="shared")
    pre_params = _init(pre, IMAGES)
    pre_params["rel_pos_bias"]["table"] = np.random.default_rng(0).normal(size=(52, 2)).astype(np.float32)
    source = _save_run(tmp_path / "beit", {"beit": pre_params})
    fields = dict(**TINY, num_classes=5, rel_pos="layer")
    params, shardings = _target(beit.BEiT(**fields), images=jnp.zeros((8, 48, 48, 3)))
    out = warm_start.apply(_config(fields, source=source, preset="beit_to_classifier"), params, shardings)

    want = layers.resize_relative_position_table(pre_params["rel_pos_bias"]["table"], (6, 6))
    assert want.shape == (11 * 11 + 3, 2)
    got = _unscanned(out)
    for i in range(2):
        np.testing.assert_array_equal(got[f"encoder/layer_{i}/rel_pos_bias/table"], want)
    assert "resized beit/rel_pos_bias/table (52, 2) to encoder/layer_0/rel_pos_bias/table (124, 2)" in (
        capsys.readouterr().out)


def test_same_preset_from_model_directory_resamples_the_position_embedding(tmp_path, small_vit, scanned_vit_48px,
                                                                          capsys):
    small_params, (params, shardings) = small_vit, scanned_vit_48px
    pretrained.save(str(tmp_path / "vit"), vit.ViT(**SMALL), small_params, [pretrained.input_spec((1, 32, 32, 3))])
    out = warm_start.apply(_config(dict(SMALL, scan=True), source=str(tmp_path / "vit"), preset="same"),
                           params, shardings)

    got = _unscanned(out)
    expected = layers.resample_posemb(jnp.asarray(small_params["posemb"]["pos_embedding"]), (6, 6), 1,
                                      method="bicubic")
    np.testing.assert_allclose(got["posemb/pos_embedding"], expected, atol=1e-6)
    np.testing.assert_array_equal(got["encoder/layer_1/mlp/fc1/kernel"],
                                  small_params["encoder"]["layer_1"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(got["head/kernel"], small_params["head"]["kernel"])
    assert "resized posemb/pos_embedding (1, 17, 32) to posemb/pos_embedding (1, 37, 32)" in capsys.readouterr().out


def test_rules_fresh_and_drop_on_part_of_a_scanned_stack(tmp_path, small_vit, scanned_vit_48px):
    """A custom mapping: read layer 0 from a renamed subtree, keep layer 1 of the scanned target fresh."""
    src, (params, shardings) = small_vit, scanned_vit_48px
    source = _save_run(tmp_path / "run", {"backbone": src})
    config = _config(dict(SMALL, scan=True), source=source, step=7, rules=[("(.*)", r"backbone/\1")],
                     fresh=["encoder/layer_1/.*"], drop="backbone/encoder/layer_1/.*")
    out = warm_start.apply(config, params, shardings)
    got, fresh = flatten(jax.tree.map(np.asarray, out)), flatten(jax.tree.map(np.asarray, params))
    kernel = got["encoder/layers/attn/key/kernel"]
    np.testing.assert_array_equal(kernel[0], src["encoder"]["layer_0"]["attn"]["key"]["kernel"])
    np.testing.assert_array_equal(kernel[1], fresh["encoder/layers/attn/key/kernel"][1])
    assert not np.array_equal(kernel[1], src["encoder"]["layer_1"]["attn"]["key"]["kernel"])


# ---------------------------------------------------------------------------------------------
# The preset registry
# ---------------------------------------------------------------------------------------------

def test_families_register_their_presets_next_to_their_conversion_tables():
    known = warm_start.presets()
    assert {"same", "mae_to_vit", "beit_to_classifier"} <= set(known)
    assert known["mae_to_vit"].__module__ == "mmjax.convert.mae"
    assert known["beit_to_classifier"].__module__ == "mmjax.convert.beit"


def test_register_preset_fixed_rules_and_name_clashes(monkeypatch, small_vit):
    monkeypatch.setattr(warm_start, "_PRESETS", dict(warm_start.presets()))
    rules = warm_start.InitRules(rules=(("(.*)", r"backbone/\1"),), fresh=("head/.*",))
    warm_start.register_preset("from_backbone", rules)
    warm_start.register_preset("from_backbone", rules)          # the same again (a re-import): fine
    source = {f"backbone/{p}": v for p, v in flatten(small_vit).items() if not p.startswith("head/")}
    target = {p: jax.ShapeDtypeStruct(np.shape(v), np.float32) for p, v in flatten(small_vit).items()}
    mapped = warm_start.map_params(target, source, warm_start.init_rules({"preset": "from_backbone"}, {}, list(source)))
    assert sorted(mapped.fresh) == ["head/bias", "head/kernel"] and len(mapped.arrays) == len(source)
    with pytest.raises(ValueError, match="'mae_to_vit' is already registered .*mmjax.convert.mae.mae_to_vit"):
        warm_start.register_preset("mae_to_vit", lambda model, source: warm_start.InitRules())
    with pytest.raises(TypeError, match="must be InitRules or a function"):
        warm_start.register_preset("bad", {"fresh": ["head/.*"]})


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------

def _shapes(**shapes):
    return {k.replace("__", "/"): jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def test_one_error_lists_unmatched_targets_unused_sources_and_mis_shaped():
    target = _shapes(enc__w=(4, 4), head__w=(4, 2), enc__b=(4,))
    source = {"enc/w": np.zeros((4, 4)), "enc/b": np.zeros((5,)), "decoder/w": np.zeros((3,))}
    with pytest.raises(warm_start.WarmStartError) as err:
        warm_start.map_params(target, source, warm_start.InitRules())
    text = str(err.value)
    assert "1 model parameters with no source (unmatched targets):\n  head/w (4, 2)" in text
    assert "1 source parameters neither used nor dropped (unused sources):\n  decoder/w (3,)" in text
    assert "enc/b: the model needs (4,), enc/b is (5,)" in text
    # ... and the same trees map once fresh / drop cover the differences (no silent passes above).
    fixed = warm_start.InitRules(fresh=("head/.*", "enc/b"), drop=("decoder/.*", "enc/b"))
    mapped = warm_start.map_params(target, source, fixed)
    assert sorted(mapped.arrays) == ["enc/w"] and mapped.dropped == ["enc/b", "decoder/w"]


def test_rule_naming_a_missing_source_path_is_reported():
    rules = warm_start.InitRules(rules=(("enc/(.*)", r"encoder/\1"),))
    with pytest.raises(warm_start.WarmStartError, match=r"enc/w \(4,\) \(looked for encoder/w\)"):
        warm_start.map_params(_shapes(enc__w=(4,)), {"enc/w": np.zeros(4)}, rules)


def test_mae_into_a_classifier_without_preset_names_every_gap(mae_run, classifier):
    (source, _), (params, shardings) = mae_run, classifier
    with pytest.raises(warm_start.WarmStartError) as err:
        warm_start.apply(_config(CLASSIFIER, source=source), params, shardings)
    text = str(err.value)
    assert "head/kernel (32, 5)" in text and "posemb/pos_embedding (1, 17, 32)" in text
    assert "decoder_pred/kernel" in text and "mask_token (1, 1, 16)" in text


@pytest.mark.parametrize("init,error,match", [
    (dict(source="/nonexistent/run"), FileNotFoundError, "does not exist"),
    (dict(source="EMPTY"), FileNotFoundError, "neither a run's workdir"),
    (dict(source="RUN", step=3), FileNotFoundError, "No checkpoint step 3"),
    (dict(source="RUN", preset="mae2vit"), ValueError, "Unknown init.preset 'mae2vit'"),
    (dict(source="RUN", rules=["a/(.*)"]), ValueError, "pair"),
    (dict(source="RUN", sorce="x"), ValueError, r"Unknown init key\(s\) \['sorce'\]"),
])
def test_bad_init_config(tmp_path, init, error, match):
    (tmp_path / "empty").mkdir()
    run = _save_run(tmp_path / "run", {"w": np.zeros(3)})
    init = {k: {"EMPTY": str(tmp_path / "empty"), "RUN": run}.get(v, v) if isinstance(v, str) else v
            for k, v in init.items()}
    params = {"w": jnp.zeros(3)}
    with pytest.raises(error, match=match):
        warm_start.apply(_config({}, **init), params, jax.tree.map(lambda x: x.sharding, params))


def test_cli_can_set_init_on_any_recipe(tmp_path):
    args = ["--config", "experiments/vit/shapes.py", "--workdir", str(tmp_path)]
    config, _, _ = train.parse_args(args + ["--config.init.source=runs/x", "--config.init.preset=same",
                                            "--config.init.fresh=['head/.*']"])
    assert (config.init.source, config.init.preset, list(config.init.fresh)) == ("runs/x", "same", ["head/.*"])
    with pytest.raises(KeyError, match="init.sorce"):
        train.parse_args(args + ["--config.init.sorce=runs/x"])


# ---------------------------------------------------------------------------------------------
# The trainer: fine-tune from an MAE run; a resumed fine-tune keeps its own parameters
# ---------------------------------------------------------------------------------------------

def _no_evals(spec):
    config = configs.load_config(spec)
    config.evals = ml_collections.ConfigDict({"every_steps": 0})     # not needed here: saves compiles
    return config


def test_trainer_fine_tunes_from_an_mae_run_and_resumes_from_its_own_checkpoint(tmp_path, capsys):
    mae_dir, ft_dir = str(tmp_path / "mae"), str(tmp_path / "ft")
    train.train(_no_evals("experiments/mae/shapes.py:smoke=True"), mae_dir)
    source = flatten(checkpoint.restore_params(mae_dir))

    # lr 0: the fine-tune's saved parameters are exactly the ones it started from.
    train.train(_no_evals(f"experiments/mae/shapes_finetune.py:smoke=True,lr=0.0,init_from={mae_dir}"), ft_dir)
    tuned = flatten(checkpoint.restore_params(ft_dir))
    n = len(tuned)      # all loaded but head and norm (fresh) and the sin-cos posemb
    assert f"init: {n - 5} of {n} parameter arrays from {mae_dir} (step 4) with preset 'mae_to_vit'" \
        in capsys.readouterr().out
    for path in ("embedding/conv/kernel", "cls", "encoder/layer_0/attn/query/kernel", "encoder/layer_1/mlp/fc2/kernel"):
        np.testing.assert_array_equal(tuned[path], source[path])
    assert not np.any(tuned["head/kernel"])         # zero-initialised head, not from anywhere

    # Resuming: the run's own checkpoint wins; init.source is not even read (it no longer exists).
    config = _no_evals("experiments/mae/shapes_finetune.py:smoke=True,init_from=/nonexistent/run")
    config.total_steps = 6
    train.train(config, ft_dir)
    out = capsys.readouterr().out
    assert "Resumed from step 4" in out and "init:" not in out
    with open(os.path.join(ft_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert logged == [2, 4, 6]


def test_several_sources_each_under_its_prefix(tmp_path):
    """A bridge model put together from two runs: one read at the root, one under a prefix; the
    same path from two sources is an error, as is a step with several sources."""
    first = _save_run(tmp_path / "a", {"vision": {"w": np.ones((2, 3))}, "head": {"b": np.zeros(2)}})
    second = _save_run(tmp_path / "b", {"embed": {"w": np.full((4, 2), 2.0)}})
    arrays, where = warm_start.read_sources([("", first), ("language_model/", second)])
    assert sorted(arrays) == ["head/b", "language_model/embed/w", "vision/w"]
    np.testing.assert_array_equal(arrays["language_model/embed/w"], np.full((4, 2), 2.0))
    assert first in where and "under 'language_model/'" in where
    with pytest.raises(warm_start.WarmStartError, match="from two sources"):
        warm_start.read_sources([("", first), ("", first)])
    with pytest.raises(ValueError, match="init.step applies to one source"):
        warm_start.read_sources([("", first)], step=7)
    with pytest.raises(ValueError, match="list of \\(prefix, path\\) pairs"):
        warm_start.read_sources([first])


def _recipe_param_shapes(spec: str) -> dict:
    """Flat parameter shapes of a recipe's model at its real size (abstract: nothing computed)."""
    from mmjax import tasks

    task = tasks.get_task(configs.load_config(spec))
    tokens = jnp.asarray(task.tokenizer(["a red circle"] * 2))
    batch = {"image": jnp.zeros((2, 32, 32, 3)), "text": tokens, "mlm_input": tokens,
             "mlm_labels": jnp.zeros(tokens.shape, jnp.int32), "answer_id": jnp.zeros((2,), jnp.int32)}
    return flatten(nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch)["params"]))


@pytest.mark.parametrize("spec, loaded", [
    ("experiments/albef/shapes.py", r"visual_encoder/"), ("experiments/blip/shapes.py", r"vision_model/"),
    ("experiments/vilt/shapes_vqa.py", r"(stem|encoder|ln_final)/|cls$|pos_embedding$")])
def test_shapes_fusion_recipes_take_their_image_encoder_from_the_main_jobs_clip_run(spec, loaded):
    """`clip=RUN`: the image encoder's parameters (ViLT: its whole transformer) are read from the CLIP
    run's image tower at their shapes, every other parameter stays fresh, and every CLIP parameter
    is used or dropped."""
    import re

    config = configs.load_config(f"{spec}:clip=runs/clip")
    target = _recipe_param_shapes(f"{spec}:clip=runs/clip")
    source = {k: np.zeros(v.shape, v.dtype) for k, v in _recipe_param_shapes("experiments/clip/shapes.py").items()}
    rules = warm_start.init_rules(warm_start.config_block(config.init), {}, list(source))
    mapped = warm_start.map_params(target, source, rules)        # raises on any gap or mis-shape
    want = {path for path in target if re.match(loaded, path)}
    assert want and set(mapped.arrays) == want and set(mapped.fresh) == set(target) - want
    assert config.optimizer.lr_multipliers[0][1] < 1
