"""Contrastive image–text pretraining (CLIP / SigLIP) and its evaluators."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import flops
from mmjax.data import tokenizers
from mmjax.evaluate import retrieval, zeroshot
from mmjax.losses import contrastive
from mmjax.models import clip
from mmjax.tasks import base

LOSSES = ("clip", "siglip")


class ContrastiveTask(base.Task):
    """Trains `mmjax.models.clip.CLIP` on batches with "image" and tokenized "text"."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        loss_cfg = config.get("loss", {})
        self.loss_name = loss_cfg.get("name", "clip")
        if self.loss_name not in LOSSES:
            raise ValueError(f"Unknown contrastive loss {self.loss_name!r}; known: {LOSSES}")
        impl = loss_cfg.get("impl", "full")   # "local" (clip) / "chunked" (siglip) save memory
        if (self.loss_name, impl) not in contrastive.LOSSES:
            known = sorted(i for n, i in contrastive.LOSSES if n == self.loss_name)
            raise ValueError(f"Unknown loss.impl {impl!r} for the {self.loss_name} loss; known: {known}")
        self._loss_fn = contrastive.LOSSES[(self.loss_name, impl)]
        if impl == "chunked" and loss_cfg.get("num_chunks"):
            self._loss_fn = functools.partial(self._loss_fn, num_chunks=int(loss_cfg.num_chunks))
        model_cfg = config.model.to_dict()
        if self.loss_name == "siglip" and model_cfg.get("logit_bias_init") is None:
            raise ValueError("The siglip loss needs model.logit_bias_init (SigLIP uses -10)")
        self.model = clip.CLIP(**model_cfg)
        self.tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        context = model_cfg.get("text", {}).get("context_length", 77)
        if self.tokenizer.context_length > context:
            raise ValueError(f"Tokenizer context length {self.tokenizer.context_length} exceeds the "
                             f"text tower's context_length {context}")
        self._encode_image = jax.jit(functools.partial(self.model.apply, method="encode_image"))
        self._encode_text = jax.jit(functools.partial(self.model.apply, method="encode_text"))

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"], batch["text"])

    def loss(self, params, batch, rng):
        out = self.model.apply({"params": params}, batch["image"], batch["text"], train=True,
                               rngs={"dropout": rng})
        loss, metrics = self._loss_fn(*out)
        metrics["logit_scale"] = out[2]
        return loss, metrics

    def model_description(self, batch):
        inputs = [base.input_spec(batch["image"]), base.input_spec(batch["text"])]
        return {"module": self.model, "inputs": inputs, "params_key": None}

    def train_flops_per_example(self, batch_shapes):
        parts = flops.clip_flops(self.model, tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1],
                                 batch_size=batch_shapes["image"][0], train=True)
        return flops.TRAIN_FACTOR * flops.total(parts)

    def encode_texts(self, params, texts: list[str], batch_size: int = 256, mesh=None) -> np.ndarray:
        """Embeds strings in fixed-size chunks (one compiled shape).

        With a `mesh` the tokens are replicated over it, as params that span processes require.
        """
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tokens = self.tokenizer(chunk + [""] * (batch_size - len(chunk)))
            tokens = jnp.asarray(tokens) if mesh is None else base.put_replicated(tokens, mesh)
            emb = base.fetch(self._encode_text({"params": params}, tokens))
            out.append(np.asarray(emb)[:len(chunk)])
        return np.concatenate(out)

    def evaluate(self, params, mesh):
        metrics = {}
        evals = self.config.get("evals", {})
        if "zeroshot" in evals:
            metrics.update(self._zeroshot(params, mesh, evals.zeroshot))
        if "retrieval" in evals:
            metrics.update(self._retrieval(params, mesh, evals.retrieval))
        return metrics

    def _zeroshot(self, params, mesh, cfg):
        from mmjax.data import sources

        own = sources.class_names(cfg.data)     # folder names, data.class_names_file or TFDS's
        names = list(cfg.get("class_names") or own or [])
        if not names:
            raise ValueError(f"Zero-shot eval on {cfg.data.name} needs class names: the data set has "
                             "no 'label' ClassLabel feature or class folders; set "
                             "evals.zeroshot.class_names or evals.zeroshot.data.class_names_file")
        if own and len(own) != len(names):
            raise ValueError(f"evals.zeroshot.class_names has {len(names)} names, but the data set has "
                             f"{len(own)} classes")
        class_embs = zeroshot.class_embeddings(
            lambda texts: self.encode_texts(params, texts, mesh=mesh), names, list(cfg.templates))
        embs, labels = [], []
        encode = lambda b: self._encode_image({"params": params}, b["image"])  # noqa: E731
        for batch, emb in base.run_over_split(cfg, mesh, encode, name="evals.zeroshot"):
            embs.append(emb)
            labels.append(batch["label"])
        top1 = zeroshot.zeroshot_top1(np.concatenate(embs), np.concatenate(labels), class_embs)
        return {"zeroshot/top1": top1, "zeroshot/num_classes": len(names)}

    def _retrieval(self, params, mesh, cfg):
        def encode(b):
            return (self._encode_image({"params": params}, b["image"]),
                    self._encode_text({"params": params}, b["text"]))
        img, txt = [], []
        for _, (i, t) in base.run_over_split(cfg, mesh, encode, tokenizer=self.tokenizer,
                                                 name="evals.retrieval"):
            img.append(i)
            txt.append(t)
        recalls = retrieval.recall_at_k(np.concatenate(img), np.concatenate(txt), cfg.get("ks", (1, 5, 10)))
        return {f"retrieval/{k}": v for k, v in recalls.items()}
