"""Reading and writing PyTorch state dicts as NumPy arrays.

`.safetensors` files are read and written with the `safetensors` package alone (no torch), JAX
`.npz` files (flattened Flax trees: big_vision, vision_transformer) with NumPy alone;
`.bin` / `.pth` / `.pt` pickles and TorchScript archives (OpenAI's original CLIP files) need
torch, imported only then. Hugging Face model folders are read as config.json plus weights.
Files and folders may be in a bucket (gs://..., see `mmjax.paths`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from mmjax import paths
from mmjax.convert.engine import ConversionError

TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A flat {key: array} from a .safetensors, .npz, .bin, .pth or .pt file; floats become float32.

    Wrappers are removed: a {"state_dict": ...} or {"model": ...} top level, and a "module."
    prefix on every key (DistributedDataParallel).
    """
    if paths.is_remote(path):  # gs://...: read from a temporary local copy
        if not paths.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        with paths.local_copy(path) as local:
            return read_state_dict(local)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        state = _read_safetensors(path)
    elif path.endswith(".npz"):
        state = _read_npz(path)
    elif path.endswith(TORCH_SUFFIXES):
        state = _read_torch(path)
    else:
        raise ConversionError(f"Unknown checkpoint format {path!r}: expected .safetensors, .npz or one of "
                              f"{TORCH_SUFFIXES}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.astype(np.float32, copy=False) if _is_float(v.dtype) else v for k, v in state.items()}


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        with safetensors.safe_open(path, framework="np") as f:
            keys = list(f.keys())
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            # NumPy has no bfloat16: those tensors are read from the raw bytes below.
            state = {k: f.get_tensor(k) for k in keys if dtypes[k] != "BF16"}
    except Exception as e:  # the Rust error type is not a stable public class
        raise ConversionError(f"Cannot read {path} as safetensors (truncated or not a safetensors file): {e}") from e
    if len(state) < len(keys):
        with open(path, "rb") as f:
            for key, view in safetensors.deserialize(f.read()):
                if view["dtype"] == "BF16":
                    state[key] = np.frombuffer(view["data"], ml_dtypes.bfloat16).reshape(view["shape"])
    return state


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """A NumPy archive without pickles (a JAX checkpoint holds arrays only)."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):   # a lone .npy array under an .npz name
            raise ValueError(f"it holds one {type(archive).__name__}, not named arrays")
        with archive:
            return {k: archive[k] for k in archive.files}
    except (EOFError, OSError, ValueError) as e:
        raise ConversionError(f"Cannot read {path} as a .npz archive of arrays (truncated, pickled or not "
                              f"an .npz): {e}") from e


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"Reading {path} needs torch (pip install torch); .safetensors files do not") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if _is_torchscript(path):      # OpenAI's original CLIP files are TorchScript archives
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            raise ConversionError(f"Cannot read {path} as a PyTorch checkpoint (truncated or not a "
                                  f"state dict): {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        state[key] = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
    return state


def _is_torchscript(path: str) -> bool:
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def write_state_dict(path: str, state: Mapping[str, np.ndarray]) -> None:
    """Writes .safetensors or .npz (no torch needed) or, for .bin/.pth/.pt, a torch.save'd dict of tensors."""
    if paths.is_remote(path):  # gs://...: written locally, then uploaded
        with paths.local_target(path) as local:
            write_state_dict(local, state)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {k: np.asarray(v, order="C") for k, v in state.items()}
    if path.endswith(".safetensors"):
        safetensors.numpy.save_file(arrays, path, metadata={"format": "pt"})
    elif path.endswith(".npz"):
        np.savez(path, **arrays)
    elif path.endswith(TORCH_SUFFIXES):
        import torch
        torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, path)
    else:
        raise ConversionError(f"Unknown output format {path!r}: use .safetensors, .npz or one of {TORCH_SUFFIXES}")


def read_hf_folder(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, state dict) of a Hugging Face `transformers` model folder."""
    config_path = paths.join(folder, "config.json")
    if not paths.isdir(folder) or not paths.isfile(config_path):
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    with paths.open(config_path) as f:
        config = json.load(f)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if paths.isfile(paths.join(folder, name)):
            return config, read_state_dict(paths.join(folder, name))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if paths.isfile(paths.join(folder, index)):
            with paths.open(paths.join(folder, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(read_state_dict(paths.join(folder, shard)))
            return config, state
    raise FileNotFoundError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")


def write_hf_folder(folder: str, config: dict, state: Mapping[str, np.ndarray]) -> None:
    paths.makedirs(folder, exist_ok=True)
    with paths.open(paths.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_state_dict(paths.join(folder, "model.safetensors"), state)
