"""Supervised image classification with a ViT (the ViT / AugReg pretraining objective)."""

from __future__ import annotations

import functools

import jax
import ml_collections

from mmjax import flops
from mmjax.evaluate import classification as cls_eval
from mmjax.losses import classification as cls_losses
from mmjax.models import vit
from mmjax.tasks import base


class ClassificationTask(base.Task):
    """Trains `mmjax.models.vit.ViT` on batches with "image" and integer "label"."""

    name = "classification"
    model_class: type = vit.ViT   # subclasses swap in another classifier with the same call

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        loss_cfg = config.get("loss", {})
        self.loss_name = loss_cfg.get("name", "softmax_xent")
        if self.loss_name not in cls_losses.LOSSES:
            raise ValueError(f"Unknown classification loss {self.loss_name!r}; known: {sorted(cls_losses.LOSSES)}")
        self.label_smoothing = float(loss_cfg.get("label_smoothing", 0.0))
        self.model = self.model_class(**config.model.to_dict())
        if self.model.num_classes is None:
            raise ValueError(f"The {self.name} task needs model.num_classes")
        self._logits = jax.jit(self.model.apply)

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"])

    def loss(self, params, batch, rng):
        logits = self.model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        if self.loss_name == "softmax_xent":
            loss = cls_losses.softmax_xent(logits, batch["label"], self.label_smoothing)
        else:
            loss = cls_losses.sigmoid_xent(logits, batch["label"])
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, {"batch_top1": accuracy}

    def train_flops_per_example(self, batch_shapes):
        image_hw = tuple(batch_shapes["image"][1:3])
        return flops.TRAIN_FACTOR * flops.total(flops.vit_flops(self.model, image_hw, train=True))

    def evaluate(self, params, mesh):
        evals = self.config.get("evals", {})
        if "top1" not in evals:
            return {}
        correct = counted = 0
        logits_fn = functools.partial(self._logits, {"params": params})
        for batch, logits in base.run_over_split(evals.top1, mesh, lambda b: logits_fn(b["image"])):
            c, n = cls_eval.top1(logits, batch["label"])
            correct, counted = correct + c, counted + n
        return {"top1": correct / max(counted, 1)}
