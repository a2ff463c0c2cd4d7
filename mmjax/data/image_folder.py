"""A random-access source over a user's labelled images: one sub-folder per class.

The layout is torchvision's `ImageFolder`: `DIR/<class>/**/<image>`. Class index i is the i-th
class folder name in sorted order, and the examples come in torchvision's order, so labels
equal `torchvision.datasets.ImageFolder(DIR).targets`. The one difference: hidden folders
(`.ipynb_checkpoints`, ...) are not classes (torchvision would make them one); a warning names
them. Files count as images by torchvision's extensions (`IMG_EXTENSIONS`, any case). DIR may
be a local folder or a bucket URL (`gs://bucket/photos`, through `mmjax.paths`): the same
classes, examples, labels and holdout split either way.

Splits, for `data=dict(name="folder", image_dir=DIR, split=..., holdout=None, seed=0)`:

* no `split` (or None): DIR holds the class folders.
* `split="val"` with a folder DIR/val: DIR/val holds the class folders. Every split folder
  of DIR must have the same class folders (else the labels of the splits would disagree).
* `holdout=0.1`: splits DIR's images into `split="train"` and `split="holdout"`, per class
  (stratified: every class with 2+ images keeps at least one image on each side, so a small
  class is never missing from the evaluation), by a hash of (seed, relative path). The split
  depends only on the seed and the file names, not on listing order, and adding images to one
  class leaves the other classes' splits as they were.

Bad input is skipped and counted, never a crash: non-image files and class folders without
images when the source is built (one warning; `source.skipped` holds the counts), images that
fail to decode when read (`None` is returned; the pipeline takes the next example). No image
at all is an error at construction, before anything compiles.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from mmjax import paths
from mmjax.data.webdataset import SkipCounter

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HOLDOUT_SPLITS = ("train", "holdout")
SPLIT_NAMES = {"train", "val", "valid", "validation", "test", "holdout"}   # never read as class names


# --- file access: the only functions that touch the file system (mmjax.paths: local or gs://) ---

def _expand(path: str | os.PathLike) -> str:
    """~ expanded for a local path (as before); a URL without its trailing '/'."""
    path = paths.expand(os.fspath(path))
    return paths.resolve(path) if paths.is_remote(path) else path


def _is_dir(path: str) -> bool:
    return paths.isdir(path)


def _subdirs(path: str) -> list[str]:
    """Names of the folders in `path` (symlinks to folders included), sorted. In an object store:
    the prefixes one level below `path`, from one listing."""
    if not paths.is_remote(path):
        return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    fs = paths.filesystem(path)
    return sorted({posixpath.basename(info["name"].rstrip("/")) for info in fs.ls(path, detail=True)
                   if info.get("type") == "directory"} - {""})


def files_under(path: str) -> list[str]:
    """Paths of all files below `path`, in torchvision's order (sorted walk, sorted names). In an
    object store: the same order, from one listing of every object under `path`."""
    if not paths.is_remote(path):
        return [os.path.join(root, name) for root, _, names in sorted(os.walk(path, followlinks=True))
                for name in sorted(names)]
    relative = [r for r in paths.list_files(path) if r and not r.endswith("/")]
    # sorted(os.walk) orders the folders by their path, then each folder's names are sorted
    relative.sort(key=lambda r: (posixpath.dirname(r), posixpath.basename(r)))
    return [paths.join(path, r) for r in relative]


def _relative(path: str, root: str) -> str:
    """`path` relative to `root` (a folder above it), with '/' between names."""
    if not paths.is_remote(root):
        return os.path.relpath(path, root)
    return path[len(root.rstrip("/")) + 1:]


def load_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB, as torchvision's loader (`convert("RGB")`) gives it."""
    source: str | io.BytesIO = path
    if paths.is_remote(path):
        with paths.open(path, "rb") as f:
            source = io.BytesIO(f.read())   # one download, then PIL decodes from memory
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


# --- classes and splits ---

def class_root(data_config: Mapping[str, Any]) -> str:
    """The folder whose sub-folders are the classes, for the configured split."""
    image_dir = _expand(data_config["image_dir"])
    if not _is_dir(image_dir):
        raise FileNotFoundError(f"folder data: image_dir {image_dir!r} is not a directory")
    split, holdout = data_config.get("split"), data_config.get("holdout")
    if holdout is not None:
        if not 0 < float(holdout) < 1:
            raise ValueError(f"folder data: holdout must be a fraction in (0, 1), got {holdout!r}")
        if split not in HOLDOUT_SPLITS:
            raise ValueError(f"folder data: with holdout={holdout} the split is one of {HOLDOUT_SPLITS}, "
                             f"got {split!r}")
        return image_dir
    if split is None:
        _check_not_split_folders(image_dir)
        return image_dir
    if split == "holdout":
        raise ValueError("folder data: split='holdout' needs a holdout fraction, e.g. holdout=0.1")
    root = paths.join(image_dir, split)
    if not _is_dir(root):
        raise FileNotFoundError(
            f"folder data: no split folder {root!r}; split folders there: {_visible(_subdirs(image_dir))}. "
            "With the class folders directly in image_dir, leave split unset (or None), or split "
            "off part of them with holdout=0.1 and split='train' / 'holdout'")
    _check_same_classes(image_dir)
    return root


