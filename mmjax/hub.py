"""Hugging Face Hub names where a checkpoint or model directory is expected: `org/name`, or
open_clip's spelling `hf-hub:org/name` (either, with `@revision`).

Resolved through `huggingface_hub`'s cache (`snapshot_download`): a repository already in the cache
is read from it; otherwise it is downloaded where the machine is online. With HF_HUB_OFFLINE=1 only
the cache is read, and a name missing from it is an error that says so. A path that exists locally
always wins over a Hub name of the same spelling.
"""

from __future__ import annotations

import json
import os
import re

from mmjax import paths

PREFIX = "hf-hub:"
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# The weights file of a repository in each library's Hub layout, most preferred first.
WEIGHTS = {
    "timm": ("model.safetensors", "pytorch_model.bin"),
    "open_clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
}


def is_hub_name(spec: str) -> bool:
    """`hf-hub:org/name`, or `org/name` that is not a local path or a URL."""
    if spec.startswith(PREFIX):
        return True
    return bool(_REPO.fullmatch(spec)) and not paths.is_remote(spec) and not os.path.exists(spec)


def snapshot(spec: str) -> str:
    """The local folder holding the repository's files (from the cache, or downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    repo, _, revision = name.partition("@")
    if not _REPO.fullmatch(repo):
        raise ValueError(f"{spec!r} is not a Hugging Face Hub name (org/name or hf-hub:org/name)")
    try:
        return snapshot_download(repo, revision=revision or None)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{spec!r} is not in the Hugging Face cache and cannot be downloaded here "
                                f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}; "
                                f"cache: $HF_HUB_CACHE / ~/.cache/huggingface/hub): {e}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{spec!r}: no such Hugging Face Hub repository (or it is private): {e}") from e


def weights_file(folder: str, source: str, spec: str) -> str:
    """The repository's weights file for `source` (a transformers source takes the folder itself)."""
    names = WEIGHTS.get(source)
    if names is None:
        return folder
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{spec!r} holds none of {list(names)} (the {source} Hub layout); it has "
                            f"{sorted(os.listdir(folder))}")


def model_name(folder: str, source: str) -> str | None:
    """The model a Hub repository names for itself: timm's config.json "architecture", or the path of
    open_clip's open_clip_config.json (which `--model` accepts); None when it names none."""
    if source == "timm" and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("architecture")
    if source == "open_clip" and os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        return os.path.join(folder, "open_clip_config.json")
    return None
