"""`mmjax-train`'s entry point: it picks the host allocator before JAX is imported.

A process chooses its malloc when it starts, so this re-runs the trainer once under huge-page
malloc where that is available (see mmjax.allocator); `MMJAX_ALLOCATOR=default` opts out.
"""

from __future__ import annotations

import sys

from mmjax import allocator


def train() -> None:
    allocator.for_training("mmjax.train", sys.argv[1:])
    from mmjax import train as trainer  # noqa: PLC0415 - jax is imported only after the choice

    trainer.main()
