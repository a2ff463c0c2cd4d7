"""Splitting a CPU host into several XLA devices, so that data parallelism keeps its cores busy.

XLA's CPU backend runs a small model's training step as many small operations on one shared
thread pool, and cores sit idle between them: the main job used about 1.5 of 2 cores. With the
host split into N devices (JAX's `jax_num_cpu_devices`), the mesh's data axis gives each device
its share of the batch and the shares run at once, as on N accelerators: on the main job (2 cores)
~870 examples/s against ~650 with one device. Only the CPU platform is split, so on a machine with
accelerators their devices, and the mesh, are unchanged.

`mmjax-train` applies the config's `cpu_devices` before JAX starts its backends. A count the user
already chose wins: `jax_num_cpu_devices`, or `--xla_force_host_platform_device_count` in
$XLA_FLAGS (as the tests set 8 simulated devices).
"""

from __future__ import annotations

import os
import warnings

import jax
from jax._src import xla_bridge

XLA_FLAG = "--xla_force_host_platform_device_count"


def request(count: int | None) -> bool:
    """Asks for `count` CPU devices; True when this call set the count."""
    if count is None:
        return False
    count = int(count)
    if count < 1:
        raise ValueError(f"cpu_devices={count}: must be a positive number of devices")
    if XLA_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices != -1:
        return False
    if xla_bridge.backends_are_initialized():
        warnings.warn(f"cpu_devices={count} ignored: JAX's backends already started in this process "
                      f"(set jax_num_cpu_devices or XLA_FLAGS={XLA_FLAG}={count} before they do)", stacklevel=2)
        return False
    jax.config.update("jax_num_cpu_devices", count)
    return True
