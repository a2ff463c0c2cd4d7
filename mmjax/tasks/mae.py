"""MAE pretraining (He et al. 2022): reconstruct the pixels of randomly masked patches.

Config: `model` (mmjax.models.mae.MAE fields), `loss.norm_pix` (regress per-patch normalised
pixels; default True, the paper's best setting), and optional evaluators:
  evals.recon  the reconstruction loss on a split (data, pp, batch_size, max_examples), with a
               fixed masking `seed` so evaluations are comparable;
  evals.probe  linear probes on frozen, unmasked encoder features: `train` and `test` split
               configs, the integer `labels` to predict (default ("label",); reported as
               probe/<label>_top1), `feature` "gap" (mean of patch tokens) or "cls", and the
               probe's `steps` / `lr`.
"""

from __future__ import annotations

import functools
import itertools

import jax
import ml_collections
import numpy as np

from mmjax.evaluate import linear_probe
from mmjax.losses import masked_modeling
from mmjax.models import mae
from mmjax.tasks import base


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
        self._features = jax.jit(functools.partial(self.model.apply, method="features"))

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

    def loss(self, params, batch, rng):
        mask_rng, dropout_rng = jax.random.split(rng)
        images = batch["image"]
        pred, out = self.model.apply({"params": params}, images, self._noise(mask_rng, images), train=True,
                                     rngs={"dropout": dropout_rng})
        return masked_modeling.mim_pixels(pred, mae.patchify(images, self.patch), out["mask"],
                                          norm_pix=self.norm_pix)

    def _per_example_loss(self, params, images, rng):
        pred, out = self.model.apply({"params": params}, images, self._noise(rng, images))
        target = mae.patchify(images, self.patch)

        def one(p, t, m):
            return masked_modeling.mim_pixels(p[None], t[None], m[None], norm_pix=self.norm_pix)[0]
        return jax.vmap(one)(pred, target, out["mask"])

    def evaluate(self, params, mesh):
        evals = self.config.get("evals", {})
        metrics = {}
        if "recon" in evals:
            metrics["recon/loss"] = self._recon(params, mesh, evals.recon)
        if "probe" in evals:
            metrics.update(self._probe(params, mesh, evals.probe))
        return metrics

    def _recon(self, params, mesh, cfg) -> float:
        batches = itertools.count()
        key = jax.random.key(int(cfg.get("seed", 0)))
        per_example = functools.partial(self._per_example, params)
        losses = [out for _, out in base.run_over_split(
            cfg, mesh, lambda b: per_example(b["image"], jax.random.fold_in(key, next(batches))),
            name="evals.recon")]
        # Every example masks the same number of patches, so the mean of per-example losses is the loss.
        return float(np.mean(np.concatenate(losses)))

    def _probe(self, params, mesh, cfg) -> dict[str, float]:
        feature = cfg.get("feature", "gap")
        if feature not in ("gap", "cls"):
            raise ValueError(f"evals.probe.feature must be 'gap' or 'cls', got {feature!r}")
        targets = tuple(cfg.get("labels", ("label",)))
        pooled = functools.partial(self._pooled, params, feature=feature)

        def features(split_cfg, name):
            xs, ys = [], {k: [] for k in targets}
            for batch, tokens in base.run_over_split(split_cfg, mesh, lambda b: pooled(b["image"]), name=name):
                xs.append(tokens)
                for k in targets:
                    if k not in batch:
                        raise ValueError(f"evals.probe: no {k!r} in the batch (keys {sorted(batch)}); keep it in pp")
                    ys[k].append(batch[k])
            return np.concatenate(xs), {k: np.concatenate(v) for k, v in ys.items()}

        (x, y), (xt, yt) = features(cfg.train, "evals.probe.train"), features(cfg.test, "evals.probe.test")
        steps, lr = int(cfg.get("steps", 300)), float(cfg.get("lr", 0.05))
        return {f"probe/{k}_top1": linear_probe.fit_and_score(x, y[k], xt, yt[k], int(max(y[k].max(), yt[k].max())) + 1,
                                                              steps=steps, lr=lr) for k in targets}

    def _pooled(self, params, images, feature: str) -> jax.Array:
        tokens = self._features({"params": params}, images)
        return tokens[:, 1:].mean(axis=1) if feature == "gap" else tokens[:, 0]

