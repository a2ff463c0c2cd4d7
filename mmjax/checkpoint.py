"""Orbax checkpoints of the train state plus every process's data-iterator position.

Async saves every `every_steps`, keep-N, and auto-resume from the newest *good* checkpoint.

Why a run survives a kill at any moment: orbax writes a step into `<step>.orbax-checkpoint-tmp`
and renames it only when every file is written, and it deletes the oldest kept step only after
that commit, so the last complete checkpoint is never removed before a newer one exists.
Before the commit, process 0 adds a manifest (size and CRC32 of every file); on resume a step
whose files do not match it (truncated, missing or altered files) is moved to
`<workdir>/corrupt_checkpoints/` with a warning and the previous step is used instead.

Data positions are saved with the process count and their kind: a grain pipeline's global
batch position resumes on any process count, a webdataset stream's per-process position only on
the same count (another count raises instead of re-reading or skipping data).

`load_train_state` / `restore_params` read a checkpoint onto the host as numpy arrays, with no
mesh and no devices of the writing topology (for conversion and inspection).

A workdir may be a bucket URL (`gs://bucket/run`, see `mmjax.paths`): orbax writes the arrays
through tensorstore and commits a step by writing `commit_success.txt` into it (no rename on
GCS); the manifest then records the CRC32C that the store keeps for every object, so checking a
step is one listing, not a second read of the checkpoint, and moving a corrupt step aside is a
copy and a delete.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmjax import paths

MANIFEST = "mmjax_manifest.json"
# Files orbax (re)writes after the manifest is taken: commit markers, the step's metadata.
_COMMIT_MARKER, _STEP_METADATA = "commit_success.txt", "_CHECKPOINT_METADATA"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Replicas of an array share its writing only in slices this large: below it, slicing costs
# more than it saves (orbax's default slices every array, ~10 s of compiles for a tiny model).
MIN_REPLICA_SLICE_BYTES = 1 << 20
# Test hook, off unless set: seconds to hold every commit open (the step stays a tmp dir), so
# a test can SIGKILL the trainer while an async save is in flight.
COMMIT_DELAY_ENV = "MMJAX_DEBUG_CHECKPOINT_COMMIT_DELAY_S"

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores `{"state": train state, "data": iterator positions}` under workdir."""

    def __init__(self, workdir: str, every_steps: int, keep: int = 3):
        self.directory = paths.absolute(paths.join(workdir, "checkpoints"))
        self.corrupt_directory = paths.absolute(paths.join(workdir, "corrupt_checkpoints"))
        self._saving_step: int | None = None
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every_steps), 1), create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed
            async_options=ocp.AsyncOptions(post_finalization_callback=self._before_commit))
        handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                    "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """Newest committed step (unverified); see `restore_latest` for the checked one."""
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would write a checkpoint (without force)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
        """Starts an async save when the interval says so (or `force`); returns whether it did.

        Every process must call this at the same steps: the data positions of all processes
        are gathered into the checkpoint.
        """
        if not force and not self.manager.should_save(step):
            return False
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(_data_payload(data_iterator.get_state()))
        self.manager.wait_until_finished()  # the commit callback must see this step's number
        self._saving_step = step
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Restores step `step` into the shardings of `abstract_state` (ShapeDtypeStructs).

        The target mesh may differ from the writer's (other device count, other preset).
        """
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(_decode_data_state(_this_process_position(restored["data"])))
        return restored["state"]

    def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> tuple[int | None, Any]:
        """(step, state) of the newest checkpoint that passes its manifest; (None, None) if none.

        Corrupt steps are moved aside with a warning. A step that passes its manifest but does
        not restore (e.g. the model changed) raises: falling back would silently lose work.
        """
        found_any = False
        for step in sorted(self.manager.all_steps(), reverse=True):
            found_any = True
            problem = _agreed_problem(paths.join(self.directory, str(step)))
            if problem is None:
                return step, self.restore(step, abstract_state, data_iterator)
            if problem == _NO_MANIFEST:  # written without a manifest: trust orbax to notice damage
                try:
                    return step, self.restore(step, abstract_state, data_iterator)
                except Exception as e:  # noqa: BLE001 - any read failure means a broken checkpoint
                    problem = f"unreadable ({type(e).__name__}: {str(e)[:300]})"
            moved = self._move_aside(step)
            log.warning("Checkpoint step %d is corrupt: %s. Moved it to %s; falling back to the "
                        "previous checkpoint.", step, problem, moved)
        if found_any:
            raise RuntimeError(
                f"No usable checkpoint in {self.directory}: every step was corrupt and has been "
                f"moved to {self.corrupt_directory}. Run the same command again to start from "
                "scratch, or restore a good copy of a checkpoint into that directory.")
        return None, None

    def close(self) -> None:
        """Waits for the pending save; safe to call more than once."""
        if not self._closed:
            self.manager.wait_until_finished()
            self.manager.close()
            self._closed = True

    def _before_commit(self) -> None:
        """Runs on process 0 once every process has written the step, just before the commit."""
        step = self._saving_step
        step_dir = paths.join(self.directory, f"{step}{_TMP_SUFFIX}")
        if not paths.isdir(step_dir):  # storage where orbax commits in place (no rename): GCS
            step_dir = paths.join(self.directory, str(step))
        try:
            write_manifest(step_dir)
        except Exception as e:  # noqa: BLE001 - object stores raise more than OSError; still usable
            log.warning("Could not write the manifest of checkpoint step %s in %s: %s", step, step_dir, e)
        delay = float(os.environ.get(COMMIT_DELAY_ENV) or 0)
        if delay > 0:
            print(f"{COMMIT_DELAY_ENV}: holding the commit of checkpoint step {step} for {delay}s",
                  flush=True)
            time.sleep(delay)

    def _move_aside(self, step: int) -> str:
        target = paths.join(self.corrupt_directory, str(step))
        if jax.process_index() == 0:
            paths.makedirs(self.corrupt_directory, exist_ok=True)
            suffix = 0
            while paths.exists(target):
                suffix += 1
                target = paths.join(self.corrupt_directory, f"{step}-{suffix}")
            paths.move(paths.join(self.directory, str(step)), target)
        _sync("mmjax_checkpoint_move_aside")
        self.manager.reload()
        return target


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """orbax's default type handlers, with `MIN_REPLICA_SLICE_BYTES` for jax.Arrays."""
    registry = ocp.type_handlers.create_type_handler_registry(
        *[(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()])
    registry.add(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True, ignore_warnings=True)
    return registry


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings, the target layout for a restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class MissingStateError(ValueError):
    """A checkpoint's train state lacks the entries asked for; `available` lists what it holds."""

    def __init__(self, step_dir: str, missing: list[str], available: list[str]):
        super().__init__(f"{step_dir} holds no state/{', state/'.join(missing)} (it holds {available})")
        self.available = available


def load_train_state(path: str, step: int | None = None, *, params_only: bool = False,
                     keys: tuple[str, ...] | None = None) -> dict:
    """Reads a train state onto the host as numpy arrays: no mesh, any number of devices.

    `path` is a workdir, its `checkpoints/` directory, or one step directory. Without `step`
    the newest step that passes its manifest is read. `keys` reads only those entries of the
    state (e.g. ("ema_params",)); `params_only` is keys=("params",).
    """
    step_dir = resolve_step_dir(path, step)
    item_dir = paths.join(step_dir, "state")
    keys = ("params",) if params_only else keys
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(item_dir).item_metadata.tree
        if keys is not None:
            missing = [k for k in keys if k not in tree]
            if missing:
                raise MissingStateError(step_dir, missing, sorted(tree))
            tree = {k: tree[k] for k in keys}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
            item=tree, restore_args=restore_args, partial_restore=keys is not None))
    finally:
        checkpointer.close()


