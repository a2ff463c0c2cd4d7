"""Checkpoints: restore onto other topologies, corrupt steps are skipped, keep-N is safe."""

import glob
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainer_process
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import checkpoint, configs, optim, sharding, tasks, train


@pytest.fixture(scope="module")
def vit_config():
    return configs.apply_overrides(configs.load_config("experiments/vit/shapes.py:smoke=True"),
                                   ["--config.model.depth=2", "--config.model.width=64",
                                    "--config.model.mlp_dim=128", "--config.model.num_heads=2"])


def _layout(config, devices, mesh_spec, preset):
    """Abstract ViT train state (params + AdamW state) and its shardings on a mesh; no compute."""
    mesh = sharding.make_mesh(mesh_spec, devices)
    task = tasks.get_task(config)
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)}
    boxed = jax.eval_shape(task.init_variables, jax.random.key(0), batch)
    param_shardings = sharding.logical_shardings(boxed, mesh, sharding.get_rules(preset))["params"]
    params = jax.tree.map(lambda x: x.unbox(), boxed["params"], is_leaf=lambda x: hasattr(x, "unbox"))
    tx, _ = optim.build_optimizer(config.optimizer, config.schedule, 10, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = train.optimizer_shardings(tx, params, param_shardings, replicated)
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                "opt_state": jax.eval_shape(tx.init, params)}
    shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
    return checkpoint.abstract_like(abstract, shardings), tx


def _written_state(config, devices):
    """A ViT + AdamW train state with random values, laid out on an 8-device fsdp mesh."""
    abstract, _ = _layout(config, devices, [("fsdp", 8)], "fsdp")
    rng = np.random.default_rng(0)

    def random_like(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jax.device_put(rng.integers(1, 100, x.shape).astype(x.dtype), x.sharding)
        return jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)

    return jax.tree.map(random_like, abstract)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_restore_onto_other_topologies_and_the_host(vit_config, tmp_path):
    """Written on an 8-device fsdp mesh; read on 1 device, a 4-device fsdp_tp mesh, and numpy."""
    devices = jax.devices()
    state = _written_state(vit_config, devices)
    assert sharding.unsharded_fraction(state["params"]) < 0.1
    saver = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
    saver.save(7, state, trainer_process.Position(3), force=True)
    saver.close()
    expected = _host(state)
    nbytes = sum(x.nbytes for x in expected)

    targets = {"1 device": (devices[:1], [("data", 1)], "dp"),
               "4-device fsdp_tp": (devices[:4], [("fsdp", 2), ("tensor", 2)], "fsdp_tp")}
    for name, (subset, mesh_spec, preset) in targets.items():
        abstract, _ = _layout(vit_config, subset, mesh_spec, preset)
        position = trainer_process.Position()
        step, restored = checkpoint.Checkpointer(str(tmp_path), every_steps=1).restore_latest(abstract, position)
        assert step == 7 and position.n == 3, name
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
            assert got.sharding == want.sharding and len(got.sharding.device_set) == len(subset), name
        assert all(a.tobytes() == b.tobytes() for a, b in zip(_host(restored), expected)), name
    kernel = restored["params"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")  # really re-laid out

    on_host = checkpoint.load_train_state(str(tmp_path))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(on_host))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(on_host), expected))
    params = checkpoint.restore_params(str(tmp_path))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(params), _host(state["params"])))
    print(f"cross-topology restore: {nbytes} bytes compared 3 times, all equal")


def _small_state(value):
    return {"step": jnp.int32(value), "params": {"w": jnp.full((64, 32), value, jnp.float32),
                                                 "b": jnp.arange(5, dtype=jnp.float32) * value}}


