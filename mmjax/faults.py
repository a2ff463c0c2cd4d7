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


def guard_update(old_state: dict, new_state: dict, loss: jax.Array, grad_norm: jax.Array) -> dict:
    """`new_state`, except that a non-finite loss or gradient keeps the old params/opt_state.

    Runs inside the jitted step; `new_state["step"]` is the (1-based) number of this step.
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    counters = old_state["nonfinite"]
    first_bad = (counters["first_step"] == 0) & ~finite
    return dict(new_state, params=keep(new_state["params"], old_state["params"]),
                opt_state=keep(new_state["opt_state"], old_state["opt_state"]),
                nonfinite={"count": counters["count"] + (~finite).astype(jnp.int32),
                           "first_step": jnp.where(first_bad, new_state["step"], counters["first_step"])})


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
