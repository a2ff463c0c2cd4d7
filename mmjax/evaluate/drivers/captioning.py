"""Captioning: generate a caption per image, score BLEU-4 and CIDEr against the references
(COCO's scorers, mmjax.evaluate.captioning_metrics), and optionally whether each caption names
the image's attributes (the shapes data set's colour / shape / size / position words).

Attribute accuracy (`attribute_words={"color": [...], "shape": [...]}`, each list indexed by the
example's int field of that name; an entry may be one phrase or a list of synonyms): a caption
is right when it contains a phrase of the right entry and, once those are removed, none of any
other entry. So a caption "top left" for the position "left" is wrong, and one naming two
colours is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.evaluate import captioning_metrics, split
from mmjax.evaluate.attributes import names_attribute
from mmjax.evaluate.drivers import SPLIT_OPTIONS, column

NEEDS = ("caption",)
OPTIONS = SPLIT_OPTIONS + ("generation", "references_key", "attribute_words")
REQUIRED = ("data", "pp")


def generation_settings(cfg: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """evals.NAME.generation as a plain dict, its keys checked against GenerationConfig's fields;
    {} when unset: the task's own defaults apply (BLIP's: beam 3, max length 20, min length 5)."""
    from mmjax.generate import GenerationConfig

    settings = cfg.get("generation") or {}
    settings = settings.to_dict() if isinstance(settings, ml_collections.ConfigDict) else dict(settings)
    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(f"evals.{name}.generation: unknown key(s) {unknown}; GenerationConfig's fields: "
                         f"{sorted(fields)}")
    return settings


def references_of(value: Any, index: int, name: str, key: str) -> list[str]:
    """One example's reference captions: a string, or an array of strings ("" entries are padding)."""
    refs = [str(value)] if np.ndim(value) == 0 else [str(r) for r in np.asarray(value).ravel() if str(r).strip()]
    if not refs or not refs[0].strip():
        raise ValueError(f"evals.{name}: example {index} has no reference caption in {key!r}")
    return refs


def attribute_accuracy(captions: Sequence[str], labels: np.ndarray, entries: Sequence[str | Sequence[str]],
                       name: str, field: str) -> float:
    labels = np.asarray(labels).astype(int)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(entries):
        raise ValueError(f"evals.{name}.attribute_words.{field} has {len(entries)} entries, but the field "
                         f"{field!r} holds values in [{labels.min()}, {labels.max()}]")
    return float(np.mean([names_attribute(c, int(y), entries) for c, y in zip(captions, labels)]))


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    if getattr(task, "tokenizer", None) is None or not callable(getattr(task.tokenizer, "decode", None)):
        raise ValueError(f"evals.{name}: the task's tokenizer cannot decode token ids into captions")
    settings = generation_settings(cfg, name)
    key = cfg.get("references_key", "caption")
    attributes: Mapping[str, Any] = dict(cfg.get("attribute_words") or {})
    captions: list[str] = []
    references: list[list[str]] = []
    labels: dict[str, list[np.ndarray]] = {field: [] for field in attributes}
    for batch, ids in split.run_over_split(cfg, mesh, lambda b: task.caption(params, b["image"], settings),
                                           tokenizer=task.tokenizer, name=f"evals.{name}"):
        decoded = task.tokenizer.decode(np.asarray(ids))
        captions += [decoded] if isinstance(decoded, str) else list(decoded)
        refs = column(batch, key, name)
        references += [references_of(r, len(references), name, key) for r in refs]
        for field in attributes:
            labels[field].append(np.asarray(column(batch, field, name)))
    scores = captioning_metrics.caption_metrics(dict(enumerate(captions)), dict(enumerate(references)))
    out = {f"{name}/bleu4": scores["bleu_4"], f"{name}/cider": scores["cider"]}
    for field, entries in attributes.items():
        out[f"{name}/{field}_accuracy"] = attribute_accuracy(captions, np.concatenate(labels[field]), entries, name,
                                                             field)
    return out
