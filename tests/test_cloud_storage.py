"""Runs, data and models in a Cloud Storage bucket (gs://), against a local emulator.

The emulator (`gcs_emulator.py`, gcp-storage-emulator on 127.0.0.1) is started by this module
and stopped at its end; tensorstore (orbax's arrays) and gcsfs (etils.epath, mmjax.paths) are
pointed at it through environment variables, with no credentials. Checked here:

* the path layer: files, append, listings, moves, mirrors; local paths unchanged;
* checkpoints in a bucket: a corrupted object in the newest step falls back to the previous step,
  which is moved aside to corrupt_checkpoints/;
* mmjax-train --workdir gs://bucket/run with TFDS data from a gs:// data_dir, SIGKILLed mid-run
  and while a checkpoint commit is held open, resumed from the bucket, ends bit-identical to an
  uninterrupted local run (state and every logged loss); metrics.jsonl, TensorBoard, config.json
  and final_metrics.json are in the bucket and nothing was written to a local "gs:" folder;
* mmjax.load and mmjax-convert (both directions) with model directories and files in the bucket;
* webdataset shards and folder (JSONL) data in the bucket;
* class-per-folder data in the bucket (split folders, holdout) equal to the same folders on local
  disk, and mmjax-predict's gs:// globs and folders.
"""

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gcs_emulator  # noqa: E402
import trainer_process  # noqa: E402

from mmjax import checkpoint, paths  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
STEPS = 8
ARGS = [f"--config.total_steps={STEPS}",
        "--config.log_every_steps=1", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2",
        "--config.model.depth=1", "--config.model.width=32", "--config.model.mlp_dim=64",
        "--config.model.num_heads=2", "--config.input.batch_size=16",
        "--config.mesh=[('data', 4), ('fsdp', 2)]", "--config.sharding=fsdp",
        "--config.evals.top1.max_examples=32"]
# experiments/vit/shapes.py:smoke=True reading its TFDS data from DATA_DIR (no override can add
# the data_dir key the recipe leaves out).
RECIPE = """
import importlib.util

def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("vit_shapes", {recipe!r})
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    c = recipe.get_config("smoke=True")
    for data in (c.input.data, c.evals.top1.data):
        data.update(data_dir={data_dir!r}, num_train={num_train}, num_test={num_test})
    return c
"""
SHAPES_SIZES = (512, 128)  # train, test examples: a small copy of the shapes data, quick to make


@pytest.fixture(scope="module")
def gcs(module_tmp):
    """The emulator's URL, with this process (and its children) pointed at it."""
    proc, url = gcs_emulator.start(BUCKET)
    saved = dict(os.environ)
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    os.environ.update(gcs_emulator.environment(url))
    os.environ["MMJAX_CACHE_DIR"] = str(module_tmp("mmjax_cache"))
    _reset_clients()
    try:
        yield url
    finally:
        os.environ.clear()
        os.environ.update(saved)
        _reset_clients()
        gcs_emulator.stop(proc)


def _reset_clients():
    """Forgets file system objects made for another endpoint and re-reads fsspec's env config."""
    import fsspec.config
    from etils.epath import backend

    fsspec.config.conf.pop("gcs", None)
    fsspec.config.set_conf_env(fsspec.config.conf)
    backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001
    try:
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass


def _url(*parts):
    return "/".join([f"gs://{BUCKET}", *parts])