def restore_params(path: str, step: int | None = None) -> dict:
    """The `params` tree of a checkpoint as host numpy arrays (see `load_train_state`)."""
    return load_train_state(path, step, params_only=True)["params"]


def write_manifest(step_dir: str) -> None:
    """Records size and CRC32 of every file under `step_dir` (see `find_problem`); on object
    stores that keep a CRC32C per object (GCS), that one, read from one listing."""
    manifest: dict[str, Any] = {"format": 1}
    if paths.is_remote(step_dir):
        details = {k: v for k, v in paths.file_details(step_dir).items() if _verified(k)}
        if all(paths.crc32c(info) for info in details.values()):
            manifest["checksum"] = "crc32c"
            manifest["files"] = {k: [int(v["size"]), paths.crc32c(v)] for k, v in sorted(details.items())}
    if "files" not in manifest:
        manifest["files"] = {relative: [paths.getsize(paths.join(step_dir, relative)),
                                        paths.crc32(paths.join(step_dir, relative))]
                             for relative in _list_files(step_dir)}
    with paths.open(paths.join(step_dir, MANIFEST), "w") as f:
        json.dump(manifest, f)


_NO_MANIFEST = "no manifest"


def find_problem(step_dir: str) -> str | None:
    """What is wrong with a committed step directory, or None when it matches its manifest."""
    path = paths.join(step_dir, MANIFEST)
    if not paths.isfile(path):
        return _NO_MANIFEST
    try:
        with paths.open(path) as f:
            manifest = json.load(f)
        files, kind = manifest["files"], manifest.get("checksum", "crc32")
        files = {relative: (int(size), crc) for relative, (size, crc) in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest ({e})"
    remote = paths.is_remote(step_dir)
    details = paths.file_details(step_dir) if remote else {}  # one listing, not a request per file
    for relative, (size, crc) in sorted(files.items()):
        full = paths.join(step_dir, relative)
        if not (relative in details if remote else os.path.isfile(full)):
            return f"missing file {relative}"
        actual = int(details[relative]["size"]) if remote else os.path.getsize(full)
        if actual != size:
            return f"{relative} has {actual} bytes, {size} were written"
        if kind == "crc32c":
            actual_crc = (paths.crc32c(details[relative]) if remote else None) or paths.content_crc32c(full)
        else:
            actual_crc = paths.crc32(full)
        if actual_crc != crc:
            return f"{relative} does not match its checksum"
    return None


def _verified(relative: str) -> bool:
    """Whether the manifest covers a file: not itself, nor what orbax writes after it."""
    return relative not in (MANIFEST, _STEP_METADATA) and os.path.basename(relative) != _COMMIT_MARKER


def _list_files(root: str) -> list[str]:
    return [relative for relative in paths.list_files(root) if _verified(relative)]


def resolve_step_dir(path: str, step: int | None) -> str:
    """The step directory of a workdir, its checkpoints/ folder or a step folder: `step`, or the
    newest good one."""
    path = paths.resolve(path)
    if paths.isdir(paths.join(path, "state")):
        return path
    if paths.isdir(paths.join(path, "checkpoints")):
        path = paths.join(path, "checkpoints")
    steps = sorted((int(n) for n in paths.listdir(path) if n.isdigit()), reverse=True) if paths.isdir(path) else []
    if paths.scheme(path) == "gs":  # committed in place: a step without its marker is unfinished
        steps = [s for s in steps if paths.isfile(paths.join(path, str(s), _COMMIT_MARKER))]
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"No checkpoint step {step} in {path}; steps there: {sorted(steps)}")
        return paths.join(path, str(step))
    problems = []
    for candidate in steps:
        problem = find_problem(paths.join(path, str(candidate)))
        if problem in (None, _NO_MANIFEST):
            return paths.join(path, str(candidate))
        problems.append(f"step {candidate}: {problem}")
    raise FileNotFoundError(f"No usable checkpoint in {path}" + (f" ({'; '.join(problems)})" if problems else ""))


