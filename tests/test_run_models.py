"""A run is a model: `mmjax.load(WORKDIR)` and `mmjax-convert --input WORKDIR` on real trainer
runs (shapes ViT and CLIP), exported to timm / open_clip / transformers and loaded there with
strict=True; MAE and BEiT runs become model directories and transformers folders; step=,
which=, mesh=, the inference spec, older runs without model_config.json, and bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmjax
from mmjax import checkpoint, configs, pretrained, runs, sharding, tasks
from mmjax.convert import cli
from mmjax.data import tokenizers

SHAPES_NAMES = 24
EXPECTED_PP = "resize(32)|value_range(-1,1)"


def convert(*args):
    cli.main([str(a) for a in args])


def max_abs_diff(got, want, label):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (label, got.shape, want.shape)
    diff = float(np.abs(got - want).max())
    print(f"{label}: max abs diff {diff:.3g} (max |x| {np.abs(want).max():.3g})")
    assert np.abs(want).max() > 1e-3        # a non-trivial output
    return diff


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def features(out):
    """transformers 4.x returns the projected features, 5.x an output with them as pooler_output."""
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()


@pytest.fixture(scope="module")
def trained(shapes_vit_run, shapes_clip_run):
    """The session's real trainer runs (tests/conftest.py): 4 steps of the shapes ViT and CLIP
    (the CLIP with a plain patch embedding, `stem=False`), checkpoints at steps 2 and 4."""
    return {"vit": shapes_vit_run.workdir, "clip": shapes_clip_run.workdir}


def images(n=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 32, 32, 3)).astype(np.float32)


def test_vit_run_exports_to_timm_and_transformers(trained, tmp_path):
    import timm
    from transformers import ViTForImageClassification

    model, variables = mmjax.load(trained["vit"])
    x = images()
    want = np.asarray(jax.jit(model.apply)(variables, x)["logits"])

    convert("--to", "timm", "--input", trained["vit"], "--output", tmp_path / "vit.safetensors")
    with open(tmp_path / "vit.json") as f:                    # the config that builds it in timm
        cfg = json.load(f)
    ref = timm.create_model(cfg["architecture"], **cfg["model_args"]).eval()
    ref.load_state_dict(load_file(str(tmp_path / "vit.safetensors")), strict=True)
    with torch.no_grad():
        got = ref(nchw(x)).numpy()
    assert max_abs_diff(got, want, "shapes ViT run -> timm logits") <= 1e-4

    convert("--to", "hf", "--input", trained["vit"], "--output", tmp_path / "hf")
    hf, info = ViTForImageClassification.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info                      # nothing missing, unexpected or mis-shaped
    with torch.no_grad():
        got = hf.eval()(pixel_values=nchw(x)).logits.numpy()
    assert max_abs_diff(got, want, "shapes ViT run -> transformers logits") <= 1e-4
    names = pretrained.inference_spec(trained["vit"])["class_names"]
    assert [hf.config.id2label[i] for i in range(SHAPES_NAMES)] == names


def test_clip_run_exports_to_open_clip_and_transformers(trained, tmp_path):
    import open_clip
    from transformers import CLIPModel

    model, variables = mmjax.load(trained["clip"])
    x = images()
    tokens = tokenizers.build_tokenizer({"name": "shapes", "context_length": 16})(
        ["a photo of a red circle", "a blue square", "a yellow star on a plain background"])
    encode = jax.jit(lambda v, x, t: (model.apply(v, x, method="encode_image"),
                                      model.apply(v, t, method="encode_text")))
    want_img, want_txt = (np.asarray(a) for a in encode(variables, x, tokens))

    out = tmp_path / "shapes_clip.safetensors"
    convert("--to", "open_clip", "--input", trained["clip"], "--output", out)
    open_clip.add_model_config(str(tmp_path / "shapes_clip.json"))     # registers "shapes_clip"
    ref = open_clip.create_model("shapes_clip", pretrained=str(out)).eval()   # loads with strict=True
    ref.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        got_img = ref.encode_image(nchw(x)).numpy()
        got_txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
    assert max_abs_diff(got_img, want_img, "shapes CLIP run -> open_clip encode_image") <= 1e-4
    assert max_abs_diff(got_txt, want_txt, "shapes CLIP run -> open_clip encode_text") <= 1e-4

    convert("--to", "hf", "--input", trained["clip"], "--output", tmp_path / "hf")
    hf, info = CLIPModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        got_img = features(hf.eval().get_image_features(pixel_values=nchw(x)))
        got_txt = features(hf.get_text_features(input_ids=torch.from_numpy(tokens).long()))
    assert max_abs_diff(got_img, want_img, "shapes CLIP run -> transformers image features") <= 1e-4
    assert max_abs_diff(got_txt, want_txt, "shapes CLIP run -> transformers text features") <= 1e-4


def test_run_becomes_a_model_directory_with_its_inference_spec(trained, tmp_path):
    for name in ("vit", "clip"):
        convert("--input", trained[name], "--output", tmp_path / name)
        model, variables = mmjax.load(str(tmp_path / name))
        run_model, run_variables = mmjax.load(trained[name])
        assert model == run_model
        jax.tree.map(np.testing.assert_array_equal, variables, run_variables)
        spec = pretrained.inference_spec(trained[name])
        assert pretrained.inference_spec(str(tmp_path / name)) == spec
        assert spec["preprocess"] == EXPECTED_PP and len(spec["class_names"]) == SHAPES_NAMES
        source = pretrained.read_config(str(tmp_path / name))["source"]
        assert source["step"] == 4 and source["run"] == os.path.abspath(trained[name])
    assert pretrained.inference_spec(trained["vit"])["kind"] == "classifier"
    clip_spec = pretrained.inference_spec(trained["clip"])
    assert clip_spec["kind"] == "contrastive" and clip_spec["tokenizer"] == {"name": "shapes", "context_length": 16}
    tokenizers.build_tokenizer(clip_spec["tokenizer"])       # the spec builds


def test_step_picks_an_older_checkpoint_and_only_params_are_read(trained):
    _, latest = mmjax.load(trained["vit"])
    _, older = mmjax.load(trained["vit"], step=2)
    want = checkpoint.restore_params(trained["vit"], 2)
    jax.tree.map(np.testing.assert_array_equal, older["params"], want)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(older), jax.tree.leaves(latest)))
    model_config, params, step = runs.read_params(trained["vit"])
    assert step == 4 and set(params) == set(latest["params"])


def test_mesh_places_params_sharded_and_equal(trained):
    mesh = sharding.make_mesh([("data", 1), ("fsdp", -1)])
    assert mesh.shape["fsdp"] == 8
    _, plain = mmjax.load(trained["clip"])
    _, sharded = mmjax.load(trained["clip"], mesh=mesh, sharding="fsdp")
    kernel = sharded["params"]["visual"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    assert not kernel.sharding.is_fully_replicated and kernel.sharding.mesh == mesh
    assert sharding.unsharded_fraction(sharded["params"]) < 0.2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, plain)


def test_ema_params_are_read_when_the_run_keeps_them(trained, tmp_path):
    """A run whose train state holds "ema_params" beside "params" (where a task's extra state keeps
    them: tests/tasks/test_momentum.py loads a real momentum run's)."""
    workdir = str(tmp_path / "ema_run")
    os.makedirs(workdir)
    shutil.copy(os.path.join(trained["vit"], pretrained.CONFIG_FILE), workdir)
    params = checkpoint.restore_params(trained["vit"])
    ema = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
    ckpt = checkpoint.Checkpointer(workdir, every_steps=1)
    ckpt.save(7, {"step": np.int32(7), "params": params, "ema_params": ema}, force=True)
    ckpt.close()
    _, got = mmjax.load(workdir, which="ema")
    jax.tree.map(np.testing.assert_array_equal, got["params"], ema)
    _, got = mmjax.load(workdir)
    jax.tree.map(np.testing.assert_array_equal, got["params"], params)


def test_older_run_without_model_config_is_rebuilt_from_its_config(trained, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained["vit"], old)
    os.remove(old / pretrained.CONFIG_FILE)
    model, variables = mmjax.load(str(old))
    want_model, want = mmjax.load(trained["vit"])
    assert model == want_model
    jax.tree.map(np.testing.assert_array_equal, variables, want)
    assert pretrained.inference_spec(str(old)) == pretrained.inference_spec(trained["vit"])


def test_bad_inputs_are_named(trained, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="No checkpoint step 3"):
        mmjax.load(trained["vit"], step=3)
    with pytest.raises(ValueError, match=r"keeps no ema parameters.*state/ema_params.*'opt_state', 'params'"):
        mmjax.load(trained["vit"], which="ema")
    with pytest.raises(ValueError, match="which='best'"):
        mmjax.load(trained["vit"], which="best")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(os.path.join(trained["vit"], "config.json"), empty)
    with pytest.raises(FileNotFoundError, match="has no checkpoints yet"):
        mmjax.load(str(empty))
    convert("--input", trained["vit"], "--output", tmp_path / "dir")
    with pytest.raises(ValueError, match="model directory: step= and which= apply to training runs only"):
        mmjax.load(str(tmp_path / "dir"), step=4)
    with pytest.raises(SystemExit):
        convert("--input", tmp_path / "dir", "--output", tmp_path / "again")
    assert "is not a training workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert("--to", "open_clip", "--input", trained["vit"], "--output", tmp_path / "x.safetensors")
    assert "Cannot write mmjax.models.vit.ViT as 'open_clip'" in capsys.readouterr().err
    broken = tmp_path / "broken_run"
    shutil.copytree(trained["vit"], broken)
    os.remove(broken / pretrained.CONFIG_FILE)
    with open(broken / "config.json", "w") as f:
        json.dump({"task": "no_such_task"}, f)
    with pytest.raises(ValueError, match="has no model_config.json.*Run mmjax-train once more"):
        mmjax.load(str(broken))


# --- MAE and BEiT: runs written with the trainer's pieces (task, Checkpointer, model_config.json)
# around random parameters, so that every weight is far from its init.

def _write_run(workdir, spec, seed):
    import flax.linen as nn

    config = configs.load_config(spec)
    task = tasks.get_task(config)
    batch = {"image": np.zeros((2, 32, 32, 3), np.float32)}
    shapes = nn.meta.unbox(jax.eval_shape(task.init_variables, jax.random.key(0), batch))["params"]
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: (0.2 * rng.normal(size=x.shape)).astype(np.float32), shapes)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    runs.write_model_config(workdir, config, task, batch)
    ckpt = checkpoint.Checkpointer(workdir, every_steps=1)
    ckpt.save(1, {"step": np.int32(1), "params": params, "opt_state": {"mu": params}}, force=True)
    ckpt.close()
    return params


