"""Frozen towers, trained bridges, on the embedded shapes data: the chain of runs behind the README's
table, and what each run learned, measured on held-out images (mmjax/shapes_bridges.py sets the scene).

    CLIP (the main job)  ->  frozen image encoder ─┐
    LM on shapes text    ->  frozen language model ─┼─> BLIP-2 stage 1 -> stage 2 -> MiniGPT-4
                                                    └─> Perceiver resampler bridge

Each run is `mmjax.train.train` of its recipe into RUNS/<name> (skipped when that workdir already
holds its final step). Then, on the test split:
* LM: answers to "<caption> question: <q> answer:" (reading the caption) and to "question: <q>
  answer:" alone (a blind LM: the chance-level baseline every bridge must beat);
* BLIP-2 stage 1: ITM (own caption scored above one of another colour and shape; chance 0.5) and ITC
  retrieval R@1 over the held-out images (chance 1/N);
* every run but the LM's: its recipe's own final evaluations (CLIP: zero-shot and retrieval; stage 1:
  retrieval by ITC and after ITM re-ranking; stage 2, MiniGPT-4, the resampler: colour, shape and
  position named in greedy captions, zero-shot answers to prompted questions by type).

    python -m benchmarks.shapes_bridges --runs runs/bridges [--out benchmarks/results/shapes_bridges.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from mmjax import checkpoint, configs, tasks, train
from mmjax.data import shapes, shapes_vqa
from mmjax.evaluate import vqa_score

HELD_OUT = 500


def _recipes(runs: str) -> list[tuple[str, str]]:
    d = lambda name: os.path.join(runs, name)    # noqa: E731
    return [
        ("clip", "experiments/clip/shapes.py"),
        ("lm", "experiments/lm/shapes.py"),
        ("blip2_stage1", f"experiments/blip2/shapes_stage1.py:clip={d('clip')}"),
        ("blip2_stage2", f"experiments/blip2/shapes_stage2.py:stage1={d('blip2_stage1')},lm={d('lm')}"),
        ("minigpt4", f"experiments/minigpt4/shapes.py:stage2={d('blip2_stage2')}"),
        ("perceiver", f"experiments/perceiver/shapes.py:clip={d('clip')},lm={d('lm')}"),
    ]


def _finished(workdir: str, steps: int) -> bool:
    try:
        return int(os.path.basename(checkpoint.resolve_step_dir(workdir, None))) >= steps
    except (FileNotFoundError, ValueError):
        return False


def _final_evals(workdir: str) -> dict[str, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if any("/" in k for k in r)]
    return {k: v for k, v in evals[-1].items() if "/" in k} if evals else {}


def held_out(n: int = HELD_OUT) -> list[dict]:
    return [shapes.generate_example(i, shapes.SPLIT_SEEDS["test"], 32) for i in range(n)]


def _images(examples: list[dict]) -> np.ndarray:
    return np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0


def lm_answers(config, params, examples: list[dict]) -> dict[str, float]:
    """Exact-answer accuracy of the LM with the caption before the question, and without it."""
    task = tasks.get_task(config)
    rng = np.random.default_rng(0)
    questions = [shapes_vqa.ask(e, rng) for e in examples]
    out = {}
    for name, fmt in (("with_caption", "{caption} question: {q} answer:"), ("blind", "question: {q} answer:")):
        prompts = [fmt.format(caption=e["caption"], q=q) for e, (q, _, _) in zip(examples, questions)]
        tokens = np.asarray(task.tokenizer(prompts))
        tokens = np.where(tokens == task.tokenizer.eot_token_id, task.tokenizer.pad_token_id, tokens)
        ids = np.asarray(task.complete(params, tokens, max_new_tokens=4))
        answers = task.tokenizer.decode(ids)
        scores = np.array([vqa_score.vqa_accuracy(p, [a] * 10) for p, (_, a, _) in zip(answers, questions)])
        types = np.array([t for _, _, t in questions])
        out[f"lm/{name}_accuracy"] = float(scores.mean())
        for i, qtype in enumerate(shapes_vqa.QUESTION_TYPES):
            out[f"lm/{name}_accuracy_{qtype}"] = float(scores[types == i].mean())
    return out


def stage1_scores(config, params, examples: list[dict]) -> dict[str, float]:
    """ITM own-vs-other-class accuracy and ITC retrieval R@1 (best query) over the held-out images."""
    from mmjax.models import blip2

    task = tasks.get_task(config)
    model = task.model
    captions = [e["caption"] for e in examples]
    tokens = np.asarray(task.tokenizer(captions))
    mask = tokens != task.tokenizer.pad_token_id
    image_tokens = task.image_tokens(params, _images(examples))
    n = len(examples)
    own = np.asarray(task.match_tokens(params, image_tokens, tokens))
    wrong = np.asarray(task.match_tokens(params, image_tokens, tokens[other_class(examples)]))
    image_embeds = model.apply({"params": params}, image_tokens, method="embed_image")
    text_embeds = model.apply({"params": params}, tokens, mask, method="embed_text")
    sims = np.asarray(blip2.itc_scores(image_embeds, text_embeds))
    return {"stage1/itm_own_vs_other_accuracy": float(np.mean(own > wrong)),
            "stage1/itc_i2t_r1": float(np.mean(sims.argmax(axis=1) == np.arange(n))),
            "stage1/itc_t2i_r1": float(np.mean(sims.argmax(axis=0) == np.arange(n)))}


def other_class(examples: list[dict]) -> np.ndarray:
    """For each example, the next one of another colour and another shape (ITM's wrong caption)."""
    n = len(examples)
    return np.array([next(j for k in range(1, n) for j in [(i + k) % n]
                          if examples[j]["color"] != examples[i]["color"]
                          and examples[j]["shape"] != examples[i]["shape"]) for i in range(n)])


def run_chain(recipes: list[tuple[str, str]], runs: str, seconds: dict[str, float]) -> tuple[dict, dict]:
    """Trains each (name, spec) into RUNS/<name> unless that workdir holds its final step, recording
    the training time in `seconds`; returns {name: config} and every run's final evaluations."""
    configs_by_run, results = {}, {}
    for name, spec in recipes:
        config = configs_by_run[name] = configs.load_config(spec)
        workdir = os.path.join(runs, name)
        if not _finished(workdir, int(config.total_steps)):
            start = time.perf_counter()
            train.train(config, workdir)
            seconds[name] = round(time.perf_counter() - start, 1)
        results.update({f"{name}/{k}": v for k, v in _final_evals(workdir).items()})
    return configs_by_run, results


def write_report(path: str, report: dict) -> None:
    """Writes the report as JSON and prints its metrics."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    for key, value in sorted(report["metrics"].items()):
        print(f"{key:50s} {value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="folder of the chain's workdirs")
    parser.add_argument("--out", default="benchmarks/results/shapes_bridges.json")
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    configs_by_run, results = run_chain(_recipes(args.runs), args.runs, seconds)
    results = {k: v for k, v in results.items() if not k.startswith("lm/")}   # the LM is measured below
    examples = held_out()
    params = lambda name: checkpoint.load_train_state(os.path.join(args.runs, name), params_only=True)["params"]  # noqa: E731
    results.update(lm_answers(configs_by_run["lm"], params("lm"), examples))
    results.update(stage1_scores(configs_by_run["blip2_stage1"], params("blip2_stage1"), examples))
    write_report(args.out, {"held_out": HELD_OUT, "metrics": results, "train_seconds": seconds})


if __name__ == "__main__":
    main()
