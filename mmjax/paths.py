"""One path layer for workdirs, data and model directories: local paths or object-store URLs.

A local path (anything without `scheme://`, or `file://...`) goes straight to os/shutil/open,
exactly as before, and never imports fsspec or gcsfs. A URL (`gs://bucket/run`, and any other
scheme that fsspec, the backend of `etils.epath`, knows: s3://, az://, hf://, memory://) goes
through the same fsspec file system object that etils.epath (and so orbax) uses for it, so
that listings are never stale between our writes and orbax's. `gs://` needs `gcsfs`; the
credentials are Google's application default ones (on a TPU VM: its service account).

Object stores have no append and no rename: `open_append` rewrites the object at every line
(the metrics log), `LocalMirror` keeps a directory locally and uploads what changed (the
TensorBoard logs), and `move` copies then deletes.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import os
import posixpath
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_EPATH_SCHEMES = ("gs", "s3", "az", "hf")  # the schemes etils.epath hands to fsspec
_NEEDS = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


def scheme(path: str | os.PathLike) -> str | None:
    """'gs' for gs://..., None for a local path (also for file://)."""
    match = _URL.match(os.fspath(path))
    if match is None or match.group(1).lower() == "file":
        return None
    return match.group(1).lower()


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) is not None


def resolve(path: str | os.PathLike) -> str:
    """Local: absolute with ~ expanded (as os.path.abspath); URL: unchanged but a trailing '/'."""
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not is_remote(path):
        return os.path.abspath(os.path.expanduser(path))
    head, rest = path.split("://", 1)
    rest = posixpath.normpath(rest) if rest.strip("/") else rest
    return f"{head}://{rest.rstrip('/')}"


def absolute(path: str | os.PathLike) -> str:
    """Local: os.path.abspath (no ~ expansion, as before); URL: as `resolve`."""
    path = os.fspath(path)
    return resolve(path) if is_remote(path) else os.path.abspath(path)


def expand(path: str | os.PathLike) -> str:
    """~ expanded for local paths (relative ones stay relative); URLs unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.expanduser(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def basename(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def dirname(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def filesystem(path: str) -> Any:
    """The fsspec file system of a URL: the one etils.epath uses, listings cache cleared."""
    name = scheme(path)
    try:
        if name in _EPATH_SCHEMES:
            from etils.epath import backend

            fs = backend.fsspec_backend.fs(path)
        else:
            import fsspec

            fs = fsspec.core.url_to_fs(path)[0]
    except ImportError as e:
        package = _NEEDS.get(name or "", "fsspec")
        raise ImportError(f"{path!r}: {name}:// paths need the {package} package (pip install "
                          f"{package}): {e}") from e
    fs.invalidate_cache()  # other processes (or orbax's writes) may have changed the store
    return fs


def exists(path: str) -> bool:
    return filesystem(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return filesystem(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return filesystem(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def getsize(path: str) -> int:
    return int(filesystem(path).size(path)) if is_remote(path) else os.path.getsize(path)


def listdir(path: str) -> list[str]:
    """Names in a directory (object stores: the next level of prefixes and objects)."""
    if not is_remote(path):
        return os.listdir(path)
    fs = filesystem(path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    return sorted({posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)} - {""})


def makedirs(path: str, exist_ok: bool = True) -> None:
    """Object stores have no directories: nothing to make there."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=exist_ok)


def open(path: str, mode: str = "r", **kwargs: Any) -> IO:  # noqa: A001 - the builtin, for URLs too
    """The builtin open for local paths; for URLs, written objects appear when the file is closed."""
    if not is_remote(path):
        return _builtin_open(path, mode, **kwargs)
    if "a" in mode or "+" in mode:
        raise ValueError(f"{path}: mode {mode!r} is not available on object stores; use open_append")
    return filesystem(path).open(path, mode, **kwargs)


_builtin_open = builtins.open


def remove(path: str) -> None:
    if is_remote(path):
        filesystem(path).rm_file(path)
    else:
        os.remove(path)


def rmtree(path: str, ignore_errors: bool = False) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    try:
        filesystem(path).rm(path, recursive=True)
    except FileNotFoundError:
        if not ignore_errors:
            raise


def move(src: str, dst: str) -> None:
    """shutil.move locally; on object stores a copy of every object, then the deletions."""
    if not is_remote(src):
        shutil.move(src, dst)
        return
    fs = filesystem(src)
    files = list_files(src)
    for relative in files:
        fs.copy(join(src, relative), join(dst, relative))
    fs.rm(src, recursive=True)


def list_files(root: str) -> list[str]:
    """Every file under `root`, relative to it, sorted."""
    if not is_remote(root):
        out = []
        for folder, _, names in os.walk(root):
            out += [os.path.relpath(os.path.join(folder, n), root) for n in names]
        return sorted(out)
    return sorted(file_details(root))


def file_details(root: str) -> dict[str, dict]:
    """Relative path -> the store's metadata (size, crc32c, ...) of every object under a URL,
    in one listing."""
    fs = filesystem(root)
    prefix = _strip_protocol(fs, root).rstrip("/") + "/"
    found = fs.find(root, detail=True)
    return {name[len(prefix):]: info for name, info in found.items()
            if name.startswith(prefix) and info.get("type", "file") != "directory"}


def _strip_protocol(fs: Any, path: str) -> str:
    return fs._strip_protocol(path)  # noqa: SLF001 - fsspec's way of naming paths without scheme