def _save_steps(workdir, steps, keep=5):
    saver = checkpoint.Checkpointer(workdir, every_steps=1, keep=keep)
    for step in steps:
        saver.save(step, _small_state(step), trainer_process.Position(step * 10))
    saver.close()


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _largest_array_file(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/state/**/*", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing file", "garbled manifest"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    workdir = str(tmp_path)
    _save_steps(workdir, [1, 2, 3])
    step_dir = os.path.join(workdir, "checkpoints", "3")
    if damage == "truncated":
        _truncate(_largest_array_file(step_dir))
    elif damage == "flipped byte":
        _flip_a_byte(_largest_array_file(step_dir))
    elif damage == "missing file":
        os.remove(_largest_array_file(step_dir))
    else:
        with open(os.path.join(step_dir, checkpoint.MANIFEST), "w") as f:
            f.write('{"files": ')

    ckpt = checkpoint.Checkpointer(workdir, every_steps=1)
    position = trainer_process.Position()
    abstract = checkpoint.abstract_like(_small_state(0), jax.tree.map(lambda x: x.sharding, _small_state(0)))
    with caplog.at_level("WARNING"):
        step, state = ckpt.restore_latest(abstract, position)
    assert step == 2 and position.n == 20
    np.testing.assert_array_equal(state["params"]["w"], _small_state(2)["params"]["w"])
    assert "Checkpoint step 3 is corrupt" in caplog.text
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["3"]
    # The run goes on from step 2 and writes step 3 again.
    assert ckpt.save(3, _small_state(3), position)
    ckpt.close()
    assert checkpoint.find_problem(step_dir) is None


def test_unreadable_checkpoint_without_manifest_falls_back(tmp_path, caplog):
    """Steps written without a manifest are tried, and skipped when orbax cannot read them."""
    workdir = str(tmp_path)
    _save_steps(workdir, [1, 2])
    step_dir = os.path.join(workdir, "checkpoints", "2")
    os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
    _truncate(_largest_array_file(step_dir))
    abstract = checkpoint.abstract_like(_small_state(0), jax.tree.map(lambda x: x.sharding, _small_state(0)))
    with caplog.at_level("WARNING"):
        step, _ = checkpoint.Checkpointer(workdir, every_steps=1).restore_latest(abstract)
    assert step == 1 and "step 2 is corrupt: unreadable" in caplog.text


def test_no_usable_checkpoint_is_an_error(tmp_path):
    workdir = str(tmp_path)
    _save_steps(workdir, [1])
    _truncate(_largest_array_file(os.path.join(workdir, "checkpoints", "1")))
    abstract = checkpoint.abstract_like(_small_state(0), jax.tree.map(lambda x: x.sharding, _small_state(0)))
    with pytest.raises(RuntimeError, match="No usable checkpoint .*Run the same command again"):
        checkpoint.Checkpointer(workdir, every_steps=1).restore_latest(abstract)
    # Moved aside, so the next start begins from scratch instead of failing again.
    assert checkpoint.Checkpointer(workdir, every_steps=1).restore_latest(abstract) == (None, None)


def test_a_changed_model_is_an_error_not_a_fallback(tmp_path):
    workdir = str(tmp_path)
    _save_steps(workdir, [1, 2])
    other = {"step": jnp.int32(0), "params": {"w": jnp.zeros((64, 33)), "b": jnp.zeros(5)}}
    abstract = checkpoint.abstract_like(other, jax.tree.map(lambda x: x.sharding, other))
    with pytest.raises(Exception, match="shape|Shape"):
        checkpoint.Checkpointer(workdir, every_steps=1).restore_latest(abstract)
    assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_keep_n_deletes_the_old_step_only_after_the_new_one_is_committed(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saver = checkpoint.Checkpointer(workdir, every_steps=1, keep=1)
    saver.save(1, _small_state(1))
    saver.manager.wait_until_finished()
    monkeypatch.setenv(checkpoint.COMMIT_DELAY_ENV, "1.5")  # hold step 2's commit open
    saver.save(2, _small_state(2))
    deadline = time.time() + 30
    while "2.orbax-checkpoint-tmp" not in os.listdir(ckpt_dir) and time.time() < deadline:
        time.sleep(0.01)
    in_flight = sorted(os.listdir(ckpt_dir))
    saver.close()
    assert in_flight == ["1", "2.orbax-checkpoint-tmp"]  # step 1 still there while 2 is unfinished
    assert sorted(os.listdir(ckpt_dir)) == ["2"]


def test_data_positions_of_several_processes():
    one = {"kind": "json", "value": {"epoch": 0, "shard": 1}}
    other = {"kind": "json", "value": {"epoch": 0, "shard": 2}}
    assert checkpoint._this_process_position({"per_process": [one]}) == one
    assert checkpoint._this_process_position({"per_process": [one, one]}) == one  # same for all
    with pytest.raises(ValueError, match="positions of 2 processes .*this run has 1"):
        checkpoint._this_process_position({"per_process": [one, other]})


def test_positions_record_the_process_count_and_their_kind():
    """The saved payload says how many processes wrote it and whether the positions hold only
    for that count (a state with a `process_count` entry: webdataset streams)."""
    grain_state = {"next_index": 7}
    stream_state = {"epoch": 0, "shard": 1, "example": 3, "process_count": 1}
    assert checkpoint._data_payload(grain_state) == {
        "per_process": [{"kind": "json", "value": grain_state}], "process_count": 1, "position_kind": "global"}
    assert checkpoint._data_payload(stream_state)["position_kind"] == "per_process"


def test_per_process_positions_are_refused_on_another_process_count(monkeypatch):
    """Equal webdataset positions (equal shards, lockstep) must not pass as a shared position:
    each process read other shards, so another process count would re-read or skip data."""
    stream = {"kind": "json", "value": {"epoch": 1, "shard": 2, "example": 0, "process_count": 2}}
    payload = {"per_process": [stream, stream], "process_count": 2, "position_kind": "per_process"}
    for count, index in ((2, 1), (1, 0), (4, 3)):
        monkeypatch.setattr(jax, "process_count", lambda count=count: count)
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        if count == 2:
            assert checkpoint._this_process_position(payload) == stream
            continue
        with pytest.raises(ValueError, match=f"written by 2 processes.*this run has {count}.*Resume with 2"):
            checkpoint._this_process_position(payload)


def test_global_positions_restore_on_any_process_count(monkeypatch):
    """A grain pipeline's position (one global batch index) is valid for any process count,
    in the new payload and in one written before process counts were recorded."""
    position = {"kind": "json", "value": {"next_index": 5}}
    new = {"per_process": [position, position], "process_count": 2, "position_kind": "global"}
    old = {"per_process": [position, position]}
    for count in (1, 3):
        monkeypatch.setattr(jax, "process_count", lambda count=count: count)
        monkeypatch.setattr(jax, "process_index", lambda: 0)
        assert checkpoint._this_process_position(new) == position
        assert checkpoint._this_process_position(old) == position
