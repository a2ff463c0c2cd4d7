"""mmjax-train's host allocator choice: huge-page malloc once, unless the user chose otherwise."""

import os

import pytest

from mmjax import allocator


class _Exec(Exception):
    """Raised by the fake execve: the process would have been replaced here."""


@pytest.fixture
def execve(monkeypatch):
    calls = []

    def fake(path, argv, env):
        calls.append((path, argv, env))
        raise _Exec

    monkeypatch.setattr(os, "execve", fake)
    for name in (allocator.ENV_VAR, "GLIBC_TUNABLES", "LD_PRELOAD", allocator._MARK):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "hugepages_supported", lambda: True)
    return calls


def test_restarts_once_under_huge_page_malloc(execve, monkeypatch):
    with pytest.raises(_Exec):
        allocator.for_training("mmjax.train", ["--config", "c.py", "--workdir", "w"])
    (_, argv, env), = execve
    assert argv[1:] == ["-m", "mmjax.train", "--config", "c.py", "--workdir", "w"]
    assert "glibc.malloc.hugetlb=1" in env["GLIBC_TUNABLES"]
    monkeypatch.setattr(os, "environ", env)       # the restarted process: no second restart
    allocator.for_training("mmjax.train", [])
    assert len(execve) == 1


@pytest.mark.parametrize("setting", [{allocator.ENV_VAR: "default"}, {"LD_PRELOAD": "/usr/lib/libtcmalloc.so"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_a_users_choice_is_kept(execve, monkeypatch, setting):
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    allocator.for_training("mmjax.train", [])
    assert execve == []


def test_no_restart_where_unsupported_and_bad_setting(execve, monkeypatch):
    monkeypatch.setattr(allocator, "hugepages_supported", lambda: False)
    allocator.for_training("mmjax.train", [])
    assert execve == []
    monkeypatch.setenv(allocator.ENV_VAR, "tcmalloc")
    with pytest.raises(SystemExit, match="MMJAX_ALLOCATOR"):
        allocator.for_training("mmjax.train", [])


def test_this_machine_is_detected():
    """glibc >= 2.35 with transparent huge pages (the CI machines): the default applies."""
    version = os.confstr("CS_GNU_LIBC_VERSION")
    with open(allocator.THP_SETTING) as f:
        thp = f.read()
    expected = version.startswith("glibc ") and tuple(map(int, version.split()[1].split(".")[:2])) >= (2, 35) \
        and "[never]" not in thp
    assert allocator.hugepages_supported() == expected
