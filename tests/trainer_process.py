"""Helpers for tests that run the trainer in a subprocess and SIGKILL it at a chosen moment."""

import os
import signal
import subprocess
import threading

TIMEOUT_S = 600


def trainer_env(cache_dir: str, devices: int, **extra: str) -> dict:
    """The environment of a trainer subprocess: `devices` CPU devices, a shared persistent
    compilation cache and XLA's backend optimisations off (short compiles; the same for every
    run a test compares, so they cannot hide a difference); no commit delay unless `extra` sets it."""
    from mmjax import checkpoint

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    env.pop(checkpoint.COMMIT_DELAY_ENV, None)
    env.update(extra)
    return env


def watch(proc: subprocess.Popen, kill_on=None, also_kill=()) -> tuple[list[str], bool]:
    """Reads the trainer's output; SIGKILLs it (and `also_kill`) at the first line where
    kill_on(line). Returns (lines, killed); a trainer that fails by itself raises with its last
    40 lines, and one that hangs is killed after TIMEOUT_S."""
    watchdog = threading.Timer(TIMEOUT_S, proc.kill)
    watchdog.start()
    lines, killed = [], False
    for line in proc.stdout:
        lines.append(line)
        if kill_on is not None and kill_on(line):
            for p in (proc, *also_kill):
                p.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait()
    watchdog.cancel()
    if not killed and proc.returncode:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n" + "".join(lines[-40:]))
    return lines, killed


def assert_same_train_state(reference: str, workdir: str) -> int:
    """The newest good checkpoints of two runs hold byte-identical train states; returns the
    number of bytes compared."""
    import jax

    from mmjax import checkpoint

    want, got = checkpoint.load_train_state(reference), checkpoint.load_train_state(workdir)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    pairs = list(zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    assert all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in pairs)
    return sum(a.nbytes for a, _ in pairs)


class Position:
    """A stand-in data iterator for checkpoint tests: its state is a number."""

    def __init__(self, n=0):
        self.n = n

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]
