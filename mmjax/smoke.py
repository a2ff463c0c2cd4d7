"""CI-sized versions of the paper recipes: a few steps of a tiny model on the embedded shapes data.

Every recipe has a `smoke=True` mode that CI runs; these helpers hold what those modes share, so
a recipe's smoke block only states what is particular to it (its model knobs and pp strings).
"""

from __future__ import annotations

import ml_collections

from mmjax.data.shapes import ZERO_SHOT_TEMPLATES

TINY_TOWER = {"width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256}
SHAPES_TRAIN = {"name": "mmjax_shapes", "split": "train"}
SHAPES_TEST = {"name": "mmjax_shapes", "split": "test"}


def short_run(c: ml_collections.ConfigDict, steps: int = 3, log_every: int = 1) -> None:
    """`steps` steps, logged every `log_every`, checkpointed every 2, evaluated only at the end."""
    c.total_steps = steps
    if "num_epochs" in c:
        c.num_epochs = None
    c.schedule.warmup_steps = 1
    c.log_every_steps = log_every
    c.checkpoint.every_steps = 2
    c.evals.every_steps = 0


def shapes_input(c: ml_collections.ConfigDict, pp: str, batch_size: int = 16) -> None:
    """Trains on the embedded shapes data in the main process."""
    c.input.update(data=dict(SHAPES_TRAIN), batch_size=batch_size, worker_count=0, pp=pp)


def shapes_eval(block: ml_collections.ConfigDict, pp: str, examples: int = 32) -> None:
    """Evaluates on the first `examples` of the shapes test split."""
    block.update(data=dict(SHAPES_TEST), pp=pp, batch_size=examples, max_examples=examples)


def tiny_clip(c: ml_collections.ConfigDict, norm: str) -> None:
    """A CLIP recipe as a tiny CLIP (8-px patches, word tokenizer) with zero-shot evaluation,
    images normalised with the `norm` preset of the recipe."""
    short_run(c)
    c.model.embed_dim = 32
    c.model.image.update(patch_size=8, **TINY_TOWER)
    c.model.text.update(vocab_size=256, context_length=16, **TINY_TOWER)
    c.model.dtype = "float32"
    shapes_input(c, f"resize(32)|flip_lr|normalize('{norm}')|tokenize(key='caption',out='text')"
                    "|keep('image','text')")
    c.input.tokenizer = {"name": "shapes", "context_length": 16}
    shapes_eval(c.evals.zeroshot, f"resize(32)|normalize('{norm}')|keep('image','label')")
    c.evals.zeroshot.templates = list(ZERO_SHOT_TEMPLATES)   # the shapes tokenizer's vocabulary
    c.evals.zeroshot.class_names = None
