"""MAE pretraining (He et al. 2022): reconstruct the pixels of randomly masked patches.

Config: `model` (mmjax.models.mae.MAE fields), `loss.norm_pix` (regress per-patch normalised
pixels; default True, the paper's best setting), and optional evaluators (mmjax.evaluate.runner)
served by `reconstruct` and `image_features`:
  evals.recon  (kind reconstruction) the reconstruction loss on a split (data, pp, batch_size,
               max_examples), with a fixed masking `seed` so evaluations are comparable;
  evals.probe  (kind linear_probe) linear probes on frozen, unmasked encoder features: `train`
               and `test` split configs, the integer `labels` to predict (default ("label",);
               reported as probe/<label>_top1), `feature` "gap" (mean of patch tokens) or "cls",
               and the probe's `steps` / `lr`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import flops
from mmjax.losses import masked_modeling
from mmjax.models import mae
from mmjax.tasks import base

FEATURES = ("gap", "cls")


class MAETask(base.Task):
    """Trains `mmjax.models.mae.MAE` on batches with "image"."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        loss_cfg = dict(config.get("loss", {}))
        unknown = sorted(set(loss_cfg) - {"norm_pix"})
        if unknown:
            raise ValueError(f"Unknown mae loss key(s) {unknown}; known: ['norm_pix']")
        self.norm_pix = bool(loss_cfg.get("norm_pix", True))
        self.model = mae.MAE(**config.model.to_dict())
        self.patch = self.model.arch()["patch_size"][0]
        self._per_example = jax.jit(self._per_example_loss)
        self._pooled = jax.jit(self._pooled_features, static_argnames="feature")

    def _noise(self, rng: jax.Array, images: jax.Array) -> jax.Array:
        grid = (images.shape[1] // self.patch) * (images.shape[2] // self.patch)
        return jax.random.uniform(rng, (images.shape[0], grid))

    def init_variables(self, rng, batch):
        images = batch["image"]
        return self.model.init({"params": rng}, images, self._noise(rng, images))

    def model_description(self, batch):
        image = batch["image"]
        grid = (image.shape[1] // self.patch) * (image.shape[2] // self.patch)
        noise = {"shape": [1, grid], "dtype": "float32"}
        return {"module": self.model, "inputs": [base.input_spec(image), noise], "params_key": None}

    def train_flops_per_example(self, batch_shapes):
        return flops.TRAIN_FACTOR * flops.total(mae.forward_flops(self.model, tuple(batch_shapes["image"][1:3])))

    def loss(self, params, batch, rng):
        mask_rng, dropout_rng = jax.random.split(rng)
        images = batch["image"]
        out = self.model.apply({"params": params}, images, self._noise(mask_rng, images), train=True,
                               rngs={"dropout": dropout_rng})
        return masked_modeling.mim_pixels(out["pred"], mae.patchify(images, self.patch), out["mask"],
                                          norm_pix=self.norm_pix)

    def _per_example_loss(self, params, images, rng):
        out = self.model.apply({"params": params}, images, self._noise(rng, images))
        target = mae.patchify(images, self.patch)

        def one(p, t, m):
            return masked_modeling.mim_pixels(p[None], t[None], m[None], norm_pix=self.norm_pix)[0]
        return jax.vmap(one)(out["pred"], target, out["mask"])

    def reconstruct(self, params, images: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """Per-example masked-patch pixel loss with masks drawn from `rng` (the reconstruction
        evaluator's NAME/loss: every example masks as many patches, so each counts once)."""
        loss = self._per_example(params, images, rng)
        return {"loss": loss, "count": jnp.ones_like(loss)}

    def image_features(self, params, images: jax.Array, feature: str = "gap") -> jax.Array:
        """(B, width) frozen features of the unmasked encoder for linear probes: the mean of the
        patch tokens ("gap") or the [CLS] token ("cls")."""
        if feature not in FEATURES:
            raise ValueError(f"MAE probe features are {FEATURES}, got feature={feature!r}")
        return self._pooled({"params": params}, images, feature)

    def _pooled_features(self, variables, images, feature: str) -> jax.Array:
        tokens = self.model.apply(variables, images, method="features")
        return tokens[:, 1:].mean(axis=1) if feature == "gap" else tokens[:, 0]
