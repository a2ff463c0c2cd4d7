"""CLIP on the embedded shapes data set: mmjax's main job, on the CPU in minutes.

An image tower and a 2-layer text tower learn to match 32×32 images of coloured shapes with their
captions. Zero-shot classification over the 24 colour×shape classes and image↔text retrieval are
measured on the held-out test split. The image tower is one wide transformer layer (width 256,
MLP 256) over a 4×4 grid of tokens from a convolutional stem (Xiao et al. 2021) with three 3×3
convolutions per stage, the first strided (`conv_stem_depth=3`): of the towers measured (README,
"How the main job got faster"), the one that learns shape in the fewest FLOPs. A CPU-only host
runs as 2 data-parallel devices (`cpu_devices`).

The conv stem has no counterpart in open_clip, timm or transformers, so `mmjax-convert --to`
refuses this model (mmjax.load and model directories work); `:stem=False` trains a plain ViT/8
(width 128, depth 4, linear patch embedding, 1800 steps) that exports to open_clip and
transformers and learns shape more slowly (zero-shot 0.78 after 1800 steps).

Expected: zero-shot top-1 ≈ 0.97 (chance 1/24 ≈ 0.04), i2t / t2i R@1 ≈ 0.30 / 0.25, in under
5 minutes on 2 CPU cores; see the README for measured numbers.
  mmjax-train --config experiments/clip/shapes.py --workdir runs/clip
  mmjax-train --config experiments/clip/shapes.py:loss=siglip --workdir runs/siglip
  mmjax-train --config experiments/clip/shapes.py:stem=False --workdir runs/clip_plain
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.data.shapes import ZERO_SHOT_TEMPLATES

# The main job: one wide transformer layer over a 4x4 grid of tokens from a conv stem of three 3x3
# convolutions per stage (the first strided), the tower that learned shape in the fewest FLOPs of
# those measured (README, "How the main job got faster"); linear decay and weight decay 0.2 gave
# +0.007 zero-shot over cosine and 0.05 at equal steps; evaluated at the end only (~3 s each).
RECIPE = dict(image=dict(width=256, depth=1, num_heads=8, mlp_dim=256, patch_size=8, ln_eps=1e-5,
                         conv_stem=(32, 64), conv_stem_depth=3),
              steps=1300, weight_decay=0.2, decay="linear", eval_every=0)
# `stem=False`: a plain ViT/8 (linear patch embedding) that open_clip and transformers can hold, with
# the recipe its README numbers were measured with.
PLAIN_RECIPE = dict(image=dict(width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=8, ln_eps=1e-5,
                               conv_stem=(), conv_stem_depth=1),
                    steps=1800, weight_decay=0.05, decay="cosine", eval_every=500)


def get_config(arg=None):
    arg = configs.parse_arg(arg, loss="clip", steps=None, batch=128, stem=True, smoke=False)
    recipe = RECIPE if arg.stem else PLAIN_RECIPE
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = arg.steps or recipe["steps"]
    c.model = dict(
        embed_dim=128,
        image=dict(recipe["image"]),
        text=dict(vocab_size=256, context_length=16, width=128, depth=2, num_heads=4, mlp_dim=512),
        logit_bias_init=-10.0 if arg.loss == "siglip" else None,
        logit_scale_init=2.302585 if arg.loss == "siglip" else 2.659260,  # ln 10 (SigLIP), ln(1/0.07)
    )
    c.loss = dict(name=arg.loss)
    pp_train = "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')"
    c.input = dict(
        data=dict(name="mmjax_shapes", split="train"),
        batch_size=arg.batch,
        pp=pp_train,
        tokenizer=dict(name="shapes", context_length=16),
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=recipe["weight_decay"],
                       grad_clip_norm=1.0)
    c.schedule = dict(lr=1e-3, warmup_steps=50, decay=recipe["decay"], end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.cpu_devices = 2   # a CPU-only host runs as 2 data-parallel devices: 1.3x the examples/s (mmjax/cpu_devices.py)
    c.log_every_steps = 25
    c.checkpoint = dict(every_steps=500, keep=2)
    pp_eval = "resize(32)|value_range(-1,1)"
    c.evals = dict(
        every_steps=recipe["eval_every"],   # 0: at the end only
        zeroshot=dict(data=dict(name="mmjax_shapes", split="test"), pp=pp_eval + "|keep('image','label')",
                      batch_size=500, max_examples=None, templates=list(ZERO_SHOT_TEMPLATES)),
        retrieval=dict(data=dict(name="mmjax_shapes", split="test"),
                       pp=pp_eval + "|tokenize(key='caption',out='text')|keep('image','text')",
                       batch_size=500, max_examples=None, ks=(1, 5, 10)),
    )
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.input.batch_size = 32
        c.evals.zeroshot.max_examples = 64
        c.evals.retrieval.max_examples = 64
    return c