def test_path_layer(gcs, tmp_path):
    root = _url("paths")
    with paths.open(paths.join(root, "a", "x.txt"), "w") as f:
        f.write("hello")
    assert paths.isfile(_url("paths", "a", "x.txt")) and paths.isdir(_url("paths", "a"))
    assert paths.listdir(root) == ["a"] and paths.getsize(_url("paths", "a", "x.txt")) == 5
    log = paths.open_append(paths.join(root, "log.jsonl"))
    log.write("1\n")
    assert paths.open(paths.join(root, "log.jsonl")).read() == "1\n"  # durable at each line
    log.close()
    with paths.open_append(paths.join(root, "log.jsonl")) as log:  # a resumed run appends
        log.write("2\n")
    assert paths.open(paths.join(root, "log.jsonl")).read() == "1\n2\n"
    paths.move(paths.join(root, "a"), paths.join(root, "b", "a"))
    assert paths.list_files(root) == ["b/a/x.txt", "log.jsonl"]
    assert paths.existing_files([_url("paths", "b", "a", "x.txt"), _url("paths", "b", "a", "y.txt")]) == \
        {_url("paths", "b", "a", "x.txt")}
    mirror = paths.LocalMirror(paths.join(root, "tb"))
    with open(os.path.join(mirror.local, "events"), "w") as f:
        f.write("e1")
    mirror.sync()
    assert paths.open(paths.join(root, "tb", "events")).read() == "e1"
    mirror.close()
    assert not os.path.exists(mirror.local)
    with pytest.raises(ValueError, match="not available on object stores"):
        paths.open(paths.join(root, "x"), "a")
    # Local paths keep their meaning, and a URL never turns into a local folder.
    assert paths.resolve("gs://bucket/run/") == "gs://bucket/run"
    assert paths.resolve(str(tmp_path / "run")) == str(tmp_path / "run")
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(REPO, "gs:"))


def _small_state(value):
    return {"step": jnp.int32(value), "params": {"w": jnp.full((64, 32), value, jnp.float32),
                                                 "b": jnp.arange(5, dtype=jnp.float32) * value}}