def _agreed_problem(step_dir: str) -> str | None:
    """Process 0 checks the step; every process gets its verdict (one read of the files)."""
    if jax.process_count() == 1:
        return find_problem(step_dir)
    from jax.experimental import multihost_utils

    problem = find_problem(step_dir) if jax.process_index() == 0 else None
    code = {None: 0, _NO_MANIFEST: 1}.get(problem, 2)
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    return {0: None, 1: _NO_MANIFEST}.get(code, problem or "corrupt (found by process 0)")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _gather_from_processes(payload: dict) -> list[dict]:
    """Every process's JSON payload, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(payload).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(blob.size))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:blob.size] = blob
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(np.asarray(gathered), np.asarray(lengths))]


# A data state that holds only for the process count it was taken with says so with this entry
# (webdataset streams: each process reads its own shards); other states are one global position.
PROCESS_COUNT_KEY = "process_count"


def _data_payload(state: Any) -> dict:
    """Every process's data position (a collective), the process count, and the positions' kind:
    "per_process" (valid only for that process count) or "global" (valid for any count)."""
    per_process = isinstance(state, dict) and PROCESS_COUNT_KEY in state
    return {"per_process": _gather_from_processes(_encode_data_state(state)),
            "process_count": jax.process_count(),
            "position_kind": "per_process" if per_process else "global"}


def _this_process_position(payload: dict) -> dict:
    """This process's entry of the saved positions; a shared one when the count changed and the
    positions are global. Payloads without `position_kind` (older checkpoints) are judged by
    equality alone."""
    if "per_process" not in payload:
        return payload  # one position for all processes (older checkpoints)
    positions = payload["per_process"]
    saved = int(payload.get("process_count", len(positions)))
    count, index = jax.process_count(), jax.process_index()
    if saved == count and len(positions) == count:
        return positions[index]
    if payload.get("position_kind") == "per_process":
        raise ValueError(
            f"The checkpoint's data positions were written by {_processes(saved)} and hold only for "
            "that process count (webdataset shards are split over the processes, so each position "
            f"is in that process's own shards); this run has {_processes(count)}. Resume with "
            f"{_processes(saved)}, or start a new workdir with --config.init.source=<this workdir> "
            "(parameters only: the optimizer state, step and data start afresh).")
    if all(p == positions[0] for p in positions):
        return positions[0]  # position-only state (grain pipelines): valid for any process count
    raise ValueError(
        f"The checkpoint holds data positions of {len(positions)} processes that differ, and this "
        f"run has {count} processes. Resume with {len(positions)} processes, or use a data source "
        "whose position does not depend on the process count (TFDS or folder data).")


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _encode_data_state(state: Any) -> dict:
    if isinstance(state, bytes):
        return {"kind": "bytes", "value": state.decode("utf-8")}
    return {"kind": "json", "value": state}


def _decode_data_state(payload: dict) -> Any:
    return payload["value"].encode("utf-8") if payload["kind"] == "bytes" else payload["value"]
