"""Supervised image classification with a ViT (the ViT / AugReg pretraining objective).

Optional `mixup` block (mmjax.data.mixing.Mixup fields, e.g. dict(mixup_alpha=0.8,
cutmix_alpha=1.0, switch_prob=0.5, prob=1.0); absent = off): each training batch is mixed on
device from the step rng, label smoothing is folded into the mixed targets, and `batch_top1`
compares against the argmax of those targets.
"""

from __future__ import annotations

import jax
import ml_collections

from mmjax import flops
from mmjax.data import mixing
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
        mixup_cfg = config.get("mixup")
        self.mixup = None if mixup_cfg is None else mixing.Mixup.from_config(mixup_cfg)
        self.model = self.model_class(**config.model.to_dict())
        if self.model.num_classes is None:
            raise ValueError(f"The {self.name} task needs model.num_classes")
        self._logits = jax.jit(lambda variables, images: self.model.apply(variables, images)["logits"])

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"])

    def loss(self, params, batch, rng):
        images, labels, smoothing = batch["image"], batch["label"], self.label_smoothing
        if self.mixup is not None:   # soft targets with the smoothing folded in, as timm's Mixup
            rng, mix_rng = jax.random.split(rng)
            fold = smoothing if self.loss_name == "softmax_xent" else 0.0
            images, labels = mixing.mix_batch(mix_rng, images, labels, self.model.num_classes, self.mixup, fold)
            smoothing = 0.0
        logits = self.model.apply({"params": params}, images, train=True, rngs={"dropout": rng})["logits"]
        if self.loss_name == "softmax_xent":
            loss = cls_losses.softmax_xent(logits, labels, smoothing)
        else:
            loss = cls_losses.sigmoid_xent(logits, labels)
        truth = labels if labels.ndim == logits.ndim - 1 else labels.argmax(-1)
        accuracy = (logits.argmax(-1) == truth).mean()
        return loss, {"batch_top1": accuracy}

    def model_description(self, batch):
        return {"module": self.model, "inputs": [base.input_spec(batch["image"])], "params_key": None}

    def train_flops_per_example(self, batch_shapes):
        image_hw = tuple(batch_shapes["image"][1:3])
        return flops.TRAIN_FACTOR * flops.total(vit.forward_flops(self.model, image_hw, train=True))

    def classify(self, params, images: jax.Array) -> jax.Array:
        """(B, num_classes) logits (the top1 evaluator's predict function)."""
        return self._logits({"params": params}, images)