def test_corrupt_checkpoint_in_a_bucket_falls_back(gcs, caplog):
    workdir = _url("corrupt_run")
    saver = checkpoint.Checkpointer(workdir, every_steps=1, keep=5)
    for step in (1, 2, 3):
        saver.save(step, _small_state(step), trainer_process.Position(step * 10))
    saver.close()
    step_dir = _url("corrupt_run", "checkpoints", "3")
    with paths.open(paths.join(step_dir, checkpoint.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["checksum"] == "crc32c" and checkpoint.find_problem(step_dir) is None
    # Damage the biggest array object of step 3: same size, one bit flipped.
    details = paths.file_details(paths.join(step_dir, "state"))
    name = max((n for n in details if "/d/" in n), key=lambda n: int(details[n]["size"]))
    with paths.open(paths.join(step_dir, "state", name), "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    with paths.open(paths.join(step_dir, "state", name), "wb") as f:
        f.write(bytes(data))
    assert "does not match its checksum" in checkpoint.find_problem(step_dir)

    ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=5)
    abstract = checkpoint.abstract_like(_small_state(0), jax.tree.map(lambda x: x.sharding, _small_state(0)))
    position = trainer_process.Position()
    with caplog.at_level("WARNING"):
        step, state = ckpt.restore_latest(abstract, position)
    assert step == 2 and position.n == 20
    np.testing.assert_array_equal(state["params"]["w"], _small_state(2)["params"]["w"])
    assert "Checkpoint step 3 is corrupt" in caplog.text
    assert paths.listdir(_url("corrupt_run", "corrupt_checkpoints")) == ["3"]
    assert paths.listdir(_url("corrupt_run", "checkpoints")) == ["1", "2"]
    assert ckpt.save(3, _small_state(3), position)  # the run goes on and writes step 3 again
    ckpt.close()
    assert checkpoint.find_problem(step_dir) is None
    assert int(checkpoint.load_train_state(workdir)["step"]) == 3


# ---------------------------------------------------------------------------------------------
# Training in a bucket, killed and resumed
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_data(gcs, module_tmp):
    """The shapes data prepared locally and uploaded: (local data_dir, gs:// data_dir)."""
    from mmjax.data import shapes

    local = str(module_tmp("tfds"))
    shapes.prepare(local, num_train=SHAPES_SIZES[0], num_test=SHAPES_SIZES[1])
    remote = _url("tfds")
    paths.filesystem(remote).put(os.path.join(local, "mmjax_shapes"), remote + "/", recursive=True)
    return local, remote


def _env(cache_dir, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    env.pop(checkpoint.COMMIT_DELAY_ENV, None)
    env.update(extra)
    return env


def _recipe(folder, data_dir):
    path = os.path.join(folder, f"recipe_{abs(hash(data_dir))}.py")
    with open(path, "w") as f:
        f.write(RECIPE.format(recipe=os.path.join(REPO, "experiments", "vit", "shapes.py"), data_dir=data_dir,
                              num_train=SHAPES_SIZES[0], num_test=SHAPES_SIZES[1]))
    return path


def _run(workdir, recipe, env, kill_on=None, cwd=REPO):
    args = [sys.executable, "-u", "-m", "mmjax.train", "--config", recipe, *ARGS, "--workdir", workdir]
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return trainer_process.watch(proc, kill_on)


def _resumed_from(lines):
    found = [int(m.group(1)) for m in (re.match(r"Resumed from step (\d+)", x) for x in lines) if m]
    return found[0] if found else 0


def _logged(workdir):
    out = {}
    with paths.open(paths.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if "loss" in record:
                out.setdefault(record["step"], []).append((record["loss"], record["grad_norm"]))
    return out


def test_train_in_a_bucket_survives_sigkill_bit_exact(gcs, shapes_data, tmp_path):
    local_data, remote_data = shapes_data
    cache_dir = str(tmp_path / "jax_cache")
    run_dir = tmp_path / "cwd"  # the trainers' working directory: must stay empty of "gs:"
    run_dir.mkdir()
    local_recipe, remote_recipe = _recipe(str(tmp_path), local_data), _recipe(str(tmp_path), remote_data)
    env = _env(cache_dir, PYTHONPATH=REPO)
    reference = str(tmp_path / "reference")
    _run(reference, local_recipe, env, cwd=str(run_dir))

    workdir = _url("runs", "vit")
    held = _env(cache_dir, PYTHONPATH=REPO, **{checkpoint.COMMIT_DELAY_ENV: "120"})
    lines, killed = _run(workdir, remote_recipe, env, lambda x: x.startswith(f"step 5/{STEPS} "),
                         cwd=str(run_dir))
    assert killed, "".join(lines[-30:])
    # Killed while step 6 is written but not committed (on GCS: no commit_success.txt yet).
    lines, killed = _run(workdir, remote_recipe, held, lambda x: "holding the commit" in x, cwd=str(run_dir))
    assert killed, "".join(lines[-30:])
    pending = int(re.search(r"checkpoint step (\d+)", lines[-1]).group(1))
    assert pending > _resumed_from(lines)
    assert not paths.isfile(_url("runs", "vit", "checkpoints", str(pending), "commit_success.txt"))
    lines, _ = _run(workdir, remote_recipe, env, cwd=str(run_dir))
    assert 0 < _resumed_from(lines) < pending, "the uncommitted step must not be restored"

    nbytes = trainer_process.assert_same_train_state(reference, workdir)
    expected, logged = _logged(reference), _logged(workdir)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, runs in logged.items():
        assert runs == expected[step] * len(runs), f"step {step}: {runs} != {expected[step]}"
    names = paths.listdir(workdir)
    assert {"checkpoints", "config.json", "final_metrics.json", "metrics.jsonl", "tensorboard"} <= set(names)
    assert [n for n in paths.listdir(paths.join(workdir, "tensorboard")) if n.startswith("events.out")]
    with paths.open(paths.join(workdir, "final_metrics.json")) as f, \
            open(os.path.join(reference, "final_metrics.json")) as g:
        assert json.load(f) == json.load(g)
    assert os.listdir(run_dir) == [], "something was written to a local folder instead of the bucket"
    print(f"\ngs:// run killed twice (mid-run, during a held commit) and resumed: "
          f"{nbytes} state bytes equal to the local run")


def test_workdir_errors_are_clear(gcs):
    from mmjax import train

    with pytest.raises(ValueError, match="not writable"):
        train.check_writable("gs://no-such-bucket/run")
    train.check_writable(_url("writable"))


# ---------------------------------------------------------------------------------------------
# Model directories and conversion
# ---------------------------------------------------------------------------------------------

def test_model_directories_and_convert_in_a_bucket(gcs, capsys):
    import flax.linen as nn

    import mmjax
    from mmjax import pretrained
    from mmjax.convert import cli, vit
    from mmjax.models.vit import ViT

    name = "vit_tiny_patch16_32"
    fields, size = vit.timm_architecture(name)
    model = ViT(**fields, num_classes=10)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(0)  # random values without running init (12 layers: slow on a CPU)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), shapes["params"])
    directory = _url("models", "vit")
    pretrained.save(directory, model, params, [pretrained.input_spec((1, size, size, 3))])
    assert paths.isfile(paths.join(directory, pretrained.CONFIG_FILE))

    loaded, variables = mmjax.load(directory)
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
    want = flat(params)
    assert flat(variables["params"]).keys() == want.keys()
    assert all(np.array_equal(flat(variables["params"])[k], v) for k, v in want.items())

    exported = _url("exports", "vit.safetensors")
    cli.main(["--to", "timm", "--input", directory, "--output", exported])
    assert paths.isfile(exported)
    again = _url("models", "vit_again")
    cli.main(["--source", "timm", "--model", name, "--checkpoint", exported, "--output", again])
    _, variables = mmjax.load(again)
    got = flat(variables["params"])
    assert got.keys() == want.keys() and all(np.array_equal(got[k], v) for k, v in want.items())
    assert "mmjax.load('gs://bucket/models/vit_again')" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not an mmjax model directory"):
        pretrained.read_config(_url("models", "missing"))


# ---------------------------------------------------------------------------------------------
# Data in a bucket
# ---------------------------------------------------------------------------------------------

def _png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(examples):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, (image, caption) in examples.items():
            for ext, data in (("png", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_webdataset_and_folder_data_in_a_bucket(gcs):
    from mmjax.data import folder, webdataset

    fs = paths.filesystem(_url())
    for shard in range(3):
        examples = {f"{shard:02d}{i:03d}": (_png((shard * 40, i * 10, 0)), f"shard {shard} example {i}")
                    for i in range(4)}
        fs.pipe_file(_url("wds", f"{shard:05d}.tar"), _shard(examples))
    shards = webdataset.expand_shards(_url("wds", "{00000..00002}.tar"))
    assert shards == [_url("wds", f"{i:05d}.tar") for i in range(3)]
    assert webdataset.expand_shards(_url("wds", "*.tar")) == shards
    with pytest.raises(FileNotFoundError, match="1 of 4 shards do not exist"):
        webdataset.expand_shards(_url("wds", "{00000..00003}.tar"))
    source = webdataset.WebDatasetSource(shards)
    assert len(source) == 12
    assert source[5]["caption"] == "shard 1 example 1" and source[5]["image"].shape == (6, 8, 3)
    stream = iter(webdataset.WebDatasetStream(shards, seed=0, num_epochs=1))
    captions = sorted(example["caption"] for example in stream)
    assert len(captions) == 12 and captions[0] == "shard 0 example 0"
    stream.close()
    for tar in source._tars.values():  # noqa: SLF001 - the shards this process opened
        tar.close()

    for i in range(3):
        fs.pipe_file(_url("folder", "images", f"{i}.png"), _png((i * 50, 0, 0)))
    lines = [{"image": f"{i}.png", "caption": f"image {i}"} for i in range(4)]  # 3.png is missing
    fs.pipe_file(_url("folder", "captions.jsonl"), "\n".join(map(json.dumps, lines)).encode())
    data = folder.FolderSource(_url("folder", "images"), _url("folder", "captions.jsonl"))
    assert len(data) == 3 and data.skipped == {"missing image": 1}
    assert data[2]["caption"] == "image 2" and data[2]["image"][0, 0].tolist() == [100, 0, 0]


def _relative_examples(source, root):
    """(path relative to the data root, label, image or None) of every example of a source."""
    out = []
    for i, label in enumerate(source.labels):
        path = source.path(i)
        assert path.startswith(root.rstrip("/") + "/")
        example = source[i]
        image = None if example is None else example["image"].tolist()
        assert example is None or example["label"] == label
        out.append((path[len(root.rstrip("/")) + 1:], label, image))
    return out


def test_class_folders_and_predict_images_in_a_bucket(gcs, tmp_path):
    """A class-per-folder data set (split folders, holdout) read from the bucket gives the same
    classes, examples, labels and images as the same folders on local disk; mmjax-predict expands
    gs:// globs and folders as it does local ones."""
    from mmjax import predict
    from mmjax.data import sources

    files = {}
    for split, count in (("train", 3), ("val", 2)):
        for c, name in enumerate(["cat", "dog", "golden_retriever"]):
            for i in range(count):
                sub = "nested/" if i == 2 else ""
                files[f"{split}/{name}/{sub}{i}.png"] = _png((c * 80, i * 30, 100 if split == "val" else 0))
    # torchvision's order walks folders by path (cat/nested before cat/nested-b), not by file path
    files["train/cat/nested-b/3.png"] = _png((1, 2, 3))
    files["train/cat/notes.txt"] = b"not an image"
    files["train/dog/broken.jpg"] = b"\xff\xd8\xff\xe0 truncated"
    local = tmp_path / "class_folders"
    fs = paths.filesystem(_url())
    for relative, data in files.items():
        (local / relative).parent.mkdir(parents=True, exist_ok=True)
        (local / relative).write_bytes(data)
        fs.pipe_file(_url("class_folders", relative), data)

    url = _url("class_folders")
    for sub, extra in (("", {"split": "train"}), ("", {"split": "val"}), ("train", {}),
                       ("train/", {"split": "holdout", "holdout": 0.4, "seed": 3}),
                       ("train", {"split": "train", "holdout": 0.4, "seed": 3})):
        local_config = {"name": "folder", "image_dir": os.path.join(local, sub), **extra}
        remote_config = {"name": "folder", "image_dir": f"{url}/{sub}" if sub else url, **extra}
        expected, got = sources.get_source(local_config), sources.get_source(remote_config)
        assert got.classes == expected.classes == ["cat", "dog", "golden_retriever"]
        assert got.labels == expected.labels and got.skipped == expected.skipped
        assert (_relative_examples(got, paths.resolve(remote_config["image_dir"]))
                == _relative_examples(expected, os.path.join(local, sub)))
        assert sources.class_names(remote_config) == ["cat", "dog", "golden retriever"]
    train = sources.get_source({"name": "folder", "image_dir": _url("class_folders", "train")})
    assert [train.path(i)[len(url) + 1:] for i in range(4)] == [
        "train/cat/0.png", "train/cat/1.png", "train/cat/nested/2.png", "train/cat/nested-b/3.png"]
    assert train.skipped == {"not an image file": 1} and train[6] is None and train.unreadable == 1
    with pytest.raises(ValueError, match=r"holds split folders \['train', 'val'\], not class folders"):
        sources.get_source({"name": "folder", "image_dir": url})
    with pytest.raises(FileNotFoundError, match=r"no split folder .*test.*split folders there: \['train', 'val'\]"):
        sources.get_source({"name": "folder", "image_dir": url, "split": "test"})
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        sources.get_source({"name": "folder", "image_dir": _url("class_folders", "nope")})

    def relative(found, root):
        return [p[len(root) + 1:] for p in found]

    remote_found = predict.image_files([_url("class_folders", "*", "*", "*.png")])
    local_found = predict.image_files([os.path.join(local, "*", "*", "*.png")])
    assert relative(remote_found, url) == relative(local_found, str(local)) and len(remote_found) == 12
    assert all(p.startswith("gs://") for p in remote_found)
    remote_found = predict.image_files([_url("class_folders", "val"), _url("class_folders", "train", "dog", "*")])
    local_found = predict.image_files([os.path.join(local, "val"), os.path.join(local, "train", "dog", "*")])
    assert relative(remote_found, url) == relative(local_found, str(local))
    assert relative(remote_found, url)[-1] == "train/dog/broken.jpg"           # files only: not dog/nested
    with pytest.raises(FileNotFoundError, match="no image matches"):
        predict.image_files([_url("class_folders", "train", "*")])           # only folders match
    good, bad = predict.read_images(remote_found[-3:])
    assert [p for p, _ in bad] == [_url("class_folders", "train", "dog", "broken.jpg")]
    assert [image[0, 0].tolist() for _, image in good] == [[80, 0, 0], [80, 30, 0]]
