"""Every experiment config loads, and its smoke mode trains a few steps on the embedded data."""

import glob
import math

import pytest

from mmjax import configs, train

EXPERIMENTS = sorted(glob.glob("experiments/*/*.py"))


def test_experiments_found():
    assert len(EXPERIMENTS) >= 6


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_full_config_loads_and_documents_itself(path):
    config = configs.load_config(path)
    assert config.task in ("classification", "contrastive", "mae", "beit", "beit_classification")
    with open(path) as f:
        source = f.read()
    assert source.lstrip().startswith('"""') and "mmjax-train --config" in source, \
        "recipes state the paper, expected result and command in the docstring"


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if not p.endswith("shapes.py")])
def test_smoke_mode_trains(path, tmp_path):
    final = train.train(configs.load_config(f"{path}:smoke=True"), str(tmp_path))
    assert final and all(math.isfinite(v) for v in final.values())
