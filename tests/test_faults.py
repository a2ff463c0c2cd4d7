"""Non-finite steps (skip or stop) and run setups that must fail before anything compiles."""

import json
import os

import numpy as np
import pytest

from mmjax import checkpoint, configs, train

TINY_VIT = ["--config.model.depth=1", "--config.model.width=32", "--config.model.mlp_dim=64",
            "--config.model.num_heads=2", "--config.input.batch_size=8",
            "--config.evals.top1.max_examples=8", "--config.evals.top1.batch_size=8"]


def _config(*overrides, nonfinite=None):
    config = configs.apply_overrides(configs.load_config("experiments/vit/shapes.py:smoke=True"),
                                     TINY_VIT + list(overrides))
    if nonfinite is not None:
        with config.unlocked():
            config.nonfinite = nonfinite
    return config


class _PoisonedLoader:
    """Wraps the train loader: batch number `bad_batch` (1-based) of each iterator is NaN."""

    def __init__(self, loader, bad_batch):
        self.loader, self.bad_batch = loader, bad_batch

    def __iter__(self):
        return _PoisonedIterator(iter(self.loader), self.bad_batch)


class _PoisonedIterator:
    def __init__(self, it, bad_batch):
        self.it, self.bad_batch, self.count = it, bad_batch, 0

    def __next__(self):
        batch, self.count = dict(next(self.it)), self.count + 1
        if self.count == self.bad_batch:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


@pytest.fixture
def nan_at_step_3(monkeypatch):
    make_loader = train.pipeline.make_train_loader
    monkeypatch.setattr(train.pipeline, "make_train_loader",
                        lambda *a, **k: _PoisonedLoader(make_loader(*a, **k), bad_batch=3))


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_skip_mode_drops_the_bad_update_and_counts_it(tmp_path, nan_at_step_3, caplog):
    workdir = str(tmp_path)
    config = _config("--config.total_steps=6", "--config.log_every_steps=1",
                     "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=10", nonfinite="skip")
    with caplog.at_level("WARNING"):
        train.train(config, workdir)
    logged = _metrics(workdir)
    assert np.isnan(logged[3]["loss"]) and all(np.isfinite(logged[s]["loss"]) for s in (1, 2, 4, 5, 6))
    assert [logged[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert "Skipped 1 step(s) with non-finite loss or gradients by step 3 (first at step 3)" in caplog.text
    states = {s: checkpoint.load_train_state(workdir, s) for s in (2, 3, 4)}
    for key in ("params", "opt_state"):  # step 3 changed nothing; step 4 trained again
        before, bad, after = (_leaves(states[s][key]) for s in (2, 3, 4))
        assert all(a.tobytes() == b.tobytes() for a, b in zip(before, bad)), key
        assert any(a.tobytes() != b.tobytes() for a, b in zip(bad, after)), key
    assert int(states[3]["step"]) == 3 and int(states[3]["nonfinite"]["first_step"]) == 3
    assert all(np.isfinite(x).all() for x in _leaves(checkpoint.restore_params(workdir)))


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_stop_mode_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, nan_at_step_3):
    """Checked only at log/save steps, yet the error names step 3 and nothing after it is saved."""
    workdir = str(tmp_path)
    config = _config("--config.total_steps=6", "--config.log_every_steps=100",
                     "--config.checkpoint.every_steps=2")
    with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradients at step 3\. .*'skip'"):
        train.train(config, workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == 2  # the step-4 state followed the bad step: not saved
    assert checkpoint.find_problem(os.path.join(workdir, "checkpoints", "2")) is None  # committed
    assert all(np.isfinite(x).all() for x in _leaves(checkpoint.restore_params(workdir)))


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if the trainer gets as far as creating (compiling) parameters."""
    def too_late(*args, **kwargs):
        raise AssertionError("the setup error should have come before compilation")

    monkeypatch.setattr(train.sharding, "init_sharded", too_late)


@pytest.mark.parametrize("overrides, error, message", [
    (["--config.mesh=[('data', 3)]"], ValueError, r"does not fit 8 devices"),
    (["--config.mesh=[('data', 4)]"], ValueError, r"needs 4 devices, but 8 are available; use -1"),
    (["--config.input.batch_size=12"], ValueError, r"batch_size=12 is not divisible by the data-parallel size 8"),
    (["--config.input.data.name=folder"], ValueError, r"needs a 'image_dir' entry"),
])
def test_bad_setups_fail_before_compilation(tmp_path, no_compile, overrides, error, message):
    with pytest.raises(error, match=message):
        train.train(_config(*overrides), str(tmp_path))


def test_bad_data_and_workdir_fail_before_compilation(tmp_path, no_compile):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not writable.*--workdir"):
        train.train(_config(), str(blocker / "sub"))
    with pytest.raises(ValueError, match="config.nonfinite='retry' is not one of"):
        train.train(_config(nonfinite="retry"), str(tmp_path / "w"))
    config = _config()
    with config.unlocked():
        config.input.data = {"name": "folder", "image_dir": str(tmp_path / "nope"), "captions": "c.jsonl"}
    with pytest.raises(FileNotFoundError, match="image_dir .*nope.* is not a directory"):
        train.train(config, str(tmp_path / "w"))
    (tmp_path / "images").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    config.input.data = {"name": "folder", "image_dir": str(tmp_path / "images"),
                         "captions": str(tmp_path / "empty.jsonl")}
    with pytest.raises(ValueError, match="has no examples"):
        train.train(config, str(tmp_path / "w"))
    config.input.data = {"name": "webdataset", "shards": str(tmp_path / "{00000..00003}.tar")}
    with pytest.raises(FileNotFoundError, match="4 of 4 shards do not exist"):
        train.train(config, str(tmp_path / "w"))


def test_multi_process_flags_go_together():
    from mmjax import distributed

    with pytest.raises(ValueError, match="--coordinator_address HOST:PORT, --num_processes N and --process_id"):
        distributed.initialize("localhost:1234", num_processes=2)
    with pytest.raises(ValueError, match="--process_id 2 must be in"):
        distributed.initialize("localhost:1234", num_processes=2, process_id=2)
