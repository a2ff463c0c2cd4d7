"""Random-access data sources built from a `data` config (dict or ml_collections.ConfigDict).

Supported configs:

* `{"name": "mmjax_shapes", "split": "train", "data_dir": None}` -- the embedded
  data set, generated locally on first use (optional keys `image_size`,
  `num_train`, `num_test`; `"mmjax_shapes/64px"` also selects the size).
* `{"name": "<any tfds name>", "split": ..., "data_dir": ...}` -- a TFDS data set
  that is already prepared (array_record) in `data_dir`. Nothing is downloaded.
  `cache=True` decodes the split once into host memory (see `mmjax.data.in_memory`);
  the embedded shapes data set is cached unless `cache=False`.
* `{"name": "folder", "image_dir": ..., "captions": "captions.jsonl"}` -- a
  user's own images and captions (see `mmjax.data.folder`).
* `{"name": "vqa_folder", "image_dir": ..., "questions": "questions.jsonl"}` -- a user's
  images and visual questions with their annotators' answers (see `mmjax.data.vqa_folder`).
* `{"name": "folder", "image_dir": ...}` (no captions) -- a user's labelled images, one
  sub-folder per class as torchvision's ImageFolder (see `mmjax.data.image_folder`; optional
  `split`, `holdout`, `seed`).
* `{"name": "webdataset", "shards": "/data/{00000..00099}.tar"}` -- tar shards as
  img2dataset writes them (see `mmjax.data.webdataset`); training streams them,
  the random-access source here is for evaluation.

Sources are sequences of example dicts (`len(src)`, `src[i]`); TFDS text
features come back as `str` rather than `bytes`. Any data config may name a
`class_names_file` (one name per line) that replaces the class names evaluators see.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from mmjax import paths
from mmjax.data import image_folder, shapes, webdataset
from mmjax.data.folder import FolderSource
from mmjax.data.in_memory import InMemorySource
from mmjax.data.vqa_folder import VqaFolderSource

SHAPES_NAME = "mmjax_shapes"
FOLDER_NAME = "folder"
WEBDATASET_NAME = "webdataset"
VQA_FOLDER_NAME = "vqa_folder"

DataConfig = Mapping[str, Any]  # dict or ml_collections.ConfigDict


def get_source(data_config: DataConfig) -> Sequence[dict]:
    """Returns the random-access source that `data_config` describes."""
    name = _require(data_config, "name")
    if name == FOLDER_NAME:
        if data_config.get("captions") is None:
            _require(data_config, "image_dir")
            return image_folder.ImageFolderSource(data_config)
        return FolderSource(_require(data_config, "image_dir"), _require(data_config, "captions"))
    if name == VQA_FOLDER_NAME:
        return VqaFolderSource(_require(data_config, "image_dir"), _require(data_config, "questions"))
    if name == WEBDATASET_NAME:
        return webdataset.WebDatasetSource(webdataset.expand_shards(_require(data_config, "shards")))
    builder = _builder(data_config)
    split = data_config.get("split") or "train"
    _check_split(builder, split)
    try:
        source = builder.as_data_source(split)
    except NotImplementedError as e:
        raise ValueError(
            f"TFDS data set {name!r} in {str(builder.data_dir)!r} is stored as "
            f"{builder.info.file_format.value}, which has no random access; prepare it with "
            f"`--file_format=array_record`."
        ) from e
    source = _TextDecodingSource(source, _text_paths(builder.info.features))
    cache = data_config.get("cache")
    if cache is None:
        cache = name.split("/")[0] == SHAPES_NAME
    return InMemorySource(source) if cache else source


def class_names(data_config: DataConfig) -> list[str] | None:
    """Class names for evaluators: `class_names_file` if the config names one, else the folder
    names of a class-per-folder source (`_` read as a space) or the names of a TFDS `label`
    ClassLabel feature; None when the data has no classes."""
    names = _own_class_names(data_config)
    path = data_config.get("class_names_file")
    if path is None:
        return names
    from mmjax.evaluate.zeroshot import read_class_names  # the reader lives with its main user

    listed = read_class_names(os.fspath(path))
    if names is not None and len(listed) != len(names):
        raise ValueError(f"class_names_file {path!r} has {len(listed)} names, but the data set "
                         f"{data_config.get('name')!r} has {len(names)} classes")
    return listed


def _own_class_names(data_config: DataConfig) -> list[str] | None:
    name = _require(data_config, "name")
    if name == FOLDER_NAME and data_config.get("captions") is None:
        _require(data_config, "image_dir")
        return image_folder.display_names(image_folder.find_classes(image_folder.class_root(data_config)))
    if name in (FOLDER_NAME, WEBDATASET_NAME, VQA_FOLDER_NAME):
        return None
    features = _builder(data_config).info.features
    label = features["label"] if "label" in features else None  # noqa: SIM401 - FeaturesDict
    if isinstance(label, tfds.features.ClassLabel):
        return list(label.names)
    return None


def num_examples(data_config: DataConfig) -> int:
    """Number of examples in the configured split (or folder)."""
    return len(get_source(data_config))


def _require(data_config: DataConfig, key: str) -> Any:
    value = data_config.get(key)
    if value is None:
        keys = sorted(data_config.keys())
        raise ValueError(f"data config needs a {key!r} entry; got keys {keys}")
    return value


def _builder(data_config: DataConfig) -> tfds.core.DatasetBuilder:
    name = _require(data_config, "name")
    data_dir = data_config.get("data_dir")
    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
        if paths.is_remote(data_dir):  # gs://...: array_record reads local files only
            data_dir = _cached_tfds_dir(data_dir, name)
    if name.split("/")[0] == SHAPES_NAME:
        return _shapes_builder(data_config, data_dir)
    try:
        return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        where = data_dir or tfds.core.constants.DATA_DIR
        raise FileNotFoundError(
            f"TFDS data set {name!r} (split {data_config.get('split')!r}) is not prepared in "
            f"data_dir {where!r}. mmjax never downloads data: prepare it there first, e.g. "
            f"`tfds build {name} --data_dir={where} --file_format=array_record`."
        ) from e


def _cached_tfds_dir(url: str, name: str) -> str:
    """A local data_dir holding a copy of data set `name` of the bucket data_dir `url` (each
    host copies it once; unchanged files are not fetched again; see `paths.cache_locally`)."""
    folder = paths.join(url, name.split("/")[0].split(":")[0])
    if not paths.isdir(folder):
        raise FileNotFoundError(
            f"TFDS data set {name!r} is not prepared in data_dir {url!r} (no {folder}). mmjax never "
            f"downloads data: prepare it there first, e.g. `tfds build {name} --data_dir={url} "
            "--file_format=array_record`.")
    return os.path.dirname(paths.cache_locally(folder))


def _shapes_builder(data_config: DataConfig, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """Prepares (once; it takes seconds) and returns the embedded shapes builder."""
    _, _, config_name = data_config["name"].partition("/")
    default_size = int(config_name.removesuffix("px")) if config_name else 32
    return shapes.prepare(
        data_dir,
        image_size=int(data_config.get("image_size") or default_size),
        num_train=int(data_config.get("num_train") or shapes.DEFAULT_NUM_TRAIN),
        num_test=int(data_config.get("num_test") or shapes.DEFAULT_NUM_TEST),
    )


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    splits = builder.info.splits
    bare = split.split("[")[0].strip()
    if "+" not in split and bare not in splits:
        raise ValueError(
            f"TFDS data set {builder.name!r} has no split {split!r}; available: {sorted(splits)}"
        )


def _text_paths(features: tfds.features.FeaturesDict, prefix: tuple = ()) -> list[tuple]:
    """Key paths of Text features (also inside nested dicts and Sequences)."""
    paths = []
    for key, feature in features.items():
        while isinstance(feature, tfds.features.Sequence):
            feature = feature.feature
        if isinstance(feature, tfds.features.Text):
            paths.append(prefix + (key,))
        elif isinstance(feature, tfds.features.FeaturesDict):
            paths.extend(_text_paths(feature, prefix + (key,)))
    return paths


def _to_str(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return [_to_str(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_to_str(v) for v in value]
    return value


class _TextDecodingSource:
    """Wraps a TFDS data source so that text features are `str`, not `bytes`."""

    def __init__(self, source: Any, text_paths: list[tuple]):
        self._source = source
        self._text_paths = text_paths

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self._decode(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._decode(x) for x in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"TextDecoded({self._source!r})"

    def _decode(self, example: dict) -> dict:
        for path in self._text_paths:
            node = example
            for key in path[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and path[-1] in node:
                node[path[-1]] = _to_str(node[path[-1]])
        return example
