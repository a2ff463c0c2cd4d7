"""MAE on the embedded shapes data set (32×32 images, 8-px patches), on the CPU.

A tiny MAE (encoder 64 wide × 2 blocks, decoder 64 × 2) reconstructs 75% masked patches, then
linear probes on the frozen encoder predict the class (colour × shape, 24-way) and the shape's
position (3×3 grid, 9-way). Pixel targets are not normalised per patch here: the backgrounds
are flat with pixel noise, so per-patch normalisation (the ImageNet recipe's `norm_pix`) would
turn most targets into pure noise.

Expected (tests/test_mim_learning.py, 3000 steps of 32, about a minute on a CPU): the test
reconstruction loss falls from 0.78 to 0.04; probe top-1, random encoder → trained: position
0.22 → 0.76, class 0.20 → 0.26 (colour is already linear in random features; telling the six
shapes apart takes MAE longer than this budget).
  mmjax-train --config experiments/mae/shapes.py --workdir runs/mae_shapes
"""

import ml_collections

from mmjax import configs, smoke


def get_config(arg=None):
    arg = configs.parse_arg(arg, steps=3000, batch=32, norm_pix=False, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "mae"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, decoder_width=64,
                   decoder_depth=2, decoder_heads=4, decoder_mlp_dim=256, mask_ratio=0.75)
    c.loss = dict(norm_pix=arg.norm_pix)
    c.input = dict(data=dict(name="mmjax_shapes", split="train"), batch_size=arg.batch,
                   pp="resize(32)|value_range(-1,1)|keep('image')", worker_count=0)
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip_norm=None)
    c.schedule = dict(lr=3e-3, warmup_steps=20, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50     # fetching metrics often keeps tiny fast steps from queueing up
    c.checkpoint = dict(every_steps=1000, keep=2)
    probe_pp = "resize(32)|value_range(-1,1)|keep('image','label','position')"
    c.evals = dict(
        every_steps=1000,
        recon=dict(data=dict(name="mmjax_shapes", split="test"), pp="resize(32)|value_range(-1,1)|keep('image')",
                   batch_size=500, max_examples=1000, seed=0),
        probe=dict(train=dict(data=dict(name="mmjax_shapes", split="train"), pp=probe_pp, batch_size=500,
                              max_examples=2000),
                   test=dict(data=dict(name="mmjax_shapes", split="test"), pp=probe_pp, batch_size=500,
                             max_examples=1000),
                   labels=("label", "position"), feature="gap", steps=300, lr=0.05),
    )
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.input.batch_size = 16
        c.evals.recon.update(batch_size=32, max_examples=32)
        c.evals.probe.train.update(batch_size=32, max_examples=64)
        c.evals.probe.test.update(batch_size=32, max_examples=32)
        c.evals.probe.steps = 10
    return c
