"""A random-access source over a user's own images and a JSONL file of captions.

Each JSONL line is `{"image": "relative/path.jpg", "caption": "..."}` or
`{"image": ..., "captions": ["...", ...]}` (the first caption is used). Paths
are relative to `image_dir` (absolute paths are kept). Both may be in a bucket
(`gs://bucket/images`, see `mmjax.paths`); the images there are listed once, not checked one by one.

Bad entries do not stop a run and are never silent: lines that are not JSON, lack a
caption or name a missing image are skipped when the source is built (one warning with
the counts and the first line numbers, `source.skipped` holds the counts), and images
that fail to decode are reported when read (`None` is returned; the pipeline fills the
slot with the next example). A wrong path, or a file with no usable line, is an error
right away, before anything compiles.
"""

from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np
from PIL import Image

from mmjax import paths
from mmjax.data.webdataset import SkipCounter

log = logging.getLogger(__name__)


def keep_present_images(records: list, image_dir: str, image_of, problems: list) -> list:
    """The (line number, ...) records whose image (`image_of(record)`, relative to image_dir)
    exists, checked in one listing; each missing one is appended to `problems`."""
    present = paths.existing_files([paths.join(image_dir, image_of(r)) for r in records])
    kept = []
    for record in records:
        if paths.join(image_dir, image_of(record)) in present:
            kept.append(record)
        else:
            problems.append((record[0], "missing image", f"{image_of(record)!r} is not in {image_dir!r}"))
    return kept


def report_skipped_lines(what: str, file_kind: str, path: str, usable: int, problems: list) -> dict[str, int]:
    """Counts of skipped lines by kind; an error when no line is usable, a warning when some were skipped."""
    skipped = dict(collections.Counter(kind for _, kind, _ in sorted(problems)))
    if not problems and not usable:
        raise ValueError(f"{what}: {file_kind} {path!r} has no examples")
    if problems:
        examples = "; ".join(f"line {n}: {kind} ({detail})" for n, kind, detail in sorted(problems)[:3])
        counts = ", ".join(f"{n} {kind}" for kind, n in skipped.items())
        if not usable:
            raise ValueError(f"{what}: no usable line in {path!r}: {counts}; e.g. {examples}")
        log.warning("%s: skipped %d of %d lines of %r (%s); e.g. %s", what, len(problems), len(problems) + usable,
                    path, counts, examples)
    return skipped


def read_rgb(path: str, index: int, unreadable: SkipCounter) -> np.ndarray | None:
    """The image at `path` as uint8 (H, W, 3) RGB, or None (counted in `unreadable`) if it cannot be decoded."""
    try:
        with paths.open(path, "rb") as f, Image.open(f) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        unreadable.skip(f"unreadable image ({type(e).__name__})", f"{path!r} (example {index})")
        return None


class FolderSource:
    """Returns `{"image": uint8 (H, W, 3) RGB, "caption": str}`, or None for an unreadable image."""

    def __init__(self, image_dir: str | os.PathLike, captions: str | os.PathLike):
        image_dir = paths.expand(os.fspath(image_dir))
        captions = paths.expand(os.fspath(captions))
        if not paths.isdir(image_dir):
            raise FileNotFoundError(f"folder data: image_dir {image_dir!r} is not a directory")
        if not paths.isfile(captions):
            raise FileNotFoundError(f"folder data: captions file {captions!r} does not exist")
        self._image_dir = image_dir
        self._unreadable = SkipCounter("folder data")
        records, problems = _read_jsonl(captions)
        self._records = [(image, caption) for _, image, caption in
                         keep_present_images(records, image_dir, lambda r: r[1], problems)]
        self.skipped = report_skipped_lines("folder data", "captions file", captions, len(self._records), problems)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict | None:
        array = read_rgb(self._path(index), index, self._unreadable)
        return None if array is None else {"image": array, "caption": self._records[index][1]}

    @property
    def unreadable(self) -> int:
        """Images of this process that failed to decode so far."""
        return self._unreadable.total

    def __repr__(self) -> str:
        return f"FolderSource(image_dir={self._image_dir!r}, num_examples={len(self)})"

    def _path(self, index: int) -> str:
        return paths.join(self._image_dir, self._records[index][0])


def _read_jsonl(path: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    """(line, image path, caption) of the usable lines, and (line, kind, detail) of the others."""
    records, problems = [], []
    with paths.open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append((line_number, "invalid JSON", str(e)))
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                problems.append((line_number, "no image", 'needs a string "image" field'))
                continue
            caption = entry.get("caption")
            if caption is None and isinstance(entry.get("captions"), list) and entry["captions"]:
                caption = entry["captions"][0]
            if not isinstance(caption, str) or not caption.strip():
                problems.append((line_number, "no caption",
                                 'needs a string "caption" or a non-empty list "captions"'))
                continue
            records.append((line_number, entry["image"], caption))
    return records, problems
