"""What the trainer knows about a task, and helpers tasks share.

A task builds its model from the config, turns a batch into (loss, metrics), and evaluates
parameters. The trainer never looks inside the model.

Task-owned train state (momentum encoders, feature queues, running statistics): a task that
needs state besides its parameters returns it from `init_extra_state` and updates it in
`train_loss`. The trainer keeps each entry of that dict beside "params" in the train state
(`state["ema_params"]`, ...): created with the parameters' logical-axis shardings, updated
inside the jitted, donated step (not when `config.nonfinite="skip"` drops the step), saved and
restored exactly with the rest. An entry named "ema_params" that mirrors the parameters is what
`mmjax.load(WORKDIR, which="ema")` reads. Tasks without extra state implement `loss` only, and
their train state and checkpoints keep the layout {"step", "params", "opt_state", "nonfinite"}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh


class Task:
    """Base class: subclasses set `self.model` and implement the three methods below."""

    tokenizer: Callable[[list[str]], np.ndarray] | None = None

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def init_variables(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Any:
        """Boxed (logically partitioned) variables for a batch of the given shapes."""
        raise NotImplementedError

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """(scalar loss, scalar metrics) of a batch; the trainer differentiates it w.r.t. params."""
        raise NotImplementedError

    def init_extra_state(self, params: Any, rng: jax.Array) -> dict[str, Any] | None:
        """Train state the task owns besides its parameters, or None (the default) for none.

        `params` are the initial (possibly warm-started) parameters, each leaf still in its
        logical-partitioning box, so a copy (`jax.tree.map(jnp.copy, ...)`) shards like them. Return
        a dict of named entries whose leaves are arrays or boxed arrays (`nn.LogicallyPartitioned`;
        unboxed leaves are replicated). Names must not be the trainer's own ("step", "params",
        "opt_state", "nonfinite").
        """
        del params, rng
        return None

    def train_loss(self, params: Any, extra: dict[str, Any], batch: dict[str, jax.Array],
                   rng: jax.Array) -> tuple[jax.Array, tuple[dict, dict[str, Any]]]:
        """What the train step differentiates w.r.t. `params` alone: (loss, (metrics, new extra)).

        `extra` is the state of `init_extra_state` as the previous step left it ({} without any);
        the new extra state must have its structure and is a constant to the gradient (stop
        gradients through parameters it is computed from). The default is `loss` with no state.
        """
        loss, metrics = self.loss(params, batch, rng)
        return loss, (metrics, extra)

    def evaluate(self, params: Any, mesh: Mesh) -> dict[str, float]:
        """Runs the evaluators of `config.evals` on `params` (mmjax.evaluate.runner): they call the
        predict functions a task defines (classify, embed_images, embed_texts, score_pairs,
        image_features, reconstruct; see runner.PREDICT_FUNCTIONS)."""
        from mmjax.evaluate import runner

        return runner.evaluate(self, params, mesh)

    def model_description(self, batch: dict[str, Any]) -> dict:
        """How `mmjax.load(WORKDIR)` rebuilds the trained model: {"module": the flax module,
        "inputs": its init's example inputs (batch 1; `input_spec`), "params_key": the subtree of
        the train state's params that holds it, or None for all}. `batch`: arrays or shape structs."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its model, so its runs cannot be loaded")

    def train_flops_per_example(self, batch_shapes: dict[str, tuple[int, ...]]) -> float | None:
        """Analytic model FLOPs of one training example (forward + backward; see mmjax.flops).

        `batch_shapes` holds the global batch's array shapes. None when the task cannot count,
        in which case the trainer logs no TFLOP/s or MFU; every mmjax task counts (from its
        family's `forward_flops`), and tests/test_flops.py checks each against XLA's count.
        """
        return None


def input_spec(x: Any, dtype: Any = None) -> dict:
    """The spec of one example of batch array `x` (mmjax.pretrained's format: batch dim 1)."""
    return {"shape": [1, *(int(d) for d in x.shape[1:])], "dtype": str(np.dtype(dtype or x.dtype))}
