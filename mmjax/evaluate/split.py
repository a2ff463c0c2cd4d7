"""Running a jitted function over an evaluation split on a mesh, and moving arrays between the
hosts and the mesh (every evaluator's plumbing; the warm start's gather too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax import sharding


def fetch(tree: Any) -> Any:
    """Device arrays -> host numpy, gathering the shards other processes hold on multi-host runs."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def put_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a batch that every process holds in full onto the mesh, split over the data axes."""
    target = sharding.batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

    return {k: put(v) for k, v in batch.items()}


def put_replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Places an array that every process holds in full onto every device of the mesh."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda index: x[index])


def is_text(x: Any) -> bool:
    """A numpy array of strings (or objects), which cannot live on the mesh."""
    return isinstance(x, np.ndarray) and x.dtype.kind in "USO"


def _to_host(out: Any) -> Any:
    """`fn`'s output on the host: device arrays fetched (gathered across processes), text as is."""
    leaves, treedef = jax.tree.flatten(out)
    arrays = iter(fetch([x for x in leaves if not is_text(x)]))
    return jax.tree.unflatten(treedef, [x if is_text(x) else next(arrays) for x in leaves])


def run_over_split(eval_cfg: ml_collections.ConfigDict, mesh: Mesh, fn: Callable[..., Any],
                   tokenizer=None, *, name: str) -> Iterator[tuple[dict[str, np.ndarray], Any]]:
    """Yields (batch with padding dropped, fn(device batch) with padding dropped) over a split.

    Text columns (reference captions, answers: numpy string arrays) stay on the host: `fn` sees
    the numeric columns, the yielded batch has them all. `fn` may return text as numpy string
    arrays (generated answers), which are kept as they are instead of being gathered.

    The eval batch size is rounded up to a multiple of the data-parallel size so that every
    batch shards evenly; padding rows carry mask=False and are removed here. A split that
    yields no examples raises, naming the evaluator `name` (e.g. "evals.top1"): a metric over
    nothing would read as a real 0.0 or fail somewhere obscure.
    """
    from mmjax.data import pipeline  # the data stack is only needed once evaluation runs

    dp = sharding.data_parallel_size(mesh)
    batch_size = -(-int(eval_cfg.get("batch_size", 256)) // dp) * dp
    examples = 0
    for batch in pipeline.eval_batches(eval_cfg.data, eval_cfg.pp, batch_size, tokenizer=tokenizer,
                                       max_examples=eval_cfg.get("max_examples")):
        mask = np.asarray(batch.pop("mask"), bool)
        examples += int(mask.sum())
        out = _to_host(fn(put_global({k: v for k, v in batch.items() if not is_text(v)}, mesh)))
        keep = lambda x, mask=mask: np.asarray(x)[mask]
        yield jax.tree.map(keep, batch), jax.tree.map(keep, out)
    if examples == 0:
        raise ValueError(
            f"{name}: the evaluation split has no examples (data={dict(eval_cfg.data)}, "
            f"max_examples={eval_cfg.get('max_examples')}). Point {name}.data at a split with "
            f"examples (its split, image_dir or shards), raise {name}.max_examples, or remove "
            f"{name} from config.evals.")
