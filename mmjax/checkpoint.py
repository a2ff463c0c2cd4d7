"""Orbax checkpoints of the train state plus the data iterator's position.

Async saves every `every_steps`, keep-N, and auto-resume from the newest complete checkpoint
in the workdir. The state is restored straight into the current mesh's shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _encode_data_state(state: Any) -> dict:
    if isinstance(state, bytes):
        return {"kind": "bytes", "value": state.decode("utf-8")}
    return {"kind": "json", "value": state}


def _decode_data_state(payload: dict) -> Any:
    return payload["value"].encode("utf-8") if payload["kind"] == "bytes" else payload["value"]


class Checkpointer:
    def __init__(self, workdir: str, every_steps: int, keep: int = 3, async_save: bool = True):
        directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every_steps), 1),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
        """Saves when the interval says so (or `force`); returns whether a save started."""
        if not force and not self.manager.should_save(step):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(_encode_data_state(data_iterator.get_state()))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(_decode_data_state(restored["data"]))
        return restored["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings, the target layout for a restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
