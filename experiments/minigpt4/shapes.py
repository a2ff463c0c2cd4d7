"""MiniGPT-4 on the embedded shapes data: one trainable linear layer between BLIP-2's frozen Q-Former
and a frozen LM learns to describe images (Zhu et al. 2023, in miniature; mmjax/shapes_bridges.py
sets the scene).

Everything but `language_projection` comes frozen from the BLIP-2 stage-2 shapes run
(experiments/blip2/shapes_stage2.py, `stage2=`), as MiniGPT-4 takes BLIP-2's ViT and Q-Former: its image
encoder, Q-Former and LM (experiments/lm/shapes.py's, which that run kept frozen). The projection
starts fresh. MiniGPT-4's stage-2 conversation template wraps the
image, an instruction drawn per batch; the word tokenizer reads the template's unknown words
("human", "assistant", "img") as <unk>, which the frozen LM sees as one fixed token. The caption
follows the prompt with no <start> (the model puts the BOS before the prompt).

Evaluated on held-out images: greedy answers to the first instruction (colour, shape and position
named?). Expected: see the README's "Frozen towers, trained bridges" table.
  mmjax-train --config experiments/minigpt4/shapes.py:stage2=runs/blip2_shapes_stage2 --workdir runs/minigpt4_shapes
  mmjax-train --config experiments/minigpt4/shapes.py:smoke=True --workdir /tmp/smoke_minigpt4_shapes
"""

import ml_collections

from mmjax import configs, shapes_bridges
from mmjax.models import minigpt4

INSTRUCTIONS = ("<Img><ImageHere></Img> describe this image", "<Img><ImageHere></Img> what is in this picture",
                "<Img><ImageHere></Img> what do you see")


def get_config(arg=None):
    arg = configs.parse_arg(arg, stage2=None, steps=400, batch=32, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "minigpt4"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(vision=dict(shapes_bridges.VISION), qformer=dict(shapes_bridges.QFORMER),
                   lm=dict(shapes_bridges.LM))
    c.prompt = dict(template=minigpt4.STAGE2_TEMPLATE, instructions=list(INSTRUCTIONS))
    c.input = dict(data=dict(name="mmjax_shapes", split="train"), batch_size=arg.batch,
                   pp=shapes_bridges.PP_CAPTION, tokenizer=dict(shapes_bridges.LM_TOKENIZER, add_bos=False),
                   worker_count=0)
    if arg.stage2:
        c.init = dict(source=arg.stage2, drop=[r"language_projection/.*"], fresh=[r"language_projection/.*"])
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0,
                       freeze=[r"^(?!language_projection/)"])
    c.schedule = dict(lr=3e-3, warmup_steps=50, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50
    c.checkpoint = dict(every_steps=200, keep=1)
    evals = shapes_bridges.evals(every_steps=0)
    c.evals = dict(every_steps=0, caption=evals["caption"])
    if arg.smoke:
        shapes_bridges.tiny(c)
        c.model.qformer.update(width=32, num_heads=2, mlp_dim=64, num_queries=4)
    return c
