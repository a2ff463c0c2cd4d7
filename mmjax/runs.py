"""A training workdir as a model: `mmjax.load(WORKDIR)`, `mmjax-convert --input WORKDIR`.

When a run starts, the trainer writes WORKDIR/model_config.json in the model-directory format
of `mmjax.pretrained` (class, fields, inputs with batch 1), plus "params_key": the subtree of
the train state's params that holds the model (BEiT keeps its frozen tokenizer beside it), and
the inference keys of `mmjax.inference_spec`. Parameters are read alone from the newest good
checkpoint (or `step`): optimizer state is never restored. Runs from before model_config.json
existed are rebuilt from config.json through their task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections

from mmjax import checkpoint, inference_spec, paths, pretrained

TRAIN_CONFIG = "config.json"
# which= -> the train-state key that holds those parameters. "ema_params" is task-owned extra
# state (mmjax/tasks/base.py), e.g. the momentum encoder of the contrastive_momentum task.
WHICH = {"params": "params", "ema": "ema_params"}
# A momentum copy of some top-level parameter subtrees only (BLIP's momentum towers): which="ema" of
# such a run is the online parameters with those subtrees replaced by their momentum copies.
PARTIAL_EMA = "momentum_params"


def is_run(path: str) -> bool:
    """Whether `path` is a training workdir (config.json or checkpoints/) rather than a model directory."""
    if paths.isdir(paths.join(path, pretrained.CHECKPOINT_DIR)):
        return False
    return paths.isfile(paths.join(path, TRAIN_CONFIG)) or paths.isdir(paths.join(path, "checkpoints"))


def describe(config: ml_collections.ConfigDict, task: Any, batch: Mapping[str, Any]) -> dict:
    """The run's model_config.json: the task's model, its inputs for `batch`'s shapes, inference keys."""
    desc = task.model_description(batch)
    module = desc["module"]
    model_config = {"format": pretrained.FORMAT, "class": f"{type(module).__module__}.{type(module).__qualname__}",
                    "fields": pretrained.model_fields(module), "inputs": desc["inputs"],
                    "source": {"library": "mmjax", "task": config.task}, "params_key": desc["params_key"]}
    return {**model_config, **inference_keys(config, model_config)}


def write_model_config(workdir: str, config: ml_collections.ConfigDict, task: Any,
                       batch: Mapping[str, Any]) -> None:
    """Called by the trainer at the start of every run (process 0). A task that cannot describe
    its model gets a warning, not a failed run."""
    try:
        model_config = describe(config, task, batch)
    except NotImplementedError as e:
        logging.getLogger(__name__).warning("%s; mmjax.load(%r) will not work", e, workdir)
        return
    with paths.open(paths.join(workdir, pretrained.CONFIG_FILE), "w") as f:
        json.dump(model_config, f, indent=2)


def _of_kind(evals: Mapping, kind: str) -> list[Mapping]:
    """The evaluator blocks of `evals` of one kind (mmjax.evaluate.runner: the kind defaults to the name)."""
    from mmjax.evaluate import runner

    return [cfg for name, cfg in evals.items() if isinstance(cfg, Mapping) and runner.kind_of(name, cfg) == kind]


def _first_pp(evals: Mapping) -> str | None:
    """A zeroshot evaluator's pp, else a top1's, else the first evaluator's (nested blocks searched too)."""
    blocks = [*_of_kind(evals, "zeroshot"), *_of_kind(evals, "top1"), *evals.values()]
    for block in blocks:
        if isinstance(block, Mapping):
            pp = block.get("pp") if isinstance(block.get("pp"), str) else _first_pp(block)
            if pp:
                return pp
    return None


def inference_keys(config: ml_collections.ConfigDict, model_config: Mapping) -> dict:
    """preprocess: the evaluation pp on the image alone; tokenizer: the training one;
    class_names: from the training data (else the evaluation data) for classifiers and CLIPs."""
    from mmjax.data import sources  # the data stack, only when a run is described

    evals = config.get("evals") or {}
    evals = evals.to_dict() if hasattr(evals, "to_dict") else dict(evals)
    tokenizer = config.input.get("tokenizer")
    kind, names = inference_spec.kind(model_config), None
    if kind != "other":
        candidates = [config.input.data] + [b["data"] for b in _of_kind(evals, "top1") + _of_kind(evals, "zeroshot")]
        zeroshot = _of_kind(evals, "zeroshot")
        names = zeroshot[0].get("class_names") if kind == "contrastive" and zeroshot else None
        for data in candidates:
            names = names or sources.class_names(data)
        classes = model_config["fields"].get("num_classes")
        if names is not None and classes is not None and len(names) != classes:
            names = None            # the labels are not the head's outputs
    return {"preprocess": inference_spec.image_pp(_first_pp(evals)),
            "tokenizer": tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else tokenizer,
            "class_names": list(names) if names else None}


