"""Tests for the grain pipelines (mmjax.data.pipeline) on the small shapes split."""

import itertools

import numpy as np
import pytest

from mmjax.data import pipeline, sources

DEFAULT_PP = ("resize(36)|random_crop(32)|flip_lr|value_range(-1,1)|"
              "tokenize(key='caption', out='text')|keep('image','text','label')")
PLAIN_PP = "keep('image','label')"  # no random ops: images identify examples


def fake_tokenizer(texts):
    """list[str] -> int (N, 8) of word lengths."""
    out = np.zeros((len(texts), 8), np.int64)
    for i, text in enumerate(texts):
        lengths = [len(w) for w in text.split()][:8]
        out[i, :len(lengths)] = lengths
    return out


def _keys(batch):
    return [image.tobytes() for image in batch["image"]]


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_batch_shapes_and_dtypes(small_shapes):
    loader = pipeline.make_train_loader(small_shapes, DEFAULT_PP, 16, seed=0,
                                        tokenizer=fake_tokenizer, process_index=0, process_count=1)
    batch = _take(loader, 1)[0]
    assert sorted(batch) == ["image", "label", "text"]
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["text"].shape == (16, 8) and batch["text"].dtype == np.int32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_epochs_cover_the_split_in_a_new_order(small_shapes):
    loader = pipeline.make_train_loader(small_shapes, PLAIN_PP, 24, seed=0,
                                        process_index=0, process_count=1)
    batches = _take(loader, 20)  # 240 examples per epoch = 10 batches
    epoch1 = [k for b in batches[:10] for k in _keys(b)]
    epoch2 = [k for b in batches[10:] for k in _keys(b)]
    assert len(set(epoch1)) == 240 and set(epoch1) == set(epoch2)
    assert epoch1 != epoch2


def test_same_seed_same_stream_other_seed_other_stream(small_shapes):
    def first_keys(seed):
        loader = pipeline.make_train_loader(small_shapes, DEFAULT_PP, 8, seed=seed,
                                            tokenizer=fake_tokenizer,
                                            process_index=0, process_count=1)
        return [k for b in _take(loader, 3) for k in _keys(b)]

    assert first_keys(1) == first_keys(1)
    assert first_keys(1) != first_keys(2)


def test_processes_read_disjoint_halves(small_shapes):
    per_process = []
    for index in range(2):
        loader = pipeline.make_train_loader(small_shapes, PLAIN_PP, 16, seed=3,
                                            process_index=index, process_count=2)
        batches = _take(loader, 15)  # 15 x 8 = 120 = half an epoch
        assert all(b["image"].shape[0] == 8 for b in batches)
        per_process.append({k for b in batches for k in _keys(b)})
    assert len(per_process[0]) == len(per_process[1]) == 120
    assert not per_process[0] & per_process[1]
    assert len(per_process[0] | per_process[1]) == 240


def test_get_state_set_state_resumes_exactly(small_shapes):
    loader = pipeline.make_train_loader(small_shapes, DEFAULT_PP, 8, seed=7,
                                        tokenizer=fake_tokenizer, process_index=1,
                                        process_count=2)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(loader)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_num_epochs_ends_the_stream(small_shapes):
    loader = pipeline.make_train_loader(small_shapes, PLAIN_PP, 16, seed=0, num_epochs=1,
                                        process_index=0, process_count=1)
    assert len(list(loader)) == 240 // 16


def test_batch_not_divisible_by_process_count(small_shapes):
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        pipeline.make_train_loader(small_shapes, PLAIN_PP, 10, seed=0,
                                   process_index=0, process_count=3)


def test_default_process_info_from_jax(small_shapes):
    loader = pipeline.make_train_loader(small_shapes, PLAIN_PP, 4, seed=0)
    assert _take(loader, 1)[0]["image"].shape[0] == 4  # one process in tests


def test_eval_batches_cover_split_once_with_mask(small_shapes):
    config = dict(small_shapes, split="test")
    batches = list(pipeline.eval_batches(config, "value_range(0, 1)|keep('image', 'label')", 16))
    assert len(batches) == 4  # 60 = 16 + 16 + 16 + 12
    for batch in batches:
        assert batch["image"].shape == (16, 32, 32, 3) and batch["mask"].dtype == bool
    assert [int(b["mask"].sum()) for b in batches] == [16, 16, 16, 12]
    assert not batches[-1]["mask"][12:].any()
    assert not batches[-1]["image"][12:].any()  # padding is zeros
    source = sources.get_source(config)
    real = np.concatenate([b["image"][b["mask"]] for b in batches])
    expected = np.stack([source[i]["image"] for i in range(len(source))]) / np.float32(255)
    np.testing.assert_allclose(real, expected, atol=1e-6)  # fixed order, each example once
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert labels.dtype == np.int32 and len(labels) == 60


def test_eval_batches_max_examples_and_processes(small_shapes):
    config = dict(small_shapes, split="test")
    batches = list(pipeline.eval_batches(config, PLAIN_PP, 8, max_examples=10))
    assert len(batches) == 2 and [int(b["mask"].sum()) for b in batches] == [8, 2]
    shares = [list(pipeline.eval_batches(config, PLAIN_PP, 8, max_examples=25,
                                         process_index=p, process_count=2)) for p in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2  # 13 and 12 examples, same batch count
    keys = [k for share in shares for b in share for k, m in zip(_keys(b), b["mask"]) if m]
    assert len(keys) == len(set(keys)) == 25


def test_worker_processes_give_the_same_stream(small_shapes):
    kwargs = {"seed": 4, "tokenizer": fake_tokenizer, "process_index": 0, "process_count": 1}
    reference = _take(pipeline.make_train_loader(small_shapes, DEFAULT_PP, 8, **kwargs), 3)
    loader = pipeline.make_train_loader(small_shapes, DEFAULT_PP, 8, worker_count=1, **kwargs)
    it = iter(loader)
    try:
        got = [next(it) for _ in range(2)]
        state = it.get_state()
        got.append(next(it))
    finally:
        it.close()
    resumed = iter(loader)
    try:
        resumed.set_state(state)
        got.append(next(resumed))
    finally:
        resumed.close()
    for want, have in zip(reference + reference[2:], got):  # the last one is the resumed batch
        for key in want:
            np.testing.assert_array_equal(want[key], have[key])


def test_global_batches_and_positions_do_not_depend_on_the_process_count(small_shapes):
    """Processes read blocks of each global batch, so a run can resume on another slice."""
    kwargs = {"seed": 5, "tokenizer": fake_tokenizer}
    single = _take(pipeline.make_train_loader(small_shapes, DEFAULT_PP, 16, process_index=0,
                                              process_count=1, **kwargs), 3)
    halves = [pipeline.make_train_loader(small_shapes, DEFAULT_PP, 16, process_index=p,
                                         process_count=2, **kwargs) for p in range(2)]
    shares = [_take(loader, 3) for loader in halves]
    for b in range(3):
        for key in single[b]:
            np.testing.assert_array_equal(np.concatenate([shares[0][b][key], shares[1][b][key]]),
                                          single[b][key])
    it = iter(pipeline.make_train_loader(small_shapes, DEFAULT_PP, 16, process_index=0,
                                         process_count=1, **kwargs))
    next(it), next(it)
    resumed = iter(halves[1])
    resumed.set_state(it.get_state())  # saved by a 1-process run, restored by process 1 of 2
    np.testing.assert_array_equal(next(resumed)["image"], single[2]["image"][8:])
