"""The main job (experiments/clip/shapes.py) trained with ALBEF's momentum ITC (Li et al. 2021,
Sec. 3.2; MoCo's queue, He et al. 2020): a task that owns extra train state.

The same CLIP, data, optimizer and evaluations as shapes.py; each online embedding is scored
against an EMA copy of the model (decay 0.995) on the batch plus queues of the last `queue`
momentum embeddings of each modality (mmjax/tasks/momentum_contrastive.py). Differences from
ALBEF: no fusion encoder, ITM or MLM (this is its ITC alone), momentum distillation off by
default (`:distill=0.4` is ALBEF's α), the temperature is CLIP's learned logit scale.
`mmjax.load(WORKDIR, which="ema")` loads the momentum model.

Measured with the main job's earlier recipe (ViT/8 width 128, depth 4, one conv per stem stage,
cosine decay, weight decay 0.05; before commit c0a99ee; not re-measured with today's main job): 1800
steps of 128, one run, seed 0: zero-shot top-1 0.71 (chance 1/24 ≈ 0.04; 0.28 at step 500, 0.53 at
step 1000), i2t / t2i R@1 0.23 / 0.22. Below that main job's 0.89 / 0.27 / 0.24: the shapes captions
name only 24 colour×shape classes, so about 1/24 of the 1024 queued keys share the anchor's caption
and act as false negatives (ALBEF's web captions have almost none; its momentum distillation,
`:distill=0.4`, softens them; not measured here).
Hardware and time: 39 min on 2 CPU cores shared with other jobs (one more forward pass per step
than the main job: the momentum model's).
  mmjax-train --config experiments/clip/shapes_momentum.py --workdir runs/clip_momentum
  mmjax-train --config experiments/clip/shapes_momentum.py:distill=0.4 --workdir runs/clip_momentum_md
"""

import os

from mmjax import configs


def get_config(arg=None):
    arg = configs.parse_arg(arg, steps=1800, batch=128, queue=1024, decay=0.995, distill=0.0, smoke=False)
    main_job = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.py")
    c = configs.load_config(f"{main_job}:steps={arg.steps},batch={arg.batch},smoke={arg.smoke}")
    with c.unlocked():
        c.task = "contrastive_momentum"
        queue = arg.queue
        if arg.smoke:            # the smoke batch of shapes.py (32): a queue of 4 batches
            queue = 4 * c.input.batch_size
        c.momentum = dict(decay=arg.decay, queue_size=queue, distill=arg.distill)
    return c