def read_model_config(workdir: str) -> dict:
    """WORKDIR/model_config.json, or the model rebuilt from config.json for older runs."""
    path = paths.join(workdir, pretrained.CONFIG_FILE)
    if paths.isfile(path):
        with paths.open(path) as f:
            model_config = json.load(f)
        if model_config.get("format") != pretrained.FORMAT:
            raise ValueError(f"{path}: unknown format {model_config.get('format')!r}, expected {pretrained.FORMAT!r}")
        return model_config
    return _rebuild(workdir)


def _rebuild(workdir: str) -> dict:
    path = paths.join(workdir, TRAIN_CONFIG)
    if not paths.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a run of mmjax-train: it has neither "
                                f"{pretrained.CONFIG_FILE} nor {TRAIN_CONFIG}")
    from mmjax import tasks
    from mmjax.data import pipeline
    try:
        with paths.open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
        task = tasks.get_task(config)
        loader = pipeline.make_train_loader(config.input.data, config.input.pp, 1, seed=0, tokenizer=task.tokenizer,
                                            process_index=0, process_count=1)
        return describe(config, task, next(iter(loader)))
    except Exception as e:   # noqa: BLE001 - any failure: say how to get model_config.json
        raise ValueError(
            f"{workdir} has no {pretrained.CONFIG_FILE} (runs before it was recorded), and rebuilding the "
            f"model from its {TRAIN_CONFIG} failed ({type(e).__name__}: {e}). Run mmjax-train once more with "
            f"the run's --config and --workdir {workdir}: it writes {pretrained.CONFIG_FILE} at start (a "
            "finished run only evaluates again)") from e


def resolve_step(workdir: str, step: int | None = None) -> int:
    """`step` if the run has it, else its newest good checkpoint step."""
    folder = paths.join(paths.absolute(workdir), "checkpoints")
    if not paths.isdir(folder) or not any(n.isdigit() for n in paths.listdir(folder)):
        raise FileNotFoundError(f"The run {workdir} has no checkpoints yet (nothing in {folder})")
    return int(paths.basename(checkpoint.resolve_step_dir(workdir, step)))


def _with_momentum_towers(workdir: str, step: int) -> dict:
    """The online parameters with each subtree the task keeps a momentum copy of replaced by it."""
    state = checkpoint.load_train_state(workdir, step, keys=("params", PARTIAL_EMA))
    params, towers = dict(state["params"]), state[PARTIAL_EMA]
    unknown = sorted(set(towers) - set(params))
    if unknown:
        raise ValueError(f"The run {workdir} step {step}: state/{PARTIAL_EMA} holds {unknown}, which are not "
                         f"parameter subtrees ({sorted(params)})")
    return {**params, **towers}


def read_params(workdir: str, step: int | None = None, which: str = "params") -> tuple[dict, dict, int]:
    """(model_config, the model's params as nested host arrays, step) of a run: only the
    state's `which` parameters are read, and of those only the model's subtree."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: use one of {sorted(WHICH)}")
    model_config = read_model_config(workdir)
    step = resolve_step(workdir, step)
    key = WHICH[which]
    try:
        params = checkpoint.load_train_state(workdir, step, keys=(key,))[key]
    except checkpoint.MissingStateError as e:
        if which == "ema" and PARTIAL_EMA in e.available:
            params = _with_momentum_towers(workdir, step)
        else:
            raise ValueError(f"The run {workdir} keeps no {which} parameters: its checkpoint at step {step} "
                             f"has no state/{key} (it holds {e.available})") from e
    subtree = model_config.get("params_key")
    if subtree:
        if subtree not in params:
            raise ValueError(f"The run {workdir} step {step}: state/{WHICH[which]} has no {subtree!r} "
                             f"(it holds {sorted(params)})")
        params = params[subtree]
    return model_config, params, step
