"""BLIP-2 stage 1 on the embedded shapes data: a Q-Former learns to pull what the captions say out of a
frozen image encoder (Li et al. 2023, Sec. 3.2, in miniature; mmjax/shapes_bridges.py sets the scene).

The frozen image encoder is the main job's CLIP image tower (experiments/clip/shapes.py, run it first:
`clip=` names its workdir), as BLIP-2 freezes EVA-CLIP's; its key biases are dropped (BLIP-2's vision
tower has none, and softmax cancels them exactly). The Q-Former (2 layers of 128, 16 queries,
cross-attention in every layer) starts fresh, where BLIP-2 starts from BERT-base. Losses as the paper:
ITC (best query), ITM with hard negatives, ITG under the multimodal causal mask; the shapes WordPiece
vocabulary + [DEC]. 500 steps of 32, AdamW lr 1e-3 (the paper's 1e-4 is for a BERT-initialised
Q-Former and batch 2,320).

Evaluated on 500 held-out images: retrieval R@1/5 by ITC (each image's best query) and after ITM
re-ranking of the top 16, as the paper's retrieval. Expected: see the README's "Frozen towers, trained
bridges" table (measured by benchmarks/shapes_bridges.py).
  mmjax-train --config experiments/blip2/shapes_stage1.py:clip=runs/clip --workdir runs/blip2_shapes_stage1
  mmjax-train --config experiments/blip2/shapes_stage1.py:smoke=True --workdir /tmp/smoke_blip2_shapes_stage1
"""

import ml_collections

from mmjax import configs, shapes_bridges

CONTEXT = 24
VOCAB = 198        # the shapes WordPiece vocabulary; id 198 is LAVIS's added [DEC]


def get_config(arg=None):
    arg = configs.parse_arg(arg, clip=None, steps=500, batch=32, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "blip2_stage1"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(vision=dict(shapes_bridges.VISION), qformer=dict(shapes_bridges.QFORMER), vocab_size=VOCAB + 1,
                   max_len=32, embed_dim=64)
    c.input = dict(data=dict(name="mmjax_shapes", split="train"), batch_size=arg.batch,
                   pp=shapes_bridges.PP_CAPTION, tokenizer=dict(name="shapes_wordpiece", context_length=CONTEXT),
                   worker_count=0)
    if arg.clip:
        c.init = dict(source=arg.clip, rules=shapes_bridges.clip_vision_rules(),
                      drop=[*shapes_bridges.CLIP_UNUSED, shapes_bridges.CLIP_KEY_BIAS],
                      fresh=[r"(?!vision_model/).*"])
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0,
                       freeze=[r"^vision_model/"])
    c.schedule = dict(lr=1e-3, warmup_steps=50, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50
    c.checkpoint = dict(every_steps=400, keep=1)
    c.evals = dict(       # at the end: ITC retrieval (best query), then ITM re-ranking of the top 16
        every_steps=0,
        itm_retrieval=dict(kind="itm_retrieval", data=dict(name="mmjax_shapes", split="test"),
                           pp=f"{shapes_bridges.PP_CAPTION}", batch_size=250, max_examples=500, ks=(1, 5), k=16,
                           add_itc=True))
    if arg.smoke:
        shapes_bridges.tiny(c, eval_examples=32)
        c.model.qformer.update(width=32, num_heads=2, mlp_dim=64, num_queries=4)
        c.model.embed_dim = 16
    return c
