"""Class-per-folder data (mmjax.data.image_folder): torchvision's class indices and order, bad
files skipped and counted, folder and holdout splits, class names, and the grain pipeline."""

import os

import numpy as np
import pytest
from PIL import Image

from mmjax.data import pipeline, shapes, sources

CLASSES = ["red circle", "red square", "green circle", "blue_star"]   # folder names: "_" for " "


def _save(image: np.ndarray, path, mode: str = "RGB", size: int | None = None) -> None:
    """Writes a shapes image as PNG/JPEG in another PIL mode (grey, RGBA, CMYK, palette)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pil = Image.fromarray(image)
    if size:
        pil = pil.resize((size, size + 3))
    pil = pil.convert(mode) if mode != "P" else pil.quantize(16)
    pil.save(path)


def _write_classes(root, per_class: int = 5, seed: int = 0, index0: int = 0) -> None:
    """`per_class` shapes images per class, as PNG or JPEG, some grey/RGBA/CMYK/palette/other size."""
    modes = [("png", "RGB", None), ("jpg", "L", None), ("png", "RGBA", 24), ("jpeg", "CMYK", None),
             ("png", "P", 40), ("JPG", "RGB", 20)]
    for c, name in enumerate(CLASSES):
        label = shapes.CLASS_NAMES.index(name.replace("_", " "))
        for i in range(per_class):
            ext, mode, size = modes[(c + i) % len(modes)]
            image = shapes.generate_example(label + 24 * (index0 + i), seed, 32)["image"]
            sub = "nested" if i == 3 else ""
            _save(image, os.path.join(root, name.replace(" ", "_"), sub, f"img{i:02d}.{ext}"), mode, size)


@pytest.fixture(scope="module")
def messy(module_tmp):
    """4 classes of 5 mixed images, one nested folder, plus a non-image file, a corrupt JPEG
    and an empty class folder."""
    root = module_tmp("classes")
    _write_classes(root)
    (root / "red_circle" / "notes.txt").write_text("not an image")
    (root / "red_square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "zebra").mkdir()
    return str(root)


def test_same_classes_and_order_as_torchvision(messy):
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(messy, allow_empty=True)
    source = sources.get_source({"name": "folder", "image_dir": messy})
    assert source.classes == reference.classes == ["blue_star", "green_circle", "red_circle", "red_square", "zebra"]
    assert [(source.path(i), label) for i, label in enumerate(source.labels)] == reference.samples
    assert source.skipped == {"not an image file": 1, "empty class folder": 1}
    for i in range(len(source)):
        example = source[i]
        if source.path(i).endswith("broken.jpg"):
            assert example is None
            continue
        assert example["label"].dtype == np.int32 and example["label"] == reference.targets[i]
        np.testing.assert_array_equal(example["image"], np.asarray(reference[i][0]))
        assert example["image"].dtype == np.uint8 and example["image"].shape[2] == 3
    assert source.unreadable == 1
    assert sources.class_names({"name": "folder", "image_dir": messy}) == [
        "blue star", "green circle", "red circle", "red square", "zebra"]


def test_hidden_folders_are_not_classes(tmp_path):
    _write_classes(tmp_path, per_class=1)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "loose.png").write_bytes(b"files next to the class folders are ignored, as torchvision does")
    source = sources.get_source({"name": "folder", "image_dir": str(tmp_path)})
    assert source.classes == ["blue_star", "green_circle", "red_circle", "red_square"] and len(source) == 4


def test_class_names_file(tmp_path, messy):
    names = tmp_path / "names.txt"
    names.write_text("star\ngreen disc\nred disc\nred box\nzebra\n")
    config = {"name": "folder", "image_dir": messy, "class_names_file": str(names)}
    assert sources.class_names(config) == ["star", "green disc", "red disc", "red box", "zebra"]
    names.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="has 2 names, but the data set 'folder' has 5 classes"):
        sources.class_names(config)


def test_empty_data_is_an_error_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_dir .*nope.* is not a directory"):
        sources.get_source({"name": "folder", "image_dir": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="has no class folders"):
        sources.get_source({"name": "folder", "image_dir": str(tmp_path)})
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.txt").write_text("x")
    counts = "'not an image file': 1, 'empty class folder': 2"
    with pytest.raises(ValueError, match=f"no images in .*2 class folders.*{counts}"):
        sources.get_source({"name": "folder", "image_dir": str(tmp_path)})


def test_split_folders(tmp_path):
    _write_classes(tmp_path / "train", per_class=3)
    _write_classes(tmp_path / "val", per_class=2, index0=10)
    train = sources.get_source({"name": "folder", "image_dir": str(tmp_path), "split": "train"})
    val = sources.get_source({"name": "folder", "image_dir": str(tmp_path), "split": "val"})
    assert train.classes == val.classes and (len(train), len(val)) == (12, 8)
    assert sorted(set(val.labels)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"holds split folders \['train', 'val'\], not class folders; choose"):
        sources.get_source({"name": "folder", "image_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"no split folder .*test.*split folders there: \['train', 'val'\]"):
        sources.get_source({"name": "folder", "image_dir": str(tmp_path), "split": "test"})
    (tmp_path / "val" / "purple_cat").mkdir()
    with pytest.raises(ValueError, match=r"'train' and 'val' .*different class .*only in 'val': \['purple_cat'\]"):
        sources.get_source({"name": "folder", "image_dir": str(tmp_path), "split": "train"})


def test_holdout_is_disjoint_deterministic_and_stratified(messy):
    def split(name, seed=0, fraction=0.4):
        source = sources.get_source({"name": "folder", "image_dir": messy, "split": name,
                                     "holdout": fraction, "seed": seed})
        return {source.path(i): label for i, label in enumerate(source.labels)}

    train, held = split("train"), split("holdout")
    everything = sources.get_source({"name": "folder", "image_dir": messy})
    assert not set(train) & set(held)
    assert {**train, **held} == {everything.path(i): label for i, label in enumerate(everything.labels)}
    assert split("train") == train and split("holdout") == held          # same every time
    assert split("holdout", seed=1) != held                              # the seed matters
    # 5 or 6 images per class (the corrupt file counts): round(0.4 n) of each class held out.
    assert sorted(np.bincount(list(held.values())).tolist()) == [2, 2, 2, 2]
    assert sorted(np.bincount(list(split("holdout", fraction=0.01).values())).tolist()) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"holdout must be a fraction in \(0, 1\), got 1.5"):
        split("train", fraction=1.5)
    with pytest.raises(ValueError, match="the split is one of .*'train', 'holdout'.*got 'val'"):
        split("val")
    with pytest.raises(ValueError, match="split='holdout' needs a holdout fraction"):
        sources.get_source({"name": "folder", "image_dir": messy, "split": "holdout"})


def test_holdout_of_one_class_ignores_the_other_classes_files(tmp_path):
    _write_classes(tmp_path, per_class=5)
    config = {"name": "folder", "image_dir": str(tmp_path), "split": "holdout", "holdout": 0.4}
    before = sources.get_source(config)
    _save(shapes.generate_example(0, 5, 32)["image"], tmp_path / "red_circle" / "new.png")
    after = sources.get_source(config)
    others = lambda s: [s.path(i) for i, label in enumerate(s.labels) if label != 2]  # noqa: E731
    assert others(before) == others(after)


def test_through_the_pipeline(messy):
    config = {"name": "folder", "image_dir": messy}
    pp = "resize(16)|value_range(0,1)|keep('image','label')"
    loader = pipeline.make_train_loader(config, pp, 8, seed=0, process_index=0, process_count=1)
    batches = [b for _, b in zip(range(4), iter(loader))]     # 2.6 epochs: the corrupt file comes up
    assert all(b["image"].shape == (8, 16, 16, 3) and b["label"].dtype == np.int32 for b in batches)
    assert set(np.concatenate([b["label"] for b in batches]).tolist()) == {0, 1, 2, 3}
    evals = list(pipeline.eval_batches(config, pp, 8))
    labels = np.concatenate([b["label"][b["mask"]] for b in evals])
    source = sources.get_source(config)
    readable = [label for i, label in enumerate(source.labels) if not source.path(i).endswith("broken.jpg")]
    assert labels.tolist() == readable                  # every readable image once, in order
