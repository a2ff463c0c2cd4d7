"""A random-access source over a user's own images and a JSONL file of captions.

Each JSONL line is `{"image": "relative/path.jpg", "caption": "..."}` or
`{"image": ..., "captions": ["...", ...]}` (the first caption is used). Paths
are relative to `image_dir` (absolute paths are kept). Everything that can be
checked cheaply is checked in the constructor so that a typo in a config fails
before training starts, not hours later in a worker.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


class FolderSource:
    """Returns `{"image": uint8 (H, W, 3) RGB, "caption": str}` for each JSONL line."""

    def __init__(self, image_dir: str | os.PathLike, captions: str | os.PathLike):
        image_dir = os.path.expanduser(os.fspath(image_dir))
        captions = os.path.expanduser(os.fspath(captions))
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"folder data: image_dir {image_dir!r} is not a directory")
        if not os.path.isfile(captions):
            raise FileNotFoundError(f"folder data: captions file {captions!r} does not exist")
        self._image_dir = image_dir
        self._records = _read_jsonl(captions)
        if not self._records:
            raise ValueError(f"folder data: captions file {captions!r} has no examples")
        first = self._path(0)
        if not os.path.isfile(first):
            raise FileNotFoundError(
                f"folder data: image {first!r} (line 1 of {captions!r}) does not exist"
            )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        path = self._path(index)
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (FileNotFoundError, OSError) as e:
            raise OSError(f"folder data: cannot read image {path!r} (example {index}): {e}") from e
        return {"image": array, "caption": self._records[index][1]}

    def __repr__(self) -> str:
        return f"FolderSource(image_dir={self._image_dir!r}, num_examples={len(self)})"

    def _path(self, index: int) -> str:
        return os.path.join(self._image_dir, self._records[index][0])


def _read_jsonl(path: str) -> list[tuple[str, str]]:
    """Parses (image path, caption) pairs, naming the line of any malformed entry."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path!r} line {line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"folder data: {where} is not valid JSON: {e}") from e
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise ValueError(f'folder data: {where} needs a string "image" field')
            caption = entry.get("caption")
            if caption is None and entry.get("captions"):
                caption = entry["captions"][0] if isinstance(entry["captions"], list) else None
            if not isinstance(caption, str):
                raise ValueError(
                    f'folder data: {where} needs a string "caption" or a non-empty '
                    f'list "captions"'
                )
            records.append((entry["image"], caption))
    return records
