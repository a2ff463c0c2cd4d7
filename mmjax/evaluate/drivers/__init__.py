"""Evaluation drivers, one module per kind of evaluator.

Each module states the task's predict functions it calls (`NEEDS`), the config keys it reads
(`OPTIONS`, of which `REQUIRED` must be set) and `run(task, params, mesh, cfg, name) ->
{metric: float}`. The math they call (mmjax.evaluate.zeroshot, retrieval, linear_probe,
classification) stays pure; `mmjax.evaluate.runner` picks the drivers from `config.evals`.
"""

SPLIT_OPTIONS = ("data", "pp", "batch_size", "max_examples")


def column(batch: dict, key: str, name: str):
    """batch[key], or an error naming the evaluator and the pp that must keep the column."""
    if key not in batch:
        raise ValueError(f"evals.{name}: no {key!r} in the evaluation batch (keys {sorted(batch)}); "
                         f"keep it in evals.{name}.pp")
    return batch[key]
