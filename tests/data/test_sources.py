"""Tests for data sources (mmjax.data.sources, mmjax.data.folder)."""

import json
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mmjax.data import pipeline, shapes, sources


def _write_folder(tmp_path, lines=None):
    image_dir = tmp_path / "images"
    (image_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image_dir / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(image_dir / "sub/b.png")
    Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)).save(image_dir / "c.png")
    if lines is None:
        lines = [
            {"image": "a.png", "caption": "a noisy picture"},
            {"image": "sub/b.png", "captions": ["a gray one", "ignored"]},
            {"image": "c.png", "caption": "with alpha"},
        ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    return {"name": "folder", "image_dir": str(image_dir), "captions": str(captions)}


def test_folder_source(tmp_path):
    config = _write_folder(tmp_path)
    source = sources.get_source(config)
    assert len(source) == 3 == sources.num_examples(config)
    shapes_seen = []
    for i in range(3):
        x = source[i]
        assert x["image"].dtype == np.uint8 and x["image"].ndim == 3 and x["image"].shape[2] == 3
        assert isinstance(x["caption"], str)
        shapes_seen.append(x["image"].shape)
    assert shapes_seen == [(20, 30, 3), (16, 16, 3), (12, 10, 3)]
    assert source[1]["caption"] == "a gray one"
    assert sources.class_names(config) is None


def test_folder_source_through_the_pipeline(tmp_path):
    config = _write_folder(tmp_path)
    batches = list(pipeline.eval_batches(config, "resize(8)|value_range(0,1)|keep('image')", 2))
    assert [b["image"].shape for b in batches] == [(2, 8, 8, 3)] * 2
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False]]


def test_folder_missing_paths(tmp_path):
    config = _write_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="image_dir .*nope"):
        sources.get_source(dict(config, image_dir=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="captions file .*missing.jsonl"):
        sources.get_source(dict(config, captions=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="needs a 'image_dir'"):
        sources.get_source({"name": "folder", "captions": config["captions"]})


def test_folder_bad_jsonl(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    config = _write_folder(tmp_path)
    with pytest.raises(ValueError, match="no examples"):
        sources.get_source(dict(config, captions=str(empty)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "text": "wrong key"}\n')
    with pytest.raises(ValueError, match="no usable line .*1 no caption.*line 1"):
        sources.get_source(dict(config, captions=str(bad)))
    bad.write_text('{"image": "zzz.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match="no usable line .*1 missing image.*zzz.png"):
        sources.get_source(dict(config, captions=str(bad)))


def test_folder_skips_and_counts_bad_lines(tmp_path, caplog):
    """Broken lines, missing captions and missing images are skipped, counted and logged."""
    lines = [
        {"image": "a.png", "caption": "good one"},
        {"image": "sub/b.png"},                          # no caption
        {"image": "c.png", "captions": []},              # no caption
        {"image": "gone.png", "caption": "missing file"},
        {"caption": "no image field"},
        {"image": "c.png", "caption": "good two"},
    ]
    config = _write_folder(tmp_path, lines)
    with open(config["captions"], "a") as f:
        f.write('{"image": "a.png", "capt\n')             # a truncated last line
    with caplog.at_level("WARNING"):
        source = sources.get_source(config)
    assert len(source) == 2 and [source[i]["caption"] for i in range(2)] == ["good one", "good two"]
    assert source.skipped == {"no caption": 2, "missing image": 1, "no image": 1, "invalid JSON": 1}
    assert "skipped 5 of 7 lines" in caplog.text and "line 2: no caption" in caplog.text


def test_folder_unreadable_image_is_skipped_in_training_batches(tmp_path, caplog):
    """A corrupt image file is reported when read and its slot gets the next example."""
    config = _write_folder(tmp_path)
    (tmp_path / "images" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = sources.get_source(config)
    assert len(source) == 3  # the file exists: found only when decoded
    with caplog.at_level("WARNING"):
        assert source[2] is None
    assert source.unreadable == 1 and "c.png" in caplog.text and "1 skipped so far" in caplog.text
    loader = pipeline.make_train_loader(config, "resize(8)|keep('image','caption')", 3, seed=0,
                                        process_index=0, process_count=1)
    batches = [b for _, b in zip(range(4), loader)]  # 4 epochs of 3 examples, one unreadable
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == 12 and "with alpha" not in captions
    assert set(captions) == {"a noisy picture", "a gray one"}
    evaluated = list(pipeline.eval_batches(config, "resize(8)|keep('image')", 2))
    assert sum(int(b["mask"].sum()) for b in evaluated) == 2  # eval drops it instead


def test_shapes_source(small_shapes):
    source = sources.get_source(small_shapes)
    assert len(source) == 240 == sources.num_examples(small_shapes)
    x = source[3]
    assert isinstance(x["caption"], str) and x["image"].shape == (32, 32, 3)
    assert sources.class_names(small_shapes) == shapes.CLASS_NAMES
    assert sources.num_examples(dict(small_shapes, split="test")) == 60
    with pytest.raises(ValueError, match="no split 'validation'.*'test', 'train'"):
        sources.get_source(dict(small_shapes, split="validation"))


def test_shapes_prepared_on_first_use(tmp_path):
    config = {"name": "mmjax_shapes", "split": "test", "data_dir": str(tmp_path),
              "num_train": 12, "num_test": 6}
    assert sources.num_examples(config) == 6
    version = str(shapes.MmjaxShapes.VERSION)
    assert (tmp_path / "mmjax_shapes" / "32px_12_6" / version).is_dir()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["coco_captions", "imagenet2012", "no_such_dataset_xyz"])
def test_unprepared_tfds_name_errors_without_download(tmp_path, no_network, name):
    config = {"name": name, "split": "train", "data_dir": str(tmp_path)}
    with pytest.raises(FileNotFoundError) as info:
        sources.get_source(config)
    message = str(info.value)
    assert name in message and "'train'" in message and str(tmp_path) in message
    with pytest.raises(FileNotFoundError):
        sources.class_names(config)
    assert os.listdir(tmp_path) == []  # nothing downloaded or created


class MmjaxTestCaptions(tfds.core.GeneratorBasedBuilder):
    """A tiny stand-in for an already prepared third-party TFDS data set."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["cat", "dog"]),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            yield i, {"image": np.full((4, 4, 3), i, np.uint8), "label": i % 2,
                      "captions": [f"caption {i}", "another"]}


def test_prepared_tfds_data_set_by_name(tmp_path, no_network):
    MmjaxTestCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = {"name": "mmjax_test_captions", "split": "validation", "data_dir": str(tmp_path)}
    source = sources.get_source(config)
    assert len(source) == 5 == sources.num_examples(config)
    x = source[0]
    assert x["image"].shape == (4, 4, 3) and x["captions"][1] == "another"
    assert sources.class_names(config) == ["cat", "dog"]
    with pytest.raises(ValueError, match="no split 'train'"):
        sources.get_source(dict(config, split="train"))


def test_config_dict_is_accepted(small_shapes):
    import ml_collections

    config = ml_collections.ConfigDict(dict(small_shapes, split="test"))
    assert sources.num_examples(config) == 60
    assert sources.num_examples(ml_collections.FrozenConfigDict(config)) == 60
    assert sources.class_names(config) == shapes.CLASS_NAMES
