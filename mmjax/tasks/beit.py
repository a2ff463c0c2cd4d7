"""BEiT pretraining (Bao et al. 2022): predict the dVAE visual tokens of blockwise-masked patches;
and BEiT fine-tuning (`beit_classification`: the classification task with a BEiT backbone).

Inside each step the frozen DALL-E dVAE tokenizer turns the (un-normalised, resized) images into
target token ids, a blockwise mask is drawn per example (`mmjax.data.masking`), and BEiT is
trained with cross-entropy on the masked positions.

Config:
  model       mmjax.models.beit.BEiT fields (vocab_size must match the tokenizer's)
  tokenizer   checkpoint: an mmjax model directory holding a `DVAEEncoder` (written by
              mmjax-convert or `mmjax.pretrained.save`), or "random" for smoke tests (random
              weights still give a fixed image → token map); image_size: the tokenizer's input
              side (BEiT: 112 for 224 images, so its 1/8 grid matches 16-px patches);
              pixel_mean / pixel_std: how the pipeline normalised the images, undone before
              tokenizing; with checkpoint="random", the DVAEEncoder fields (n_hid, ...).
  masking     mmjax.data.masking.block_mask arguments (num_masking_patches=75, ...)
  evals.mim   optional (kind reconstruction, served by `reconstruct`): masked-token loss and
              accuracy on a split, with a fixed masking seed

Parameters are {"beit": ..., "tokenizer": ...}. The tokenizer is never trained: its gradient is
stopped and `optimizer.freeze` must match `^tokenizer/` (checked here), so it gets no update
and no weight decay.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import flops
from mmjax.data import masking
from mmjax.losses import masked_modeling
from mmjax.models import beit, dvae
from mmjax.tasks import base, classification

TOKENIZER_KEYS = ("checkpoint", "image_size", "pixel_mean", "pixel_std", "n_hid", "blocks_per_group",
                  "vocab_size")
MASKING_KEYS = ("num_masking_patches", "min_num_patches", "max_num_patches", "min_aspect", "max_aspect")


def _check_keys(cfg: dict, known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"Unknown {what} key(s) {unknown}; known: {list(known)}")


class BEiTTask(base.Task):
    """Trains `mmjax.models.beit.BEiT` on batches with "image" against frozen dVAE tokens."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        tok = dict(config.get("tokenizer", {}))
        _check_keys(tok, TOKENIZER_KEYS, "tokenizer")
        self.masking = dict(config.get("masking", {}))
        _check_keys(self.masking, MASKING_KEYS, "masking")
        self.model = beit.BEiT(**config.model.to_dict())
        if self.model.vocab_size is None:
            raise ValueError("The beit task needs model.vocab_size (the tokenizer's codebook size)")
        self.tokenizer, self._tokenizer_params = self._build_tokenizer(tok)
        if self.tokenizer.vocab_size != self.model.vocab_size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} differs from the tokenizer's "
                             f"codebook size {self.tokenizer.vocab_size}")
        self.tokenizer_size = int(tok.get("image_size", 112))
        self.pixel_mean = jnp.asarray(tok.get("pixel_mean", (0.5, 0.5, 0.5)), jnp.float32)
        self.pixel_std = jnp.asarray(tok.get("pixel_std", (0.5, 0.5, 0.5)), jnp.float32)
        freeze = config.optimizer.get("freeze") or ()
        freeze = [freeze] if isinstance(freeze, str) else list(freeze)
        if not any(re.search(p, "tokenizer/input/kernel") for p in freeze):
            raise ValueError("BEiT's dVAE tokenizer is frozen: add '^tokenizer/' to optimizer.freeze")
        self._per_example = jax.jit(self._per_example_stats)

    @staticmethod
    def _build_tokenizer(tok: dict) -> tuple[dvae.DVAEEncoder, dict | None]:
        checkpoint = tok.get("checkpoint")
        fields = {k: tok[k] for k in ("n_hid", "blocks_per_group", "vocab_size") if k in tok}
        if checkpoint == "random":
            return dvae.DVAEEncoder(**fields), None
        if not checkpoint:
            raise ValueError("BEiT needs the dVAE tokenizer weights: set tokenizer.checkpoint to an mmjax "
                             "model directory holding a DVAEEncoder, or 'random' for smoke tests")
        if fields:
            raise ValueError(f"tokenizer {sorted(fields)} come from the checkpoint; remove them from the config")
        from mmjax import pretrained

        model, variables = pretrained.load(checkpoint)
        if not isinstance(model, dvae.DVAEEncoder):
            raise TypeError(f"{checkpoint} holds a {type(model).__name__}, not a dvae.DVAEEncoder")
        return model, variables["params"]

    def targets(self, tokenizer_params, images: jax.Array) -> jax.Array:
        """Visual-token ids (B, N) of model-normalised images, from the frozen tokenizer."""
        pixels = jnp.clip(images.astype(jnp.float32) * self.pixel_std + self.pixel_mean, 0.0, 1.0)
        size = self.tokenizer_size
        if pixels.shape[1:3] != (size, size):
            pixels = jnp.clip(jax.image.resize(pixels, (pixels.shape[0], size, size, 3), "lanczos3"), 0.0, 1.0)
        ids = self.tokenizer.apply({"params": jax.lax.stop_gradient(tokenizer_params)}, pixels, method="tokenize")
        return ids.reshape(ids.shape[0], -1)

    def _grid(self, images) -> tuple[int, int]:
        patch = self.model.arch()["patch_size"]
        grid = (images.shape[1] // patch[0], images.shape[2] // patch[1])
        if grid != (self.tokenizer_size // 8,) * 2:
            raise ValueError(f"The {grid} patch grid of {images.shape[1:3]} images does not match the "
                             f"tokenizer's {self.tokenizer_size // 8}² token grid (tokenizer.image_size="
                             f"{self.tokenizer_size}); use image_size = 8 × patches per side")
        return grid

    def _masks(self, rng, images) -> jax.Array:
        return masking.block_masks(rng, images.shape[0], self._grid(images), **self.masking)

    def init_variables(self, rng, batch):
        images = batch["image"]
        model_rng, tok_rng = jax.random.split(rng)
        mask = jnp.zeros((images.shape[0],) + (int(np.prod(self._grid(images))),), bool)
        variables = {"beit": self.model.init({"params": model_rng}, images, mask)["params"]}
        if self._tokenizer_params is None:
            small = jnp.zeros((1, self.tokenizer_size, self.tokenizer_size, 3), jnp.float32)
            variables["tokenizer"] = self.tokenizer.init(tok_rng, small)["params"]
        else:
            variables["tokenizer"] = jax.tree.map(jnp.asarray, self._tokenizer_params)
        return {"params": variables}

    def model_description(self, batch):
        """The BEiT alone (params["beit"]); the frozen tokenizer is not part of the model."""
        return {"module": self.model, "inputs": [base.input_spec(batch["image"])], "params_key": "beit"}

    def train_flops_per_example(self, batch_shapes):
        """BEiT's forward and backward, plus the frozen tokenizer's forward (no backward): for
        BEiT-B/16 at 224 px, 113 GFLOPs per image and the dVAE's 50 at 112 px."""
        size = (self.tokenizer_size, self.tokenizer_size)
        return (flops.TRAIN_FACTOR * flops.total(beit.forward_flops(self.model, tuple(batch_shapes["image"][1:3])))
                + flops.total(dvae.encoder_flops(self.tokenizer, size)))

    def loss(self, params, batch, rng):
        mask_rng, dropout_rng = jax.random.split(rng)
        images = batch["image"]
        targets = self.targets(params["tokenizer"], images)
        mask = self._masks(mask_rng, images)
        logits = self.model.apply({"params": params["beit"]}, images, mask, train=True,
                                  rngs={"dropout": dropout_rng})["logits"]
        return masked_modeling.mim_tokens(logits, targets, mask)

    def _per_example_stats(self, params, images, rng):
        targets = self.targets(params["tokenizer"], images)
        mask = self._masks(rng, images)
        logits = self.model.apply({"params": params["beit"]}, images, mask)["logits"]
        xent = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        correct = logits.argmax(-1) == targets
        return {"loss": (xent * mask).sum(1), "accuracy": (correct & mask).sum(1), "count": mask.sum(1)}

    def reconstruct(self, params, images: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """Per-example sums over the masked patches (blockwise masks drawn from `rng`) of the
        token cross-entropy ("loss") and of correct predictions ("accuracy"), and their "count":
        the reconstruction evaluator reports NAME/loss and NAME/accuracy per masked patch."""
        return self._per_example(params, images, rng)


class BEiTClassificationTask(classification.ClassificationTask):
    """Image classification with `mmjax.models.beit.BEiT` (mean pooling), BEiT's fine-tuning.

    Same batches, losses and `evals.top1` as the ViT classification task; only the model differs.
    """

    name = "beit_classification"
    model_class = beit.BEiT

    def train_flops_per_example(self, batch_shapes):
        return flops.TRAIN_FACTOR * flops.total(beit.forward_flops(self.model, tuple(batch_shapes["image"][1:3])))