def test_mae_run_becomes_a_model_directory_and_a_transformers_folder(tmp_path):
    from transformers import ViTMAEForPreTraining

    workdir = str(tmp_path / "mae")
    params = _write_run(workdir, "experiments/mae/shapes.py:smoke=True", seed=1)
    convert("--input", workdir, "--output", tmp_path / "dir")
    model, variables = mmjax.load(str(tmp_path / "dir"))
    jax.tree.map(np.testing.assert_array_equal, variables["params"], params)
    assert pretrained.inference_spec(workdir) == {"preprocess": EXPECTED_PP, "tokenizer": None,
                                                  "class_names": None, "kind": "other"}
    convert("--to", "hf", "--input", workdir, "--output", tmp_path / "hf")
    ref, info = ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info
    x, noise = images(2, seed=3), np.random.default_rng(4).uniform(size=(2, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref.eval()(pixel_values=nchw(x), noise=torch.from_numpy(noise)).logits.numpy()
    pred = jax.jit(model.apply)(variables, x, noise)["pred"]
    assert max_abs_diff(pred, want, "MAE run -> transformers ViTMAEForPreTraining reconstruction") <= 1e-4


def test_beit_run_becomes_a_model_directory_and_a_transformers_folder(tmp_path):
    from transformers import BeitForMaskedImageModeling

    workdir = str(tmp_path / "beit")
    params = _write_run(workdir, "experiments/beit/in1k_pretrain.py:smoke=True", seed=2)
    convert("--input", workdir, "--output", tmp_path / "dir")
    model, variables = mmjax.load(str(tmp_path / "dir"))
    jax.tree.map(np.testing.assert_array_equal, variables["params"], params["beit"])   # no tokenizer
    assert pretrained.inference_spec(workdir)["preprocess"] == "resize(32)|normalize('imagenet')"
    convert("--to", "hf", "--input", workdir, "--output", tmp_path / "hf")
    ref, info = BeitForMaskedImageModeling.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info
    x = images(2, seed=5)
    masked = np.random.default_rng(6).uniform(size=(2, 16)) < 0.4
    with torch.no_grad():
        want = ref.eval()(pixel_values=nchw(x), bool_masked_pos=torch.from_numpy(masked)).logits.numpy()
    got = jax.jit(model.apply)(variables, x, masked)["logits"]
    assert max_abs_diff(got, want, "BEiT run -> transformers BeitForMaskedImageModeling logits") <= 1e-4
