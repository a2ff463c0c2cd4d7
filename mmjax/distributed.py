"""Joining a multi-process run (TPU pod slices, GPU clusters, several CPU processes).

Call `initialize` before anything touches a JAX device. With explicit flags it connects to the
given coordinator; without them it lets `jax.distributed.initialize()` detect the cluster
(Cloud TPU pod slices, SLURM, Open MPI, Kubernetes) and stays single-process when there is
none. On CPU, cross-process collectives use gloo (the default of jax 0.10; set explicitly).
"""

from __future__ import annotations

import jax

_NO_CLUSTER = "coordinator_address should be defined"  # jax's message when nothing is detected


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts jax.distributed if this run spans processes; returns whether it did."""
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ValueError("Multi-process flags go together: give --coordinator_address HOST:PORT, "
                             "--num_processes N and --process_id I (0..N-1) on every process, or none "
                             "of them to let JAX detect a TPU pod or cluster")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} must be in [0, --num_processes={num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
    except ValueError as e:
        if _NO_CLUSTER in str(e):
            return False  # no cluster around: a single-process run
        raise
    return True