def crc32c(info: dict) -> str | None:
    """The CRC32C an object store keeps for an object (base64, as GCS gives it), if any."""
    value = info.get("crc32c")
    return value if isinstance(value, str) and value else None


def content_crc32c(path: str) -> str:
    """The CRC32C of a file's content, in GCS's base64 form (for stores that do not keep one)."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def crc32(path: str) -> int:
    """zlib CRC32 of a file's content."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def glob(pattern: str) -> list[str]:
    """Sorted matches; URLs keep their scheme."""
    if not is_remote(pattern):
        import glob as glob_lib

        return sorted(glob_lib.glob(pattern))
    fs = filesystem(pattern)
    head = pattern.split("://", 1)[0]
    return sorted(f"{head}://{p}" for p in fs.glob(pattern))


def existing_files(candidates: list[str]) -> set[str]:
    """The candidates that are files, with one listing per folder on object stores (not one
    request per file)."""
    local = {p for p in candidates if not is_remote(p) and os.path.isfile(p)}
    remote = [p for p in candidates if is_remote(p)]
    by_folder: dict[str, list[str]] = {}
    for path in remote:
        by_folder.setdefault(dirname(path), []).append(path)
    for folder, members in by_folder.items():
        try:
            present = set(file_details(folder))
        except FileNotFoundError:
            present = set()
        local |= {p for p in members if basename(p) in present}
    return local


class _RemoteAppendFile:
    """Append mode for an object: the object is read once, then rewritten whole at every flush
    (and at every line written: line-buffered, like the local file it replaces)."""

    def __init__(self, path: str):
        self.path = path
        self._fs = filesystem(path)
        self._data = self._fs.cat_file(path) if self._fs.exists(path) else b""
        self._dirty = False
        self.closed = False

    def write(self, text: str) -> int:
        self._data += text.encode("utf-8")
        self._dirty = True
        if "\n" in text:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._dirty:
            self._fs.pipe_file(self.path, self._data)
            self._dirty = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> _RemoteAppendFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_append(path: str) -> IO[str] | _RemoteAppendFile:
    """A line-buffered text file opened for appending; on object stores see `_RemoteAppendFile`."""
    if not is_remote(path):
        return _builtin_open(path, "a", buffering=1)
    return _RemoteAppendFile(path)


class LocalMirror:
    """A local directory for writers that only know local files (TensorBoard): `local` is the
    directory itself for a local `target`, else a temporary one whose changed files `sync()`
    uploads to `target`; `close()` syncs and removes it."""

    def __init__(self, target: str):
        self.target = target
        self.remote = is_remote(target)
        self._uploaded: dict[str, tuple[int, int]] = {}
        if self.remote:
            self.local = tempfile.mkdtemp(prefix="mmjax_mirror_")
        else:
            os.makedirs(target, exist_ok=True)
            self.local = target

    def sync(self) -> None:
        if not self.remote:
            return
        fs = filesystem(self.target)
        for relative in list_files(self.local):
            full = os.path.join(self.local, relative)
            stat = os.stat(full)
            key = (stat.st_size, stat.st_mtime_ns)
            if self._uploaded.get(relative) != key:
                fs.put_file(full, join(self.target, relative.replace(os.sep, "/")))
                self._uploaded[relative] = key

    def close(self) -> None:
        if self.remote and os.path.isdir(self.local):
            self.sync()
            shutil.rmtree(self.local, ignore_errors=True)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path with the content of `path` (downloaded to a temporary file for a URL)."""
    if not is_remote(path):
        yield path
        return
    folder = tempfile.mkdtemp(prefix="mmjax_download_")
    try:
        local = os.path.join(folder, basename(path))
        filesystem(path).get_file(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def local_target(path: str) -> Iterator[str]:
    """A local path to write `path` through: itself, or a temporary file uploaded on success."""
    if not is_remote(path):
        yield path
        return
    folder = tempfile.mkdtemp(prefix="mmjax_upload_")
    try:
        local = os.path.join(folder, basename(path))
        yield local
        filesystem(path).put_file(local, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cache_locally(url: str, cache_root: str | None = None) -> str:
    """A local copy of the directory `url`, kept across runs under `cache_root`
    (default `$MMJAX_CACHE_DIR`, else ~/.cache/mmjax/remote); files whose size and checksum
    match are not downloaded again. For readers that only read local files (array_record)."""
    root = cache_root or os.environ.get("MMJAX_CACHE_DIR") or os.path.join("~", ".cache", "mmjax", "remote")
    head, rest = resolve(url).split("://", 1)
    local = os.path.join(os.path.expanduser(root), head, *rest.split("/"))
    fs = filesystem(url)
    stamp_dir = os.path.join(local, ".mmjax_cache")
    for relative, info in file_details(url).items():
        target = os.path.join(local, *relative.split("/"))
        stamp = os.path.join(stamp_dir, relative.replace("/", "%2F"))
        identity = f"{info.get('size')} {crc32c(info) or info.get('etag') or info.get('mtime')}"
        if os.path.isfile(target) and os.path.isfile(stamp) and _read(stamp) == identity:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.makedirs(stamp_dir, exist_ok=True)
        partial = f"{target}.partial.{os.getpid()}"
        fs.get_file(join(url, relative), partial)
        os.replace(partial, target)
        with _builtin_open(stamp, "w") as f:
            f.write(identity)
    return local


def _read(path: str) -> str:
    with _builtin_open(path) as f:
        return f.read()
