"""`cpu_devices`: mmjax-train splits a CPU host into N devices before JAX starts, unless the user
already chose a count; a request that comes too late says so instead of passing unnoticed."""

import os
import subprocess
import sys
import textwrap

import pytest

from mmjax import cpu_devices, train


def _fresh_python(code: str, xla_flags: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    return result.stdout.strip()


def test_splits_the_host_before_jax_starts():
    out = _fresh_python("""
        import jax
        from mmjax import cpu_devices
        print(cpu_devices.request(3), len(jax.devices()))
    """)
    assert out == "True 3"


def test_a_request_after_jax_started_warns_and_changes_nothing():
    out = _fresh_python("""
        import warnings, jax
        from mmjax import cpu_devices
        before = len(jax.devices())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            late = cpu_devices.request(2)
        print(before, late, len(jax.devices()), "backends already started" in str(caught[0].message))
    """)
    assert out == "1 False 1 True"


def test_the_users_xla_flag_wins():
    out = _fresh_python("""
        import jax
        from mmjax import cpu_devices
        print(cpu_devices.request(2), len(jax.devices()))
    """, xla_flags="--xla_force_host_platform_device_count=4")
    assert out == "False 4"


def test_none_leaves_jax_alone_and_nonsense_is_an_error():
    assert cpu_devices.request(None) is False
    with pytest.raises(ValueError, match="cpu_devices=0"):
        cpu_devices.request(0)


def test_every_config_has_the_key_and_the_main_job_sets_it():
    config, _, _ = train.parse_args(["--config", "experiments/vit/shapes.py", "--workdir", "w",
                                     "--config.cpu_devices=4"])
    assert config.cpu_devices == 4
    config, _, _ = train.parse_args(["--config", "experiments/clip/shapes.py", "--workdir", "w"])
    assert config.cpu_devices == 2