def _visible(names: list[str]) -> list[str]:
    return [n for n in names if not n.startswith(".")]


def _check_not_split_folders(image_dir: str) -> None:
    """`train/` and `val/` read as two classes would give every image a wrong label: refuse."""
    names = _visible(_subdirs(image_dir))
    if names and set(names) <= SPLIT_NAMES and all(_subdirs(paths.join(image_dir, n)) for n in names):
        raise ValueError(f"folder data: {image_dir!r} holds split folders {names}, not class folders; "
                         f"choose one with split={names[0]!r}")


def _check_same_classes(image_dir: str) -> None:
    """Split folders must agree on the class folders, or their labels would mean other classes."""
    splits = {s: _visible(_subdirs(paths.join(image_dir, s))) for s in _visible(_subdirs(image_dir))}
    first, classes = next(iter(splits.items()))
    for split, other in splits.items():
        if other != classes:
            only_a, only_b = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            raise ValueError(
                f"folder data: split folders {first!r} and {split!r} of {image_dir!r} have different "
                f"class folders (only in {first!r}: {only_a[:5]}, only in {split!r}: {only_b[:5]}); "
                "every split needs the same class folders, so that label i means the same class")


def find_classes(root: str) -> list[str]:
    """Sorted class folder names of `root` (hidden folders left out, with a warning)."""
    names = _subdirs(root)
    hidden = [n for n in names if n.startswith(".")]
    if hidden:
        log.warning("folder data: hidden folders %s in %r are not classes", hidden, root)
    classes = _visible(names)
    if not classes:
        raise ValueError(f"folder data: {root!r} has no class folders; expected one sub-folder per "
                         "class, e.g. DIR/cat/1.jpg, DIR/dog/2.jpg")
    return classes


def display_names(classes: list[str]) -> list[str]:
    """Folder names as class names for prompts: `golden_retriever` -> `golden retriever`."""
    return [c.replace("_", " ") for c in classes]


def _holdout_mask(relative_paths: list[str], fraction: float, seed: int) -> np.ndarray:
    """True for the images of one class that go to the holdout split."""
    n = len(relative_paths)
    if n < 2:
        return np.zeros(n, bool)
    count = min(max(round(fraction * n), 1), n - 1)
    keys = [hashlib.sha256(f"{seed}:{p}".encode()).digest() for p in relative_paths]
    mask = np.zeros(n, bool)
    mask[sorted(range(n), key=keys.__getitem__)[:count]] = True
    return mask


class ImageFolderSource:
    """Returns `{"image": uint8 (H, W, 3) RGB, "label": int32}`, or None for an unreadable image.

    `classes` are the folder names (label i is `classes[i]`); `path(i)` is example i's file.
    """

    def __init__(self, data_config: Mapping[str, Any]):
        self.root = class_root(data_config)
        self.classes = find_classes(self.root)
        holdout, split = data_config.get("holdout"), data_config.get("split")
        seed = int(data_config.get("seed") or 0)
        self._unreadable = SkipCounter("folder data")
        self._samples: list[tuple[str, int]] = []
        skipped: collections.Counter[str] = collections.Counter()
        not_images, empty = [], []
        for label, name in enumerate(self.classes):
            files = files_under(paths.join(self.root, name))
            images = [p for p in files if is_image_file(p)]
            not_images += [p for p in files if not is_image_file(p)]
            if not images:
                empty.append(name)
            if holdout is not None:
                mask = _holdout_mask([_relative(p, self.root) for p in images], float(holdout), seed)
                images = [p for p, held in zip(images, mask) if held == (split == "holdout")]
            self._samples += [(p, label) for p in images]
        skipped.update({"not an image file": len(not_images), "empty class folder": len(empty)})
        self.skipped = {k: v for k, v in skipped.items() if v}
        what = f"{self.root!r}" + (f" (split {split!r} of holdout={holdout}, seed={seed})" if holdout else "")
        if self.skipped:
            examples = [f"not an image: {p!r}" for p in not_images[:2]] + [f"no images: {n!r}" for n in empty[:2]]
            log.warning("folder data: in %s skipped %s (image extensions: %s); e.g. %s", what, self.skipped,
                        ", ".join(IMG_EXTENSIONS), "; ".join(examples))
        if not self._samples:
            raise ValueError(f"folder data: no images in {what}: {len(self.classes)} class folders, "
                             f"skipped {self.skipped or 'nothing'}; image extensions: {', '.join(IMG_EXTENSIONS)}")

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict | None:
        path, label = self._samples[index]
        try:
            image = load_rgb(path)
        except DECODE_ERRORS as e:
            self._unreadable.skip(f"unreadable image ({type(e).__name__})", f"{path!r} (example {index})")
            return None
        return {"image": image, "label": np.int32(label)}

    def path(self, index: int) -> str:
        return self._samples[index][0]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self._samples]

    @property
    def unreadable(self) -> int:
        """Images of this process that failed to decode so far."""
        return self._unreadable.total

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self.root!r}, num_classes={len(self.classes)}, num_examples={len(self)})"
