"""ViLT tasks (Kim et al. 2021): pretraining with ITM + word–patch alignment + MLM, and VQA.

"vilt" (ViltPretrainTask) follows ViLT's objectives.py: two forward passes per step, as the
reference does.
* MLM: the text masked by the pp op `mlm_mask(whole_word=True)` (`mlm_input`, `mlm_labels`) with
  its true image; cross-entropy on the masked tokens.
* ITM: the unmasked text with its own image for exactly half of the batch and another image of
  the batch for the other half (a random permutation of the labels, as ViLT; ViLT draws the false
  image from the data set, here from the global batch: another example, never the pair's own);
  2-way cross-entropy on the pooled vector, plus the word–patch alignment loss (IPOT distance
  between the text tokens and the image patches, mmjax.losses.ipot) of those same pairs.
Loss = mlm + itm + 0.1 · wpa (`config.loss` = dict(mlm=1.0, itm=1.0, wpa=0.1, ipot_iterations=50)).

"vilt_vqa" (ViltVqaTask): the VQA head on the pooled vector, BCE on soft-score targets times the
number of answers (ViLT's scaling, from ban-vqa). A batch holds either `vqa_targets` (B, answers)
soft scores (VQA v2, mmjax.evaluate.vqa_score.soft_score_targets) or `answer_id` (B,) for
single-answer questions (target 1.0, e.g. the shapes questions of mmjax.data.shapes_vqa).
`config.answers`: the answer strings in head order, "shapes" (shapes_vqa.ANSWERS) or the path of
a text file with one answer per line; `model.num_answers` defaults to their number.

Both take "image" and tokenized "text"; the text mask is `text != tokenizer.pad_token_id`.
Predict functions: "vilt" image_tokens (the images: ViLT fuses raw patches) and match_tokens (the
ITM match logit); "vilt_vqa" answer (argmax answer strings). No evaluator kind ranks with ITM
alone yet (ViLT has no ITC to shortlist candidates), so the pretraining recipe has no evaluator.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import flops, paths
from mmjax.data import shapes_vqa, tokenizers
from mmjax.losses import ipot, language
from mmjax.models import vilt
from mmjax.tasks import base

PRETRAIN_LOSS = {"mlm": 1.0, "itm": 1.0, "wpa": 0.1, "ipot_iterations": 50}


def itm_pairs(rng: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """ViLT's ITM pairs for a batch of n: (labels (n,) int32 with exactly n // 2 ones in random
    order, other (n,) the batch index of the false image for each pair, never its own)."""
    rng_perm, rng_other = jax.random.split(rng)
    labels = jnp.concatenate([jnp.ones((n // 2,), jnp.int32), jnp.zeros((n - n // 2,), jnp.int32)])
    other = (jnp.arange(n) + jax.random.randint(rng_other, (n,), 1, n)) % n
    return jax.random.permutation(rng_perm, labels), other


class _ViltTask(base.Task):
    """What both ViLT tasks share: the model with the task's head, the tokenizer and the text mask."""

    head = "none"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        model_cfg = self._model_config(config.model.to_dict())
        if model_cfg.get("head", self.head) != self.head:
            raise ValueError(f"The {config.task} task trains ViLT's {self.head!r} head; remove model.head "
                             f"({model_cfg['head']!r})")
        self.model = vilt.ViLT(**{**model_cfg, "head": self.head})
        self.tokenizer = tokenizers.build_tokenizer(dict(config.input.tokenizer))
        if self.tokenizer.context_length > self.model.max_len:
            raise ValueError(f"Tokenizer context length {self.tokenizer.context_length} exceeds ViLT's "
                             f"{self.model.max_len} text positions (model.max_len)")
        if self.tokenizer.vocab_size > self.model.vocab_size:
            raise ValueError(f"The tokenizer's {self.tokenizer.vocab_size} ids do not fit ViLT's vocabulary of "
                             f"{self.model.vocab_size} (model.vocab_size)")
        self.pad_id = int(getattr(self.tokenizer, "pad_token_id", 0))

    def _model_config(self, model_cfg: dict) -> dict:
        return model_cfg

    def mask(self, tokens: jax.Array) -> jax.Array:
        """(B, L) bool: the real (non-padding) text tokens."""
        return tokens != self.pad_id

    def forward(self, params, tokens: jax.Array, images: jax.Array, *, train: bool = False,
                rng: jax.Array | None = None) -> dict:
        rngs = {"dropout": rng} if train else {}
        return self.model.apply({"params": params}, tokens, images, self.mask(tokens), train=train, rngs=rngs)

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["text"], batch["image"], self.mask(batch["text"]))

    def model_description(self, batch):
        return {"module": self.model, "inputs": [base.input_spec(batch["text"]), base.input_spec(batch["image"])],
                "params_key": None}

    def _forward_flops(self, batch_shapes, head: str) -> float:
        model = self.model.clone(head=head)
        return flops.total(vilt.forward_flops(model, batch_shapes["text"][1], tuple(batch_shapes["image"][1:3])))

    def image_tokens(self, params, images: jax.Array) -> jax.Array:
        """ViLT fuses raw patches: the images themselves are what match_tokens / answer take."""
        del params
        return images


