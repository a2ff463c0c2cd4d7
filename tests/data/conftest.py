"""Fixtures for the data tests: one small `mmjax_shapes` preparation shared by the session."""

import pytest

SMALL_TRAIN = 240  # 10 examples per class
SMALL_TEST = 60


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """A data_dir holding a small 32px mmjax_shapes (240 train / 60 test examples)."""
    from mmjax.data import shapes

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes.prepare(data_dir, num_train=SMALL_TRAIN, num_test=SMALL_TEST)
    return data_dir


@pytest.fixture
def small_shapes(shapes_data_dir):
    """Data config for the small shapes train split; callers may change "split"."""
    return {
        "name": "mmjax_shapes",
        "split": "train",
        "data_dir": shapes_data_dir,
        "num_train": SMALL_TRAIN,
        "num_test": SMALL_TEST,
    }
