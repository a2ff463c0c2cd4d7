"""BLIP-2 stage 2 on the embedded shapes data: the stage-1 Q-Former's queries, through a new linear
projection, become the soft prompt of a frozen language model that never saw an image (Li et al.
2023, Sec. 3.3, in miniature; mmjax/shapes_bridges.py sets the scene).

Frozen: the image encoder (from the stage-1 run, the main job's CLIP tower) and the LM of
experiments/lm/shapes.py (pretrained on shapes text: a caption followed by a question and its answer,
or by another caption of the scene). Trained: the Q-Former (from stage 1) and the projection, with the
LM loss on the caption after the image (its first token, the BOS, not scored), 800 steps of 32, AdamW
lr 3e-3 (the paper: 1e-4 at batch 1,920). Run experiments/blip2/shapes_stage1.py and
experiments/lm/shapes.py first and name their workdirs (`stage1=`, `lm=`): the init reads the two
runs into one model.

Evaluated on held-out images: greedy captions after "a picture of" (LAVIS prompts its captioner with
"a photo of"; does the caption name the image's colour, shape and position?) and zero-shot prompted
questions "question: what colour is the shape? answer:" (the LM answers from the soft prompt; no
question was seen with an image in training).

Expected: see the README's "Frozen towers, trained bridges" table (measured by benchmarks/shapes_bridges.py).
  mmjax-train --config experiments/blip2/shapes_stage2.py:stage1=runs/blip2_shapes_stage1,lm=runs/lm_shapes --workdir runs/blip2_shapes_stage2
  mmjax-train --config experiments/blip2/shapes_stage2.py:smoke=True --workdir /tmp/smoke_blip2_shapes_stage2
"""

import ml_collections

from mmjax import configs, shapes_bridges

# Stage 1's parameters that stage 2 has no use for: the text side of the Q-Former and the ITC / ITM /
# ITG heads (LAVIS's Blip2OPT drops them too: `cls`, the word and position embeddings, the text FFNs).
STAGE1_ONLY = (r"embeddings/.*", r"vision_projection/.*", r"text_projection/.*", r"itm_head/.*", r"temp",
               r"lm_transform/.*", r"lm_norm/.*", r"lm_bias", r"qformer/.*_text/.*")


def get_config(arg=None):
    arg = configs.parse_arg(arg, stage1=None, lm=None, steps=800, batch=32, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "blip2_stage2"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(vision=dict(shapes_bridges.VISION), qformer=dict(shapes_bridges.QFORMER),
                   lm=dict(shapes_bridges.LM))
    c.loss = dict(prompt_length=1)
    c.caption = dict(prompt=shapes_bridges.CAPTION_PROMPT)
    c.input = dict(data=dict(name="mmjax_shapes", split="train"), batch_size=arg.batch,
                   pp=shapes_bridges.PP_CAPTION, tokenizer=dict(shapes_bridges.LM_TOKENIZER), worker_count=0)
    if arg.stage1 or arg.lm:
        if not (arg.stage1 and arg.lm):
            raise ValueError("stage 2 starts from both runs: give stage1= and lm=")
        c.init = dict(source=[("", arg.stage1), ("language_model/", arg.lm)], drop=list(STAGE1_ONLY),
                      fresh=[r"language_projection/.*"])
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0,
                       freeze=list(shapes_bridges.FROZEN))
    c.schedule = dict(lr=3e-3, warmup_steps=50, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50
    c.checkpoint = dict(every_steps=300, keep=1)
    c.evals = shapes_bridges.evals(every_steps=0)
    if arg.smoke:
        shapes_bridges.tiny(c)
        c.model.qformer.update(width=32, num_heads=2, mlp_dim=64, num_queries=4)
    return c
