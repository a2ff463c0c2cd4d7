"""Test-wide setup: an 8-device CPU platform, so sharded code runs on a simulated mesh; a
compilation cache for the session; and the session's shared trainer runs (`shapes_vit_run`,
`shapes_clip_run`), each trained once."""

import atexit
import contextlib
import dataclasses
import io
import os
import shutil
import sys
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the session: a program compiled twice (a run's train step
# and the same step in its resumed run, one tiny model's init in several tests) compiles once. The
# cached executable is the one a fresh compile gives, so no test sees anything else.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="mmjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Smaller train batches than the smoke recipes' 32 (one example per simulated device), and eval
# batches of the smoke evaluations' 64 examples instead of 500 (504 rows, padding included).
VIT_RUN = ("experiments/vit/shapes.py:smoke=True",
           ["--config.input.batch_size=8", "--config.evals.top1.batch_size=64"])
# The CLIP is the main job's plain patch-embedding variant (`stem=False`): timm, open_clip and
# transformers have no conv stem, and the run-to-PyTorch tests export it.
CLIP_RUN = ("experiments/clip/shapes.py:smoke=True,stem=False",
            ["--config.input.batch_size=8", "--config.evals.zeroshot.batch_size=64",
             "--config.evals.retrieval.batch_size=64"])


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished trainer run. Tests read it and never write into `workdir` (copy it first)."""

    spec: str               # the config, e.g. "experiments/vit/shapes.py:smoke=True"
    overrides: tuple        # the --config.* overrides it was trained with
    workdir: str
    final: dict             # what train.train returned: the final evaluation metrics
    stdout: str             # what it printed, with no terminal: the "step N/T | ..." lines and the summary


def _train_once(tmp_path_factory, name: str, spec: str, overrides: list) -> Run:
    from mmjax import configs, progress, train

    workdir = str(tmp_path_factory.mktemp("shared_runs") / name)
    config = configs.apply_overrides(configs.load_config(spec), list(overrides))
    out = io.StringIO()  # not a terminal, as in CI: the progress mode "auto" picks the plain lines
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.delenv(progress.ENV_VAR, raising=False)
        final = train.train(config, workdir)
    sys.stdout.write(out.getvalue())  # still in the captured output of the test that built it
    return Run(spec, tuple(overrides), workdir, dict(final), out.getvalue())


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """Makes folders for a module's shared fixtures and deletes them when the module's tests end.
    pytest keeps `tmp_path_factory` folders to the session's end, and the real-size checkpoints of
    the conversion tests would then fill CI's disk."""
    made = []

    def make(name: str):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def shapes_vit_run(tmp_path_factory) -> Run:
    """4 steps of the shapes ViT (smoke), checkpoints at steps 2 and 4, top-1 evaluated at the end."""
    return _train_once(tmp_path_factory, "vit", *VIT_RUN)


@pytest.fixture(scope="session")
def shapes_clip_run(tmp_path_factory) -> Run:
    """4 steps of the shapes CLIP (smoke, plain patch embedding), checkpoints at steps 2 and 4,
    zero-shot and retrieval evaluated at the end."""
    return _train_once(tmp_path_factory, "clip", *CLIP_RUN)