class ViltPretrainTask(_ViltTask):
    """ViLT pretraining: whole-word MLM, ITM with in-batch false images, and word–patch alignment."""

    head = "pretrain"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        weights = dict(config.get("loss") or {})
        unknown = sorted(set(weights) - set(PRETRAIN_LOSS))
        if unknown:
            raise ValueError(f"Unknown vilt loss key(s) {unknown}; known: {sorted(PRETRAIN_LOSS)}")
        self.weights = {**PRETRAIN_LOSS, **weights}
        self._match = jax.jit(lambda params, images, tokens: self.forward(params, tokens, images)["itm_logits"][:, 1])

    def loss(self, params, batch, rng):
        for key in ("image", "text", "mlm_input", "mlm_labels"):
            if key not in batch:
                raise KeyError(f"The vilt task needs batch[{key!r}] (pp: tokenize(...)|mlm_mask(whole_word=True)); "
                               f"got {sorted(batch)}")
        text, images = batch["text"], batch["image"]
        n = text.shape[0]
        if n < 2:
            raise ValueError("ViLT's ITM draws false images from the batch: it needs at least 2 examples")
        rng_mlm, rng_itm, rng_pairs = jax.random.split(rng, 3)
        mlm_out = self.forward(params, batch["mlm_input"], images, train=True, rng=rng_mlm)
        mlm_loss, mlm_metrics = language.token_cross_entropy(mlm_out["logits"], batch["mlm_labels"])

        labels, other = itm_pairs(rng_pairs, n)
        itm_images = jnp.where(labels[:, None, None, None] == 1, images, images[other])
        itm_out = self.forward(params, text, itm_images, train=True, rng=rng_itm)
        logits = itm_out["itm_logits"]
        itm_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        length = text.shape[1]
        states = itm_out["tokens"]
        image_valid = jnp.ones(states.shape[:2], bool)[:, length:].at[:, 0].set(False)   # not the image [CLS]
        distance = ipot.ot_distance(states[:, :length], states[:, length:], ipot.text_alignment_mask(self.mask(text)),
                                    image_valid, iterations=int(self.weights["ipot_iterations"]))
        wpa = ipot.wpa_loss(distance, labels)
        w = self.weights
        loss = w["mlm"] * mlm_loss + w["itm"] * itm_loss + w["wpa"] * wpa
        return loss, {"mlm_loss": mlm_loss, "mlm_accuracy": mlm_metrics["token_accuracy"], "itm_loss": itm_loss,
                      "itm_accuracy": (logits.argmax(-1) == labels).mean(), "wpa_loss": wpa}

    def train_flops_per_example(self, batch_shapes):
        """The MLM pass (MLM head) and the ITM pass (ITM head), forward and backward; IPOT's few
        matrix-vector products per iteration are left out."""
        passes = self._forward_flops(batch_shapes, "mlm") + self._forward_flops(batch_shapes, "itm")
        return flops.TRAIN_FACTOR * passes

    def match_tokens(self, params, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
        """(B,) ITM 'match' logits (class 1) of (image i, text i); image_tokens are the images."""
        return self._match(params, image_tokens, tokens)


def load_answers(answers: str | Sequence[str]) -> list[str]:
    """The answer vocabulary of a VQA head: a list, "shapes" or a text file with one per line."""
    if isinstance(answers, str):
        if answers == "shapes":
            return list(shapes_vqa.ANSWERS)
        if not paths.isfile(answers):
            raise FileNotFoundError(f"answers: {answers!r} is neither 'shapes' nor a file of answers (one per line)")
        with paths.open(answers) as f:
            answers = [line.rstrip("\n") for line in f if line.strip()]
    answers = [str(a) for a in answers]
    if not answers or len(set(answers)) != len(answers):
        raise ValueError(f"answers must be a non-empty list of distinct strings; got {len(answers)} with "
                         f"{len(answers) - len(set(answers))} repeated")
    return answers


class ViltVqaTask(_ViltTask):
    """ViLT VQA fine-tuning: BCE on soft scores × number of answers; `answer` predicts strings."""

    head = "vqa"

    def _model_config(self, model_cfg):
        if self.config.get("answers") is None:
            raise ValueError("The vilt_vqa task needs config.answers: a list of answer strings in head order, "
                             "'shapes', or a file with one answer per line")
        self.answers = load_answers(self.config.answers)
        num = model_cfg.setdefault("num_answers", len(self.answers))
        if num != len(self.answers):
            raise ValueError(f"model.num_answers = {num} but config.answers lists {len(self.answers)} answers")
        return model_cfg

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self._logits = jax.jit(lambda params, images, tokens: self.forward(params, tokens, images)["logits"])

    def targets(self, batch) -> jax.Array:
        """(B, answers) soft-score targets: `vqa_targets`, or 1.0 at `answer_id`."""
        if "vqa_targets" in batch:
            return batch["vqa_targets"].astype(jnp.float32)
        if "answer_id" in batch:
            return jax.nn.one_hot(batch["answer_id"], self.model.num_answers, dtype=jnp.float32)
        raise KeyError(f"The vilt_vqa task needs batch['vqa_targets'] (soft scores) or batch['answer_id']; got "
                       f"{sorted(batch)}")

    def loss(self, params, batch, rng):
        targets = self.targets(batch)
        logits = self.forward(params, batch["text"], batch["image"], train=True, rng=rng)["logits"]
        loss = optax.sigmoid_binary_cross_entropy(logits, targets).mean() * targets.shape[-1]
        score = jnp.take_along_axis(targets, logits.argmax(-1)[:, None], axis=-1).mean()   # ViLT's VQAScore
        return loss, {"vqa_score": score}

    def train_flops_per_example(self, batch_shapes):
        return flops.TRAIN_FACTOR * self._forward_flops(batch_shapes, "vqa")

    def answer(self, params, images: jax.Array, tokens: jax.Array) -> list[str]:
        """The highest-scoring answer string to each tokenized question."""
        best = np.asarray(jax.device_get(self._logits(params, images, tokens).argmax(-1)))
        return [self.answers[i] for i in best]

