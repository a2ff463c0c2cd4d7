"""A local Cloud Storage emulator for the tests, and the environment that points clients at it.

`start()` runs `gcp-storage-emulator` (in memory, one bucket) in a subprocess on 127.0.0.1 and
returns once it answers; `stop()` ends it. `environment(url)` is what makes every client use it
and no real credentials:

* tensorstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL is its gcs driver's endpoint; with no
  credentials found (GOOGLE_APPLICATION_CREDENTIALS unset, an empty CLOUDSDK_CONFIG, and the GCE
  metadata server pointed at a closed port) it sends requests without an Authorization header.
* gcsfs (etils.epath's gs:// backend, so orbax's directories and mmjax.paths): STORAGE_EMULATOR_HOST
  is its endpoint, FSSPEC_GCS_TOKEN=anon its credentials (fsspec's config from the environment),
  and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false skips its gRPC bucket-type probe (which the emulator
  does not serve and which would wait 60 s).

Run as a script it is the server: `python gcs_emulator.py PORT BUCKET MAX_SECONDS`; it exits by
itself after MAX_SECONDS or when its parent process is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bucket: str = "bucket", max_seconds: int = 3600) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # Its log goes to a file: a pipe nobody reads would fill up and block the server.
    log = tempfile.NamedTemporaryFile("w+", prefix="gcs_emulator_", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket, str(max_seconds)],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(proc.log_path) as f:
                raise RuntimeError(f"the storage emulator exited ({proc.returncode}): {f.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"the storage emulator did not answer on {url} within {START_TIMEOUT_S}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with contextlib.suppress(OSError):
        os.remove(proc.log_path)


def environment(url: str) -> dict[str, str]:
    """Variables to set (and GOOGLE_APPLICATION_CREDENTIALS to remove) for clients of the emulator."""
    empty_config = tempfile.mkdtemp(prefix="gcloud_config_")
    return {"TENSORSTORE_GCS_HTTP_URL": url, "STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "CLOUDSDK_CONFIG": empty_config,
            "GCE_METADATA_ROOT": "127.0.0.1:9", "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9", "NO_GCE_CHECK": "true"}


def _serve(port: int, bucket: str, max_seconds: float) -> None:
    import http.server

    from gcp_storage_emulator import server

    class Server(http.server.HTTPServer):
        request_queue_size = 512  # tensorstore opens many connections at once; serve them in turn

    server.server.HTTPServer = Server
    _add_generation_headers(server)
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.start()
    parent, deadline = os.getppid(), time.time() + max_seconds
    try:
        while time.time() < deadline and os.getppid() == parent:
            time.sleep(0.5)
    finally:
        emulator.stop()


def _add_generation_headers(server) -> None:
    """Downloads answer with x-goog-generation, as GCS does: tensorstore's gcs driver reads an
    object's generation from it (the emulator leaves it out: "Malformed StorageGeneration")."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # noqa: BLE001 - no such object: download answers 404 itself
            pass
        return download(request, response, storage, *args, **kwargs)

    objects.download = with_generation  # objects.get(alt=media) calls it by this name
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is download:
                methods[method] = with_generation


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
