"""ViT classification on the embedded shapes data set (24 colour×shape classes), on the CPU.

Expected: test top-1 far above chance (1/24 ≈ 0.04); see the README for measured numbers.
  mmjax-train --config experiments/vit/shapes.py --workdir runs/vit
"""

import ml_collections

from mmjax import configs, smoke


def get_config(arg=None):
    arg = configs.parse_arg(arg, steps=300, batch=128, pool="cls", posemb="learn", smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=4, pool=arg.pool, posemb=arg.posemb,
                   num_classes=24)
    c.loss = dict(name="softmax_xent", label_smoothing=0.0)
    c.input = dict(
        data=dict(name="mmjax_shapes", split="train"),
        batch_size=arg.batch,
        pp="resize(32)|value_range(-1,1)|keep('image','label')",
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0)
    c.schedule = dict(lr=1e-3, warmup_steps=30, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 25
    c.checkpoint = dict(every_steps=100, keep=2)
    c.evals = dict(every_steps=100, top1=dict(data=dict(name="mmjax_shapes", split="test"),
                                              pp="resize(32)|value_range(-1,1)|keep('image','label')",
                                              batch_size=500, max_examples=None))
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.input.batch_size = 32
        c.evals.top1.max_examples = 64
    return c
