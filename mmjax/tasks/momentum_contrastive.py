"""Image–text contrastive pretraining against a momentum encoder and feature queues (MoCo's
queue, He et al. 2020; ALBEF's ITC, Li et al. 2021): the task that owns extra train state.

The online CLIP is trained as usual; beside it the train state keeps
* "ema_params": an exponential moving average of all the CLIP's parameters (the momentum
  image and text towers and projections), m ← decay·m + (1 - decay)·θ before each step's
  forward pass, as ALBEF does; `mmjax.load(WORKDIR, which="ema")` loads it as a CLIP;
* "queue": the momentum embeddings of the last `queue_size` examples of both modalities and a
  write pointer (a ring buffer, one global batch per step; filled with random unit vectors at
  the start, as MoCo's and ALBEF's are).
Each online embedding is scored against the momentum embeddings of the batch plus the other
modality's queue (mmjax.losses.contrastive_queue). Config::

    task = "contrastive_momentum"
    momentum = dict(decay=0.995, queue_size=4096, distill=0.0)   # queue: a multiple of the batch

`distill` > 0 is ALBEF's momentum distillation (α = 0.4 in the paper). Evaluation and export use
the online parameters, exactly as for the contrastive task.
"""

from __future__ import annotations

import ml_collections

from mmjax import flops
from mmjax.losses import contrastive_queue
from mmjax.tasks import contrastive, momentum_state

DEFAULTS = {"decay": 0.995, "queue_size": None, "distill": 0.0}


class MomentumContrastiveTask(contrastive.ContrastiveTask):
    """A CLIP trained with ITC against its momentum copy and queues; `loss` alone is plain CLIP."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if self.loss_name != "clip":
            raise ValueError(f"contrastive_momentum scores against queues with a softmax: loss.name must "
                             f"be 'clip', not {self.loss_name!r}")
        cfg = dict(config.get("momentum") or {})
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"Unknown momentum key(s) {unknown}; known: {sorted(DEFAULTS)}")
        cfg = {**DEFAULTS, **cfg}
        self.decay, self.distill = momentum_state.check_decay(cfg["decay"]), float(cfg["distill"])
        self.queue_size = momentum_state.check_queue_size(cfg["queue_size"], int(config.input.batch_size))
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"momentum.distill must be in [0, 1], got {self.distill}")

    def init_extra_state(self, params, rng):
        return {"ema_params": momentum_state.ema_copy(params),
                "queue": momentum_state.init_queues(rng, self.queue_size, self.model.embed_dim)}

    def train_loss(self, params, extra, batch, rng):
        ema = momentum_state.ema_update(extra["ema_params"], params, self.decay)
        out = self.model.apply({"params": params}, batch["image"], batch["text"], train=True,
                               rngs={"dropout": rng})
        momentum = self.model.apply({"params": ema}, batch["image"], batch["text"])
        queue = extra["queue"]
        loss, metrics = contrastive_queue.itc_queue_loss(
            out["image_embeds"], out["text_embeds"], momentum["image_embeds"], momentum["text_embeds"],
            queue["image"], queue["text"], out["logit_scale"], distill=self.distill)
        metrics["logit_scale"] = out["logit_scale"]
        new_extra = {"ema_params": ema, "queue": momentum_state.enqueue_all(
            queue, image=momentum["image_embeds"], text=momentum["text_embeds"])}
        return loss, (metrics, new_extra)

    def train_flops_per_example(self, batch_shapes):
        """The online model's forward and backward plus the momentum model's forward."""
        train = super().train_flops_per_example(batch_shapes)
        return train * (flops.TRAIN_FACTOR + 1.0) / flops.TRAIN_FACTOR
