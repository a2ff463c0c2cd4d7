"""Flamingo's Perceiver resampler as the bridge, next to BLIP-2's Q-Former on the same task: the same
frozen image encoder and frozen LM as experiments/blip2/shapes_stage2.py, with a Perceiver resampler
(Alayrac et al. 2022, Sec. 2.1; OpenFlamingo's layer) and a linear projection in the Q-Former's place
(mmjax.models.resampler_lm; mmjax/shapes_bridges.py sets the scene).

Only the resampler (2 layers, 16 latents of 128, 4 heads of 32) and the projection train, from fresh,
with BLIP-2 stage 2's LM loss on the caption after the image, 800 steps of 32, AdamW lr 3e-3. The image encoder comes from the main
job's CLIP run (`clip=`, its workdir), the LM from experiments/lm/shapes.py (`lm=`). Where the Q-Former
had a stage of its own (stage 1) before this one, the resampler learns from the LM loss alone, as
Flamingo's does.

Evaluated as the BLIP-2 stage-2 demo: greedy captions after "a picture of" (colour, shape, position
named) and zero-shot
prompted questions on held-out images. Expected: see the README's "Frozen towers, trained bridges" table.
  mmjax-train --config experiments/perceiver/shapes.py:clip=runs/clip,lm=runs/lm_shapes --workdir runs/perceiver_shapes
  mmjax-train --config experiments/perceiver/shapes.py:smoke=True --workdir /tmp/smoke_perceiver_shapes
"""

import ml_collections

from mmjax import configs, shapes_bridges

RESAMPLER = dict(depth=2, num_heads=4, head_dim=32, num_latents=shapes_bridges.NUM_QUERIES)


def get_config(arg=None):
    arg = configs.parse_arg(arg, clip=None, lm=None, steps=800, batch=32, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "resampler_lm"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(vision=dict(shapes_bridges.VISION), resampler=dict(RESAMPLER), lm=dict(shapes_bridges.LM))
    c.loss = dict(prompt_length=1)
    c.caption = dict(prompt=shapes_bridges.CAPTION_PROMPT)
    c.input = dict(data=dict(name="mmjax_shapes", split="train"), batch_size=arg.batch,
                   pp=shapes_bridges.PP_CAPTION, tokenizer=dict(shapes_bridges.LM_TOKENIZER), worker_count=0)
    if arg.clip or arg.lm:
        if not (arg.clip and arg.lm):
            raise ValueError("the resampler bridge starts from both runs: give clip= and lm=")
        c.init = dict(source=[("", arg.clip), ("language_model/", arg.lm)],
                      rules=shapes_bridges.clip_vision_rules(), drop=list(shapes_bridges.CLIP_UNUSED),
                      fresh=[r"resampler/.*", r"language_projection/.*"])
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
        c.model.resampler.update(depth=1, num_heads=2, head_dim=16, num_latents=4)
    return c
