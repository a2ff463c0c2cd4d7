"""Host memory allocator settings for CPU runs, applied by re-running the process.

XLA allocates each train step's buffers (GBs for ViT-B/16) afresh. glibc's malloc serves such
sizes with new mmap()s, so the kernel faults every 4 KiB page in again on every step (about
300k minor faults per ViT-S/16 train step, measured). Two fixes, both for JAX and PyTorch alike:
- "hugepages": glibc's own allocator with `glibc.malloc.hugetlb=1` (glibc ≥ 2.35, transparent
  huge pages in "madvise" or "always" mode): 2 MiB pages, ~300× fewer faults.
- "jemalloc": LD_PRELOAD jemalloc, by default with huge pages and no purging of freed memory
  (`JEMALLOC_CONF`); stock jemalloc (pass an empty conf) still faults a lot as it purges.
An allocator is chosen when a process starts, so `reexec` restarts the same command once.
`mmjax-train` does so by itself (`for_training`): on the main job, glibc's default allocator
costs ~55k page faults per step, ~20% of the CPU time (measured on a 2-core VM).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

ALLOCATORS = ("default", "hugepages", "jemalloc")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_MARK = "MMJAX_CHOSEN_ALLOCATOR"   # set in the restarted process
# mmjax-train's choice: "auto" (huge pages where glibc and the kernel support them), or an allocator name.
ENV_VAR = "MMJAX_ALLOCATOR"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def environment_for(name: str, jemalloc_path: str = JEMALLOC, jemalloc_conf: str = JEMALLOC_CONF) -> dict[str, str]:
    """Environment variables that select allocator `name` for a new process."""
    if name == "default":
        return {}
    if name == "hugepages":
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        return {"GLIBC_TUNABLES": ":".join(t for t in (tunables, "glibc.malloc.hugetlb=1") if t)}
    if name == "jemalloc":
        if not os.path.exists(jemalloc_path):
            raise SystemExit(f"jemalloc: {jemalloc_path} not found (Debian/Ubuntu: apt-get install libjemalloc2); "
                             "pass its path")
        env = {"LD_PRELOAD": " ".join(p for p in (jemalloc_path, os.environ.get("LD_PRELOAD", "")) if p)}
        if jemalloc_conf:
            env["MALLOC_CONF"] = jemalloc_conf
        return env
    raise ValueError(f"Unknown allocator {name!r}; known: {ALLOCATORS}")


def reexec(name: str, module: str, argv: list[str], **kwargs) -> None:
    """Restarts `python -m module argv` under allocator `name`, unless this process already is."""
    if name == "default" or os.environ.get(_MARK) == name:
        return
    env = dict(os.environ, **environment_for(name, **kwargs), **{_MARK: name})
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def describe() -> dict[str, str | None]:
    """The allocator settings this process runs with (for results files)."""
    preload = os.environ.get("LD_PRELOAD", "")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "jemalloc" in preload:
        name = "jemalloc"
    elif "glibc.malloc.hugetlb=1" in tunables or "glibc.malloc.hugetlb=2" in tunables:
        name = "glibc malloc + huge pages"
    else:
        name = "glibc malloc"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = None
    return {"allocator": name, "LD_PRELOAD": preload or None, "MALLOC_CONF": os.environ.get("MALLOC_CONF"),
            "GLIBC_TUNABLES": tunables or None, "transparent_hugepage": thp}


def hugepages_supported() -> bool:
    """glibc >= 2.35 (the `glibc.malloc.hugetlb` tunable) and transparent huge pages not 'never'."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        major, minor = (int(v) for v in version.split(".")[:2])
        with open(THP_SETTING) as f:
            thp = f.read()
    except (AttributeError, ValueError, OSError):   # not Linux/glibc, or no THP
        return False
    return name == "glibc" and (major, minor) >= (2, 35) and "[never]" not in thp


def for_training(module: str, argv: Sequence[str]) -> None:
    """Restarts `python -m module argv` once with huge-page malloc, unless $MMJAX_ALLOCATOR says
    otherwise ("default", "jemalloc"), the process already runs under a chosen allocator
    (LD_PRELOAD or a malloc tunable set by the user), or the system cannot."""
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in ("auto", *ALLOCATORS):
        raise SystemExit(f"${ENV_VAR}={choice!r}: use auto or one of {ALLOCATORS}")
    if choice == "auto":
        user_set = "malloc" in os.environ.get("GLIBC_TUNABLES", "") or os.environ.get("LD_PRELOAD")
        choice = "hugepages" if hugepages_supported() and not user_set else "default"
    reexec(choice, module, list(argv))
