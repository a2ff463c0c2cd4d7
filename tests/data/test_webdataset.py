"""Webdataset tar shards (mmjax.data.webdataset): naming, per-process shards, resume, bad samples."""

import io
import json
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from mmjax import checkpoint
from mmjax.data import pipeline, sources, webdataset

PP = "resize(8)|keep('image','caption')"
GOOD_PER_SHARD = 5


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _image_bytes(value: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 7, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(module_tmp):
    """4 shards as img2dataset names them; each has 5 good examples and 3 bad ones."""
    root = module_tmp("wds")
    for shard in range(4):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(GOOD_PER_SHARD):
                key = f"{shard:05d}{i:04d}"
                value = shard * 10 + i
                if i % 2:
                    _add(tar, f"{key}.jpg", _image_bytes(value, "JPEG"))
                    _add(tar, f"{key}.txt", f"caption {value}".encode())
                else:
                    _add(tar, f"{key}.png", _image_bytes(value, "PNG"))
                    _add(tar, f"{key}.json", json.dumps({"caption": f"caption {value}", "url": "x"}).encode())
            _add(tar, f"{shard:05d}9997.jpg", b"\xff\xd8 not really a jpeg")  # corrupt image
            _add(tar, f"{shard:05d}9997.txt", b"broken")
            _add(tar, f"{shard:05d}9998.jpg", _image_bytes(1, "JPEG"))         # no caption
            _add(tar, f"{shard:05d}9999.txt", b"caption without image")         # no image
    return str(root)


def _config(root, pattern="{00000..00003}.tar"):
    return {"name": "webdataset", "shards": f"{root}/{pattern}"}


def _captions(batches):
    return [str(c) for b in batches for c in b["caption"]]


def test_expand_shards(shards):
    assert webdataset.expand_shards(f"{shards}/{{00001..00003}}.tar")[0].endswith("/00001.tar")
    assert len(webdataset.expand_shards(f"{shards}/{{00000,00002}}.tar")) == 2
    assert len(webdataset.expand_shards(f"{shards}/*.tar")) == 4
    assert len(webdataset.expand_shards([f"{shards}/00000.tar", f"{shards}/00003.tar"])) == 2
    with pytest.raises(FileNotFoundError, match="1 of 5 shards do not exist.*00004.tar"):
        webdataset.expand_shards(f"{shards}/{{00000..00004}}.tar")
    with pytest.raises(ValueError, match="needs \"shards\""):
        webdataset.expand_shards(None)


def test_processes_read_their_own_shards_and_bad_samples_are_skipped(shards, caplog):
    per_process = []
    for index in range(2):
        stream = webdataset.WebDatasetStream(webdataset.expand_shards(_config(shards)["shards"]),
                                             seed=0, process_index=index, process_count=2, num_epochs=1)
        it = iter(stream)
        with caplog.at_level("WARNING"):
            examples = list(it)
        assert it.skipped == {"unreadable image (UnidentifiedImageError)": 2, "no caption": 2,
                              "no image": 2}
        per_process.append([e["caption"] for e in examples])
        assert all(e["image"].dtype == np.uint8 and e["image"].shape == (6, 7, 3) for e in examples)
    shards_read = [{int(c.split()[1]) // 10 for c in captions} for captions in per_process]
    assert len(per_process[0]) == len(per_process[1]) == 2 * GOOD_PER_SHARD
    assert not shards_read[0] & shards_read[1]  # whole shards, each read by one process
    assert len(set(per_process[0] + per_process[1])) == 4 * GOOD_PER_SHARD
    assert "no caption" in caplog.text and "skipped so far" in caplog.text
    with pytest.raises(ValueError, match="4 shards cannot be shared by 5 processes"):
        webdataset.WebDatasetStream(webdataset.expand_shards(_config(shards)["shards"]), seed=0,
                                    process_index=0, process_count=5)


def test_epochs_reshuffle(shards):
    loader = pipeline.make_train_loader(_config(shards), PP, 4, seed=1, process_index=0, process_count=1)
    captions = _captions(b for _, b in zip(range(10), loader))  # 2 epochs of 20 good examples
    assert sorted(captions[:20]) == sorted(captions[20:]) and captions[:20] != captions[20:]


def test_position_resumes_exactly_through_a_checkpoint(shards, tmp_path):
    """The stream position is saved by the Checkpointer with the state and restored."""
    def loader():
        return pipeline.make_train_loader(_config(shards), PP, 6, seed=2, process_index=1, process_count=2)

    it = iter(loader())
    for _ in range(5):  # into the second epoch of this process's 10 examples
        next(it)
    state = {"step": jnp.int32(5), "params": {"w": jnp.ones(3)}}
    saver = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
    saver.save(5, state, it)
    saver.close()
    expected = [next(it) for _ in range(4)]

    resumed = iter(loader())
    restorer = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
    abstract = checkpoint.abstract_like(state, {"step": state["step"].sharding,
                                                "params": {"w": state["params"]["w"].sharding}})
    step, _ = restorer.restore_latest(abstract, resumed)
    restorer.close()
    assert step == 5 and resumed.get_state()["epoch"] == 1
    for want in expected:
        got = next(resumed)
        assert list(got["caption"]) == list(want["caption"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_random_access_source_for_evaluation(shards):
    config = _config(shards)
    assert sources.num_examples(config) == 4 * 8  # every key, usable or not
    assert sources.class_names(config) is None
    batches = list(pipeline.eval_batches(config, PP, 8))
    assert sum(int(b["mask"].sum()) for b in batches) == 4 * GOOD_PER_SHARD  # bad ones dropped
    assert sorted(_captions(batches)[:5]) == [f"caption {i}" for i in range(5)]


def test_a_stream_position_is_refused_on_another_process_count(shards, tmp_path, monkeypatch):
    """A 1-process run's stream position, saved by the Checkpointer, is refused by a 2-process
    run even though every process's position is equal (the lockstep case), and the stream's
    own `set_state` refuses a position of another process count."""
    it = iter(pipeline.make_train_loader(_config(shards), PP, 4, seed=0, process_index=0, process_count=1))
    next(it)
    saver = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
    saver.save(1, {"step": jnp.int32(1)}, it)
    saver.close()
    reader = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
    payload = reader.manager.restore(1, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    reader.close()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(ValueError, match="written by 1 process .*webdataset.*this run has 2 processes"):
        checkpoint._this_process_position(payload)

    other = iter(webdataset.WebDatasetStream(webdataset.expand_shards(_config(shards)["shards"]),
                                             seed=0, process_index=1, process_count=2))
    with pytest.raises(ValueError, match="position of a 1-process run.*2 processes"):
        other.set_state(it.get_state())
