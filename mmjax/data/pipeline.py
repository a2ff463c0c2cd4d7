"""grain input pipelines: a sharded, checkpointable training stream and padded eval batches.

Training order: the whole split is shuffled globally with a seed that changes
every epoch, and global batch b is elements [b*B, (b+1)*B) of that stream. Process
p of P reads only its block of each batch, elements b*B + p*B/P ... b*B + (p+1)*B/P - 1,
preprocessed with a per-element Generator derived from the seed and the element's
global position. So the global batches are the same for any number of processes,
and the iterator state, a single batch position, resumes exactly
(`it.get_state()` / `it.set_state(state)`), also on another process count.

An example the source cannot read (it returns None, e.g. a corrupt image) takes the
next readable example of the stream in its slot; the source counts and logs it.
Webdataset tar shards are streamed instead (see `mmjax.data.webdataset`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grain
import numpy as np

from mmjax.data import sources, webdataset
from mmjax.data.preprocess import Preprocess, Tokenizer

Batch = dict[str, np.ndarray]


def _canonical(example: dict) -> dict:
    """Numbers as numpy arrays with 32-bit dtypes, as JAX expects; strings are left alone."""
    out = {}
    for key, value in example.items():
        if isinstance(value, (str, bytes, dict, list)):
            out[key] = value
            continue
        value = np.asarray(value)
        if value.dtype == np.int64 or value.dtype == np.uint64:
            value = value.astype(np.int32)
        elif value.dtype == np.float64:
            value = value.astype(np.float32)
        out[key] = value
    return out


class _PreprocessMap(grain.transforms.RandomMap):
    """grain RandomMap running a `Preprocess` and the dtype canonicalisation."""

    def __init__(self, preprocess: Preprocess):
        self._preprocess = preprocess

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return _canonical(self._preprocess(element, rng))


def _read_options(prefetch: int) -> grain.ReadOptions:
    # One background thread: the ops hold the GIL most of the time, so more
    # threads measured slower; use worker_count (processes) to scale instead.
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(prefetch, 0))


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which are unparsed outside `absl.app.run`."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Deferred: only needed when the caller does not say.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


class _NextReadable(grain.MapDataset):
    """Element i, or when the source could not read it (None) the next readable one after it."""

    def __init__(self, parent: grain.MapDataset, max_tries: int):
        super().__init__(parent)
        self._max_tries = max(max_tries, 1)

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        for offset in range(self._max_tries):
            element = self._parent[(index + offset) % len(self._parent)]
            if element is not None:
                return element
        raise ValueError(f"{self._max_tries} consecutive examples of the data set could not be read "
                         f"(from stream position {index}); see the warnings above and fix the data")

    def __str__(self) -> str:
        return "NextReadable"


def make_train_loader(
    data_config: sources.DataConfig,
    pp: str,
    global_batch_size: int,
    *,
    seed: int,
    tokenizer: Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
) -> grain.IterDataset:
    """Returns an IterDataset of this process's training batches (dicts of numpy arrays).

    Each batch has global_batch_size // process_count examples. `iter(ds)` gives a
    checkpointable iterator (`get_state` / `set_state`). The stream repeats forever
    when num_epochs is None. `worker_count > 0` preprocesses in that many
    processes (not for webdataset shards, read in one thread); `prefetch` is the
    number of batches buffered ahead.
    """
    index, count = _process_info(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the process count "
            f"{count}; each process needs an equal share of every batch"
        )
    batch_size = global_batch_size // count
    preprocess = Preprocess(pp, tokenizer)
    if data_config.get("name") == sources.WEBDATASET_NAME:
        stream = webdataset.WebDatasetStream(
            webdataset.expand_shards(data_config.get("shards")), seed=seed, process_index=index,
            process_count=count, num_epochs=num_epochs, preprocess=_PreprocessMap(preprocess).random_map)
        return grain.experimental.ThreadPrefetchIterDataset(
            stream.batch(batch_size, drop_remainder=True), prefetch_buffer_size=max(prefetch, 0))
    source = sources.get_source(data_config)
    if len(source) == 0:
        raise ValueError(f"data set {data_config.get('name')!r} is empty")

    ds = grain.MapDataset.source(source).seed(seed)
    ds = ds.shuffle().repeat(num_epochs)  # A different permutation for every epoch.
    ds = _NextReadable(ds, max_tries=min(len(source), 1000))
    ds = ds.random_map(_PreprocessMap(preprocess))  # Lazy: runs only on this process's share.
    ds = ds.batch(batch_size, drop_remainder=True)  # Blocks of B/P; global batch b = blocks bP..bP+P-1.
    ds = ds[:len(ds) // count * count][index::count]
    iter_ds = ds.to_iter_dataset(_read_options(prefetch))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=prefetch)
        )
    return iter_ds


def eval_batches(
    data_config: sources.DataConfig,
    pp: str,
    batch_size: int,
    *,
    tokenizer: Tokenizer | None = None,
    max_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yields batches covering the split (or its first max_examples) exactly once, in order.

    Every batch has a boolean "mask" that is False on padding; the last batch is
    padded to batch_size by zero examples. With process_count > 1 each process
    gets examples p, p + P, ... and all processes yield the same number of batches.
    Random pp ops, if any, use a fixed seed.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    preprocess = Preprocess(pp, tokenizer)
    source = sources.get_source(data_config)
    total = len(source) if max_examples is None else min(len(source), max_examples)
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)

    ds = grain.MapDataset.source(source)[:total][process_index::process_count]
    ds = ds.random_map(_PreprocessMap(preprocess), seed=0)
    examples = iter(ds.to_iter_dataset(_read_options(2 * batch_size)))
    template = None
    for _ in range(num_batches):
        chunk = [example for _, example in zip(range(batch_size), examples)]
        if template is None:
            first = chunk[0] if chunk else _PreprocessMap(preprocess).random_map(
                source[0], np.random.default_rng(0))
            template = {k: np.zeros_like(v) for k, v in first.items()}
        mask = [True] * len(chunk) + [False] * (batch_size - len(chunk))
        chunk += [template] * (batch_size - len(chunk))
        batch = {k: np.stack([np.asarray(e[k]) for e in chunk]) for k in chunk[0]}
        batch["mask"] = np.asarray(mask, dtype=bool)
        yield batch

