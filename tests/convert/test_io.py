"""mmjax.convert.io: safetensors without torch (bfloat16 included), torch pickles with their
usual wrappers, TorchScript archives (OpenAI's CLIP files), and clear errors for bad files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmjax.convert import io
from mmjax.convert.engine import ConversionError


def test_safetensors_round_trip_and_bfloat16(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).T, "b": np.ones(4, np.float16),
             "scale": np.array(2.5, np.float32)}
    for name in ("x.safetensors", "x.pth"):
        io.write_state_dict(str(tmp_path / name), state)
        back = io.read_state_dict(str(tmp_path / name))
        assert set(back) == {"a", "b", "scale"} and back["b"].dtype == np.float32      # floats become float32
        assert back["scale"].shape == ()                                               # scalars stay 0-d
        np.testing.assert_array_equal(back["a"], state["a"])
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": bf16, "ids": torch.arange(3)}, str(tmp_path / "bf16.safetensors"))
    back = io.read_state_dict(str(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(back["w"], bf16.float().numpy())
    assert back["ids"].dtype == np.int64


def test_reading_safetensors_does_not_import_torch(tmp_path):
    io.write_state_dict(str(tmp_path / "x.safetensors"), {"a": np.ones(3, np.float32)})
    code = ("import sys; from mmjax.convert import io; "
            f"assert io.read_state_dict({str(tmp_path / 'x.safetensors')!r})['a'].sum() == 3; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_torch_pickles_are_unwrapped(tmp_path):
    weights = {"module.visual.proj": torch.randn(4, 2), "module.logit_scale": torch.tensor(2.0)}
    torch.save({"epoch": 3, "state_dict": weights}, tmp_path / "ckpt.pt")
    back = io.read_state_dict(str(tmp_path / "ckpt.pt"))
    assert set(back) == {"visual.proj", "logit_scale"}
    np.testing.assert_array_equal(back["visual.proj"], weights["module.visual.proj"].numpy())
    io.write_state_dict(str(tmp_path / "out.pth"), back)
    assert set(torch.load(tmp_path / "out.pth")) == {"visual.proj", "logit_scale"}


def test_torchscript_archive(tmp_path):
    module = torch.jit.script(torch.nn.Linear(3, 2))
    module.save(str(tmp_path / "scripted.pt"))
    back = io.read_state_dict(str(tmp_path / "scripted.pt"))
    np.testing.assert_array_equal(back["weight"], module.weight.detach().numpy())


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        io.read_state_dict(str(tmp_path / "nope.safetensors"))
    io.write_state_dict(str(tmp_path / "x.safetensors"), {"a": np.ones((64, 64), np.float32)})
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ConversionError, match="cut.safetensors as safetensors .truncated"):
        io.read_state_dict(str(tmp_path / "cut.safetensors"))
    torch.save({"a": torch.ones(64, 64)}, tmp_path / "x.pth")
    data = (tmp_path / "x.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(ConversionError, match="cut.pth as a PyTorch checkpoint .truncated"):
        io.read_state_dict(str(tmp_path / "cut.pth"))
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(ConversionError, match="Unknown checkpoint format"):
        io.read_state_dict(str(tmp_path / "x.h5"))
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ConversionError, match="x.npz as a .npz archive of arrays .truncated"):
        io.read_state_dict(str(tmp_path / "x.npz"))
    np.save(tmp_path / "one.npy", np.ones(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ConversionError, match="one ndarray, not named arrays"):
        io.read_state_dict(str(tmp_path / "one.npz"))
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="not a state dict"):
        io.read_state_dict(str(tmp_path / "list.pth"))


def test_hf_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        io.read_hf_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        io.read_hf_folder(str(tmp_path))
    io.write_state_dict(str(tmp_path / "part1.safetensors"), {"a": np.ones(2, np.float32)})
    io.write_state_dict(str(tmp_path / "part2.safetensors"), {"b": np.zeros(3, np.float32)})
    index = {"weight_map": {"a": "part1.safetensors", "b": "part2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    config, state = io.read_hf_folder(str(tmp_path))
    assert config == {"model_type": "vit"} and set(state) == {"a", "b"}
