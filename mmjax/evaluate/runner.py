"""Which evaluators run, read from `config.evals`, and the loop that runs them on a task.

    config.evals = dict(
        every_steps=N,                  # the trainer's schedule; 0 = only after the last step
        NAME=dict(kind=KIND,            # optional: defaults to NAME (see DEFAULT_KINDS)
                  data=..., pp=..., batch_size=256, max_examples=None,   # the split
                  **options),           # the kind's own keys, e.g. zeroshot's templates
        ...)

KIND is one of `KINDS`: zeroshot, retrieval, top1, linear_probe (train / test splits instead of
data / pp), reconstruction, or for fusion and generative models itm_retrieval (ITC top-k re-ranked
by ITM), captioning (BLEU-4, CIDEr; its `generation` dict of GenerationConfig fields reaches the
task's `caption` as a plain dict) and vqa (VQA v2 accuracy). Metrics are named after
the evaluator: NAME/top1, NAME/i2t_r1, NAME/label_top1, NAME/loss ...; the evaluator named "top1"
writes plain "top1".

A driver calls the task's predict functions (`PREDICT_FUNCTIONS`); an evaluator whose task
does not provide them, an unknown kind or an unknown key is an error when the task is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_collections
from jax.sharding import Mesh

from mmjax.evaluate.drivers import (
    captioning,
    itm_retrieval,
    linear_probe,
    reconstruction,
    retrieval,
    top1,
    vqa,
    zeroshot,
)

KINDS = {"zeroshot": zeroshot, "retrieval": retrieval, "top1": top1, "linear_probe": linear_probe,
         "reconstruction": reconstruction, "itm_retrieval": itm_retrieval, "captioning": captioning, "vqa": vqa}
# The names today's recipes give evaluators whose kind is not the name itself.
DEFAULT_KINDS = {"probe": "linear_probe", "recon": "reconstruction", "mim": "reconstruction"}
SCHEDULE_KEYS = ("every_steps",)

# What a task may provide for evaluators to call; params are the train state's "params".
PREDICT_FUNCTIONS = {
    "classify": "classify(params, images) -> (B, classes) logits",
    "embed_images": "embed_images(params, images) -> (B, D) image embeddings (unnormalised)",
    "embed_texts": "embed_texts(params, tokens) -> (B, D) text embeddings (unnormalised)",
    "score_pairs": "score_pairs(params, images, tokens) -> (B,) match logits of aligned pairs",
    "image_features": "image_features(params, images, feature) -> (B, D) frozen features to probe",
    "reconstruct": "reconstruct(params, images, rng) -> {metric: (B,) per-example sums, 'count': (B,)}",
    # Fusion encoders and generative models (ALBEF, BLIP, ViLT, and the LLM bridges after them):
    "image_tokens": "image_tokens(params, images) -> (B, ...) per-image inputs of match_tokens, computed once per "
                    "image (a fusion encoder's image states; ViLT: the images themselves)",
    "match_tokens": "match_tokens(params, image_tokens, tokens) -> (B,) ITM 'match' logits (class 1) of the "
                    "aligned pairs (image_tokens i, text i)",
    "caption": "caption(params, images, settings) -> (B, L) int32 generated token ids (no bos/prompt; pad id "
               "after the stop token), read with task.tokenizer.decode; settings: mmjax.generate."
               "GenerationConfig fields",
    "answer": "answer(params, images, tokens) -> list of B answer strings to the tokenized questions",
}


@dataclass(frozen=True)
class Evaluator:
    name: str
    kind: str
    config: ml_collections.ConfigDict


def provided(task: Any) -> list[str]:
    """The predict functions `task` implements."""
    return [fn for fn in PREDICT_FUNCTIONS if callable(getattr(task, fn, None))]


def kind_of(name: str, cfg: Any) -> str:
    """The kind of evaluator evals.NAME = cfg: its `kind`, else DEFAULT_KINDS' or NAME itself."""
    return cfg.get("kind") or DEFAULT_KINDS.get(name, name)


def evaluators(evals: Any) -> list[Evaluator]:
    """The evaluators of a `config.evals` block, each checked for a known kind and known keys."""
    out = []
    for name, cfg in (evals or {}).items():
        if name in SCHEDULE_KEYS:
            continue
        if isinstance(cfg, dict):
            cfg = ml_collections.ConfigDict(cfg)
        if not isinstance(cfg, ml_collections.ConfigDict):
            raise ValueError(f"evals.{name} must be a dict of evaluator settings (or one of "
                             f"{list(SCHEDULE_KEYS)}), got {cfg!r}")
        kind = kind_of(name, cfg)
        if kind not in KINDS:
            raise ValueError(f"evals.{name}: unknown evaluator kind {kind!r}; set evals.{name}.kind to one "
                             f"of {sorted(KINDS)}")
        driver = KINDS[kind]
        unknown = sorted(set(cfg.keys()) - set(driver.OPTIONS) - {"kind"})
        missing = [k for k in driver.REQUIRED if cfg.get(k) is None]
        if unknown or missing:
            raise ValueError(f"evals.{name} (kind {kind!r})" + (f": unknown key(s) {unknown}" if unknown else "")
                             + (f": missing {missing}" if missing else "") + f"; its keys: {list(driver.OPTIONS)}")
        out.append(Evaluator(name, kind, cfg))
    return out


def check(task: Any, evals: Any = None) -> list[Evaluator]:
    """The evaluators of `evals` (default: the task's config.evals) that `task` can serve; raises
    for one it cannot, naming the evaluator, its kind, the task and what is missing."""
    found = evaluators(task.config.get("evals") if evals is None else evals)
    has = provided(task)
    for ev in found:
        missing = [fn for fn in KINDS[ev.kind].NEEDS if fn not in has]
        if missing:
            raise ValueError(f"evals.{ev.name} (kind {ev.kind!r}) needs the task to provide {missing}, "
                             f"which the {type(task).__name__} (task {task.config.get('task')!r}) does not; "
                             f"it provides {has or 'no predict functions'}. Remove evals.{ev.name} or "
                             "choose another kind.")
    return found


def evaluate(task: Any, params: Any, mesh: Mesh) -> dict[str, float]:
    """Every evaluator of the task's config.evals, in order, on `params`: {metric: value}."""
    metrics: dict[str, float] = {}
    for ev in check(task):
        metrics.update(KINDS[ev.kind].run(task, params, mesh, ev.config, ev.name))
    return metrics
