"""Fine-tuning the MAE encoder of experiments/mae/shapes.py on the 24 shapes classes, on the CPU.

The MAE's encoder (64 wide × 2 blocks, 8-px patches on 32×32 images) becomes a classifier as in
in1k_finetune.py: [CLS] kept, the patch tokens averaged, then LayerNorm and a linear head; the
learned position embedding starts from the fixed sin-cos table (`init.preset="mae_to_vit"`,
mmjax/warm_start.py). Without `init_from` the same model starts from a random encoder: the
baseline that shows what pretraining buys.

Expected (measured on a 2-core CPU, 1000 steps of 64, about 25 s each; chance 0.04): test
top-1 0.36 from the encoder of a 10,000-step MAE run (about 4 min) against 0.24 from a random
encoder. From the recipe's default 3000-step MAE the gain is within noise (0.26 against 0.24):
that encoder has not learnt the shapes yet (its class probe is no better than a random
encoder's, see shapes.py).
  mmjax-train --config experiments/mae/shapes.py:steps=10000 --workdir runs/mae_shapes
  mmjax-train --config experiments/mae/shapes_finetune.py:init_from=runs/mae_shapes --workdir runs/mae_shapes_ft
  mmjax-train --config experiments/mae/shapes_finetune.py --workdir runs/mae_shapes_scratch
"""

import ml_collections

from mmjax import configs, smoke


def get_config(arg=None):
    arg = configs.parse_arg(arg, init_from=None, steps=1000, batch=64, lr=1e-3, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, pool="gap", class_token=True,
                   fc_norm=True, posemb="learn", num_classes=24)
    c.loss = dict(name="softmax_xent", label_smoothing=0.0)
    c.init = dict(source=arg.init_from, preset="mae_to_vit")
    pp = "resize(32)|value_range(-1,1)|keep('image','label')"      # as the MAE saw its images
    c.input = dict(data=dict(name="mmjax_shapes", split="train"), batch_size=arg.batch, pp=pp, worker_count=0)
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=None,
                       layer_decay=0.75)
    c.schedule = dict(lr=arg.lr, warmup_steps=20, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50
    c.checkpoint = dict(every_steps=1000, keep=2)
    c.evals = dict(every_steps=0, top1=dict(data=dict(name="mmjax_shapes", split="test"), pp=pp,
                                            batch_size=500, max_examples=None))
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.input.batch_size = 16
        c.evals.top1.max_examples = 64
    return c
