"""Hugging Face Hub names as checkpoints and model directories (mmjax.hub), offline: the tests put
the repositories they read into a Hugging Face cache of their own, in huggingface_hub's layout, and
the names resolve through `snapshot_download` with HF_HUB_OFFLINE on."""

import json
import shutil

import huggingface_hub
import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import mmjax
from mmjax import hub, pretrained

NAME = "vit_tiny_patch16_224"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache, repo: str, folder) -> None:
    """huggingface_hub's cache layout: models--org--name/refs/main names the snapshot folder that
    holds the repository's files (here a copy of `folder`)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, root / "snapshots" / COMMIT)


@pytest.fixture(scope="module")
def hub_cache(module_tmp, randomize, convert):
    """A cache holding a timm repository (weights and the config.json naming the architecture) and
    an mmjax model directory converted from it by its Hub name."""
    tmp, cache = module_tmp("hub"), module_tmp("hub_cache")
    torch.manual_seed(3)
    ref = randomize(timm.create_model(NAME, pretrained=False), seed=3)
    (tmp / "timm_repo").mkdir()
    save_file(ref.state_dict(), str(tmp / "timm_repo" / "model.safetensors"))
    config = {"architecture": NAME, "num_classes": 1000, "global_pool": "token"}
    (tmp / "timm_repo" / "config.json").write_text(json.dumps(config))
    put_in_cache(cache, f"timm/{NAME}.test", tmp / "timm_repo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        convert("--source", "timm", "--checkpoint", f"hf-hub:timm/{NAME}.test", "--output", tmp / "mm")
        put_in_cache(cache, "someone/mmjax-vit-tiny", tmp / "mm")
        yield {"tmp": tmp, "ref": ref}


def test_timm_hub_name_converts_without_a_model_name(hub_cache, images, diff):
    """--checkpoint hf-hub:timm/...: the weights file of timm's Hub layout, the architecture from
    the repository's config.json (no --model), the same logits as timm."""
    model, variables = mmjax.load(str(hub_cache["tmp"] / "mm"))
    x = images(2, 224, seed=4)
    with torch.no_grad():
        want = hub_cache["ref"].eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    assert diff(jax.jit(model.apply)(variables, x)["logits"], want, f"timm {NAME} by its Hub name") <= 2e-6


def test_load_reads_a_model_directory_by_hub_name(hub_cache):
    _, want = pretrained.load_arrays(str(hub_cache["tmp"] / "mm"))
    for name in ("someone/mmjax-vit-tiny", "hf-hub:someone/mmjax-vit-tiny", "someone/mmjax-vit-tiny@main"):
        _, got = pretrained.load_arrays(name)
        assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want), name


def test_a_name_missing_from_the_cache_is_a_clear_error(hub_cache):
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache and cannot be downloaded"):
        mmjax.load("nobody/no-such-model")


def test_open_clip_hub_layout_names_its_weights_and_config(tmp_path):
    """open_clip's Hub repositories: open_clip_model.safetensors (else the .bin), and the model from
    open_clip_config.json, whose "model_cfg" is the model config --model reads."""
    from mmjax.convert import clip

    model_cfg = clip.open_clip_config("ViT-B-16")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert hub.weights_file(str(tmp_path), "open_clip", "x/y").endswith("open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    assert hub.weights_file(str(tmp_path), "open_clip", "x/y").endswith("open_clip_model.safetensors")
    assert hub.weights_file(str(tmp_path), "hf", "x/y") == str(tmp_path)      # transformers: the folder
    assert clip.open_clip_config(hub.model_name(str(tmp_path), "open_clip")) == model_cfg
    with pytest.raises(FileNotFoundError, match="holds none of"):
        hub.weights_file(str(tmp_path), "timm", "x/y")


def test_local_paths_win_over_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_hub_name("org/name") and hub.is_hub_name("hf-hub:org/name") and hub.is_hub_name("org/other")
    assert not hub.is_hub_name("gs://bucket/model") and not hub.is_hub_name("runs/a/b")
