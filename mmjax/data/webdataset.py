"""Webdataset-style tar shards, as img2dataset writes them, as an image–text source.

A shard is a plain tar file; the files of one example share a key (the name up to its first
dot): `000123.jpg` (or .jpeg, .png, .webp) with `000123.txt` (the caption) or `000123.json`
(a "caption" field). Configure `data=dict(name="webdataset", shards="/data/cc3m/{00000..00331}.tar")`;
`shards` takes `{a..b}` ranges (zero padding kept), `{x,y}` alternatives, glob patterns, or a
list of paths, local or in a bucket (`gs://bucket/cc3m/{00000..00331}.tar`, see `mmjax.paths`).
The `webdataset` package is not needed.

Training streams the shards (`WebDatasetStream`): every epoch the shard list is shuffled with
the seed, process p of P takes shards p, p + P, ... of it, and reads each shard's examples in
a seeded random order. Members are located by one pass over the tar headers, so resuming
reads no image data before its position. The position (epoch, shard, example, and the
process count it holds for) is the iterator state that checkpoints keep; resuming it on
another process count is refused, since every process reads other shards. `WebDatasetSource`
gives random access for evaluation.

Examples without an image or caption, and images that do not decode, are skipped, counted and
logged, never a crash.
"""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from mmjax import paths as mmjax_paths  # `paths` names shard lists here

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
log = logging.getLogger(__name__)


def expand_shards(spec: str | Sequence[str] | None) -> list[str]:
    """Shard paths from `{00000..00009}` ranges, `{a,b}` alternatives, globs, or a list."""
    if not spec:
        raise ValueError('webdataset data needs "shards", e.g. shards="/data/{00000..00099}.tar"')
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = []
    for pattern in patterns:
        for expanded in _expand_braces(mmjax_paths.expand(str(pattern))):
            if glob.has_magic(expanded):
                matches = mmjax_paths.glob(expanded)
                if not matches:
                    raise FileNotFoundError(f"webdataset: no shard matches {expanded!r}")
                paths.extend(matches)
            else:
                paths.append(expanded)
    present = mmjax_paths.existing_files(paths)  # one listing per folder in a bucket
    missing = [p for p in paths if p not in present]
    if missing:
        raise FileNotFoundError(f"webdataset: {len(missing)} of {len(paths)} shards do not exist, "
                                f"e.g. {missing[0]!r} (from shards={spec!r})")
    return paths


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
        if not options:
            raise ValueError(f"webdataset: empty range {{{body}}} in {pattern!r}")
    else:
        options = body.split(",")
    return [x for option in options for x in _expand_braces(head + option + tail)]


def open_shard(path: str) -> tarfile.TarFile:
    """The tar file of a shard, local or in a bucket (read with seeks; closing it closes both)."""
    if not mmjax_paths.is_remote(path):
        return tarfile.open(path)  # noqa: SIM115 - the caller closes it
    tar = tarfile.open(fileobj=mmjax_paths.open(path, "rb"))  # noqa: SIM115 - the caller closes it
    tar._extfileobj = False  # noqa: SLF001 - so that tar.close() also closes the object's file
    return tar


