"""Fusion encoders on the embedded shapes data, their image encoder from the main job's CLIP run (as
ALBEF and BLIP start theirs from an ImageNet ViT): the chain of runs behind the README's table, and
what each learned, measured on held-out images.

    CLIP (the main job)  ->  image encoder  ->  ALBEF (ITC + momentum distillation, ITM, MLM)
                                            ->  BLIP (ITC, ITM, captioning LM)
                                            ->  ViLT (its one transformer; VQA on generated questions)

Each run is `mmjax.train.train` of its recipe into RUNS/<name> (skipped when that workdir already
holds its final step). Then, on the test split:
* each run's own final evaluations: retrieval by ITC and after ITM re-ranking, exact (the own
  caption) and consistent (any caption true of the image: mmjax.evaluate.attributes); BLIP's greedy
  captions (colour, shape, size and position named; BLEU-4, CIDEr); ViLT's answers by question type;
* ITM: the own caption scored above the caption of an image of another colour and shape (chance 0.5),
  and ITM's match / no-match answer on those two pairs;
* ALBEF's MLM: the masked colour, shape and size word of each held-out caption filled in.

    python -m benchmarks.shapes_fusion --runs runs/fusion [--out benchmarks/results/shapes_fusion.json]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from benchmarks.shapes_bridges import _images, held_out, other_class, run_chain, write_report
from mmjax import checkpoint, tasks
from mmjax.data import shapes_captions, shapes_render


def _recipes(runs: str) -> list[tuple[str, str]]:
    clip = os.path.join(runs, "clip")
    return [("clip", "experiments/clip/shapes.py"),
            ("albef", f"experiments/albef/shapes.py:clip={clip}"),
            ("blip", f"experiments/blip/shapes.py:clip={clip},steps=1500"),
            ("vilt", f"experiments/vilt/shapes_vqa.py:clip={clip}")]


def itm_scores(name: str, task, params, examples: list[dict]) -> dict[str, float]:
    """ITM on the own caption against another colour-and-shape's caption."""
    tokens = np.asarray(task.tokenizer([e["caption"] for e in examples]))
    image_tokens = task.image_tokens(params, _images(examples))
    own = np.asarray(task.match_tokens(params, image_tokens, tokens))
    wrong = np.asarray(task.match_tokens(params, image_tokens, tokens[other_class(examples)]))
    return {f"{name}/itm_own_above_other": float(np.mean(own > wrong)),
            f"{name}/itm_accuracy": float((np.mean(own > 0) + np.mean(wrong < 0)) / 2)}


def masked_word_accuracy(task, params, examples: list[dict]) -> dict[str, float]:
    """ALBEF's MLM head filling in each caption's first colour / shape / size word (one WordPiece id)."""
    images = _images(examples)
    tokens = np.asarray(task.tokenizer([e["caption"] for e in examples]), np.int32)
    out = {}
    for field, entries in shapes_captions.attribute_words().items():
        if field == "position":
            continue      # position phrases span several words
        words = [w for entry in entries for w in entry if " " not in w]
        ids = np.asarray(task.tokenizer(words), np.int32)[:, 1]           # [CLS] word [SEP]
        hit = np.isin(tokens, ids)
        rows = np.flatnonzero(hit.any(axis=1))
        cols = hit[rows].argmax(axis=1)
        masked = tokens[rows].copy()
        masked[np.arange(len(rows)), cols] = task.tokenizer.mask_token_id
        predicted = np.asarray(task.predict_masked(params, images[rows], masked))[np.arange(len(rows)), cols]
        # Right when the predicted word names the same value (a synonym counts: "big" for "large").
        value_of = {int(i): v for v, entry in enumerate(entries) for w, i in zip(words, ids) if w in entry}
        right = [value_of.get(int(p)) == value_of[int(t)] for p, t in zip(predicted, tokens[rows, cols])]
        out[f"albef/mlm_{field}_accuracy"] = float(np.mean(right))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="folder of the chain's workdirs")
    parser.add_argument("--out", default="benchmarks/results/shapes_fusion.json")
    args = parser.parse_args()
    seconds = {}     # training time of each run; a run finished earlier keeps what --out recorded then
    if os.path.exists(args.out):
        with open(args.out) as f:
            seconds = json.load(f).get("train_seconds", {})
    configs_by_run, results = run_chain(_recipes(args.runs), args.runs, seconds)
    examples = held_out()
    for name in ("albef", "blip"):
        task = tasks.get_task(configs_by_run[name])
        params = checkpoint.load_train_state(os.path.join(args.runs, name), params_only=True)["params"]
        results.update(itm_scores(name, task, params, examples))
        if name == "albef":
            results.update(masked_word_accuracy(task, params, examples))
    report = {"held_out": len(examples), "metrics": results, "train_seconds": seconds,
              "chance": {"itm": 0.5, "mlm_color": 1 / len(shapes_render.COLORS),
                         "mlm_shape": 1 / len(shapes_render.SHAPES), "mlm_size": 1 / len(shapes_render.SIZES)}}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
