"""What training does when a step's loss or gradients are not finite.

`config.nonfinite` chooses (this is the one place it is documented):

* `"stop"` (default): raise `FloatingPointError` naming the first bad step. No checkpoint is
  written after it, so the newest checkpoint is the last good state.
* `"skip"`: drop that step's update (parameters and optimizer state stay as they were, like
  `optax.apply_if_finite`), count it, and go on. The count is logged as `nonfinite_steps`.

In both modes the jitted step never applies a non-finite update, and the host reads the
counters only when it logs or is about to save, so guarding costs no extra device sync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

MODES = ("stop", "skip")
DEFAULT_MODE = "stop"

log = logging.getLogger(__name__)


def init_counters() -> dict[str, jax.Array]:
    """Train-state entry: how many steps were non-finite, and the first of them (0: none)."""
    return {"count": jnp.zeros((), jnp.int32), "first_step": jnp.zeros((), jnp.int32)}


def apply_if_finite(loss: jax.Array, grad_norm: jax.Array, update: Callable[..., Any], *args: Any) -> Any:
    """`update(*args)` when the loss and gradient norm are finite, else `args[1:]` unchanged.

    Runs inside the jitted step, typically as `update(grads, params, opt_state)` returning
    `(params, opt_state)`. A `lax.cond` rather than an elementwise select over old and new
    state: the select kept both copies alive and raised the compiled peak (ViT-L/16 dp, bf16,
    batch 64 on 8 devices: 6.99 GiB with the select, 6.14 GiB with the cond = no guard at all).
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return jax.lax.cond(finite, lambda a: update(*a), lambda a: tuple(a[1:]), args)


def count_nonfinite(counters: dict[str, jax.Array], loss: jax.Array, grad_norm: jax.Array,
                    step: jax.Array) -> dict[str, jax.Array]:
    """Counters after `step` (1-based): one more if it was non-finite, its number if it was the first."""
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    first_bad = (counters["first_step"] == 0) & bad
    return {"count": counters["count"] + bad.astype(jnp.int32),
            "first_step": jnp.where(first_bad, step, counters["first_step"])}


class NonFiniteGuard:
    """Host side: turns the device counters into an error ("stop") or a warning ("skip")."""

    def __init__(self, mode: str | None):
        mode = mode or DEFAULT_MODE
        if mode not in MODES:
            raise ValueError(f"config.nonfinite={mode!r} is not one of {MODES}; set it to one of them")
        self.mode = mode
        self._seen = 0

    def start(self, counters: dict[str, jax.Array]) -> None:
        """Takes the counters of the starting (maybe restored) state: earlier skips are old news."""
        self._seen = int(jax.device_get(counters["count"]))

    def check(self, counters: dict[str, jax.Array], step: int,
              before_raise: Callable[[], Any] | None = None) -> int:
        """Returns the number of non-finite steps so far; raises in "stop" mode if any.

        `before_raise` runs first (the trainer lets the pending good checkpoint finish).
        """
        count, first = (int(x) for x in jax.device_get((counters["count"], counters["first_step"])))
        if count > self._seen:
            if self.mode == "stop":
                if before_raise is not None:
                    before_raise()
                more = f" ({count - 1} more up to step {step})" if count > 1 else ""
                raise FloatingPointError(
                    f"Non-finite loss or gradients at step {first}{more}. The update was not "
                    "applied and no checkpoint was written after it, so the newest checkpoint is "
                    "the last good state. Lower schedule.lr, set optimizer.grad_clip_norm, or set "
                    "config.nonfinite='skip' to skip such steps.")
            log.warning("Skipped %d step(s) with non-finite loss or gradients by step %d "
                        "(first at step %d); their updates were not applied.", count, step, first)
            self._seen = count
        return count