class SkipCounter:
    """Counts skipped examples by reason and logs each one with the running total."""

    def __init__(self, what: str):
        self.what = what
        self.counts: collections.Counter[str] = collections.Counter()

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        log.warning("%s: skipped %s (%s); %d skipped so far in this process: %s", self.what, where,
                    reason, sum(self.counts.values()), dict(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


Examples = list[tuple[str, dict[str, tarfile.TarInfo]]]


def index_shard(tar: tarfile.TarFile, path: str) -> Examples:
    """(key, {extension: member}) for every example of an open shard, in file order.

    Reads only the headers. A truncated shard keeps the examples before the damage (a warning
    says so); an example cut in half is skipped when it fails to decode.
    """
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        for member in tar:
            folder, name = os.path.split(member.name)
            stem, dot, extension = name.partition(".")
            if member.isfile() and dot and stem:
                groups.setdefault(os.path.join(folder, stem), {})[extension.lower()] = member
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("webdataset: shard %s is damaged after %d examples (%s); using those",
                    path, len(groups), e)
    return list(groups.items())


def decode_example(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> tuple[dict | None, str]:
    """({"image": uint8 HWC RGB, "caption": str}, "") or (None, why it cannot be used)."""
    image_member = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image_member is None:
        return None, "no image"
    caption = None
    try:
        if "txt" in members:
            caption = tar.extractfile(members["txt"]).read().decode("utf-8", "replace").strip()
        elif "json" in members:
            caption = json.loads(tar.extractfile(members["json"]).read()).get("caption")
    except (tarfile.TarError, OSError, ValueError, AttributeError):
        caption = None
    if not isinstance(caption, str) or not caption:
        return None, "no caption"
    try:
        with Image.open(io.BytesIO(tar.extractfile(image_member).read())) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (tarfile.TarError, OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable image ({type(e).__name__})"
    return {"image": array, "caption": caption}, ""


class WebDatasetStream(grain.IterDataset):
    """This process's examples of the shards, epoch after epoch, preprocessed (see module doc)."""

    def __init__(self, shards: Sequence[str], *, seed: int, process_index: int = 0,
                 process_count: int = 1, num_epochs: int | None = None,
                 preprocess: Callable[[dict, np.random.Generator], dict] | None = None):
        super().__init__()
        if len(shards) < process_count:
            raise ValueError(f"webdataset: {len(shards)} shards cannot be shared by {process_count} "
                             "processes; each process reads whole shards, so write at least as many "
                             "shards as processes")
        self.shards = list(shards)
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.num_epochs = num_epochs
        self.preprocess = preprocess

    def shards_of_epoch(self, epoch: int) -> list[int]:
        """Indices into `shards` that this process reads in `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in order[self.process_index::self.process_count]]

    def __iter__(self) -> _StreamIterator:
        return _StreamIterator(self)

    def __str__(self) -> str:
        return f"WebDatasetStream({len(self.shards)} shards, process {self.process_index}/{self.process_count})"


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, stream: WebDatasetStream):
        super().__init__()
        self._stream = stream
        self._skips = SkipCounter("webdataset")
        self._epoch, self._shard, self._offset = 0, 0, 0
        self._open: tuple[tuple[int, int], tarfile.TarFile, Examples, np.ndarray] | None = None

    def __next__(self) -> dict:
        stream = self._stream
        while True:
            if stream.num_epochs is not None and self._epoch >= stream.num_epochs:
                raise StopIteration
            shards = stream.shards_of_epoch(self._epoch)
            if self._shard >= len(shards):
                self._epoch, self._shard, self._offset = self._epoch + 1, 0, 0
                continue
            shard_id = shards[self._shard]
            tar, examples, order = self._shard_reader(shard_id)
            if self._offset >= len(examples):
                self._shard, self._offset = self._shard + 1, 0
                continue
            position = int(order[self._offset])
            self._offset += 1
            key, members = examples[position]
            example, problem = decode_example(tar, members)
            if example is None:
                self._skips.skip(problem, f"{key} in {stream.shards[shard_id]}")
                continue
            if stream.preprocess is not None:
                rng = np.random.default_rng([stream.seed, self._epoch, shard_id, position])
                example = stream.preprocess(example, rng)
            return example

    def _shard_reader(self, shard_id: int) -> tuple[tarfile.TarFile, Examples, np.ndarray]:
        token = (self._epoch, self._shard)
        if self._open is None or self._open[0] != token:
            self.close()
            path = self._stream.shards[shard_id]
            tar = open_shard(path)
            examples = index_shard(tar, path)
            order = np.random.default_rng([self._stream.seed, self._epoch, shard_id]).permutation(len(examples))
            self._open = (token, tar, examples, order)
        return self._open[1:]

    def get_state(self) -> dict[str, Any]:
        """The position in this process's shards; `process_count` marks it valid only for that
        count (mmjax.checkpoint refuses to resume it on another)."""
        return {"epoch": self._epoch, "shard": self._shard, "example": self._offset,
                "process_count": self._stream.process_count}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("process_count")  # absent in positions saved before it was recorded
        if saved is not None and int(saved) != self._stream.process_count:
            raise ValueError(
                f"webdataset: this stream position of a {saved}-process run does not hold for "
                f"{self._stream.process_count} processes (each process reads its own shards); "
                f"resume with {saved} processes")
        self.close()
        self._epoch, self._shard, self._offset = int(state["epoch"]), int(state["shard"]), int(state["example"])

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    @property
    def skipped(self) -> collections.Counter[str]:
        return self._skips.counts


class WebDatasetSource:
    """Random access over all examples of the shards (for evaluation); None for unusable ones."""

    def __init__(self, shards: Sequence[str]):
        self._shards = list(shards)
        self._tars: dict[str, tarfile.TarFile] = {}
        self._index = []
        for shard in self._shards:
            with open_shard(shard) as tar:
                self._index += [(shard, members, key) for key, members in index_shard(tar, shard)]
        if not self._index:
            raise ValueError(f"webdataset: the {len(self._shards)} shards hold no examples")
        self._skips = SkipCounter("webdataset")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict | None:
        shard, members, key = self._index[index]
        if shard not in self._tars:
            self._tars[shard] = open_shard(shard)
        example, problem = decode_example(self._tars[shard], members)
        if example is None:
            self._skips.skip(problem, f"{key} in {shard}")
        return example

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _tars={})  # open files stay in their process

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self._shards)} shards, {len(self)} examples)"

    @property
    def skipped(self) -> collections.Counter[str]:
        return self._skips.counts

