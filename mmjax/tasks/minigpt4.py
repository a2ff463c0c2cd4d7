"""MiniGPT-4 training (Zhu et al. 2023; Vision-CAIR/MiniGPT-4 minigpt4/models/mini_gpt4.py):
mmjax.models.minigpt4.MiniGPT4 with everything but `language_projection` frozen by the recipe.

Stage 1 (image-text pairs) has no prompt: [BOS, image queries, caption + "\n"]. Stage 2 (curated
descriptions) wraps the image in a prompt drawn at random for each batch, as the official code, from
`prompt.instructions` formatted into `prompt.template`:
"###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: " then the
description + "###". The end symbol is appended by the pipeline (`tokenize(..., suffix='###')`),
and the tokenizer adds no BOS to the text (`add_bos=False`: the model puts one before the prompt).
The loss is the LM's next-token cross-entropy on the text alone. Config::

    task = "minigpt4"
    model = dict(vision=dict(...), qformer=dict(...), lm=dict(variant="vicuna-7b"))
    prompt = dict(template="###Human: {} ###Assistant: ", instructions=["<Img><ImageHere></Img> ...", ...])

All instructions are tokenized once and left-padded to one length (padding is masked and positions
count real tokens, so it changes nothing): one compiled step serves them all. Predict function:
`caption` answers the first instruction (greedy by default), which needs a prompt after the image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.models import minigpt4
from mmjax.tasks import blip2 as blip2_tasks

MODEL_KEYS = ("vision", "qformer", "lm", "dtype")
PROMPT_KEYS = ("template", "instructions")


def _left_padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, True
    return ids, mask


class MiniGPT4Task(blip2_tasks.LMBridgeTask):
    """Trains MiniGPT4 on batches of "image" and LM-tokenized "text" (no BOS; right padding)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        bos = self.bos_token_id
        if bos is None:
            raise ValueError("input.tokenizer has no begin-of-sequence token for MiniGPT-4's BOS")
        fields = blip2_tasks.model_fields(config, MODEL_KEYS)
        self.model = minigpt4.MiniGPT4(**fields, bos_token_id=int(bos))
        blip2_tasks.check_vocab(self.tokenizer, self.model)
        prompt = blip2_tasks.checked_keys(dict(config.get("prompt") or {}), PROMPT_KEYS, "prompt")
        template, instructions = prompt.get("template", "{}"), list(prompt.get("instructions") or [])
        if "{}" not in template:
            raise ValueError(f"prompt.template must hold '{{}}' for the instruction, got {template!r}")
        sides = [minigpt4.split_prompt(template.format(i)) for i in instructions]
        encode = lambda text: self.tokenizer.encode(text)        # noqa: E731 (no special tokens)
        self.prompts = None
        if sides:
            pad = self.tokenizer.pad_token_id
            before, after = (_left_padded([encode(s[k]) for s in sides], pad) for k in (0, 1))
            self.prompts = {"before": before[0], "before_mask": before[1], "after": after[0], "after_mask": after[1]}

    def _prompt(self, index) -> dict:
        if self.prompts is None:
            return {}
        return {k: jnp.asarray(v)[index][None] for k, v in self.prompts.items()}

    def init_variables(self, rng, batch):
        text = jnp.asarray(batch["text"])
        return self.model.init({"params": rng}, batch["image"], text, self.mask(text), **self._prompt(0))

    def loss(self, params, batch, rng):
        text = jnp.asarray(batch["text"])
        mask = self.mask(text)
        choice_rng, dropout_rng = jax.random.split(rng)
        count = 0 if self.prompts is None else len(self.prompts["before"])
        prompt = self._prompt(jax.random.randint(choice_rng, (), 0, max(count, 1)))
        out = self.model.apply({"params": params}, batch["image"], text, mask, **prompt, train=True,
                               rngs={"dropout": dropout_rng})
        loss, metrics = minigpt4.lm_loss(out["logits"], text, mask)
        return loss, {"lm_loss": loss, "token_accuracy": metrics["token_accuracy"]}

    def _prompt_length(self) -> int:
        if self.prompts is None:
            return 1
        return 1 + self.prompts["before"].shape[1] + self.prompts["after"].shape[1]

    def train_flops_per_example(self, batch_shapes):
        return self._train_flops(batch_shapes, other_tokens=self._prompt_length())

    def caption(self, params, images: jax.Array, settings: dict | None = None) -> jax.Array:
        """(B·num_return_sequences, L) int32 ids answering the first instruction (settings:
        GenerationConfig fields; greedy by default); generation stops at the tokenizer's EOS and at
        the end symbol "###", as the official demo (padding from it on)."""
        if self.prompts is None:
            raise ValueError("MiniGPT-4 captions answer a prompt: set prompt.instructions (stage 2's template)")
        settings = dict(settings or {})
        settings.setdefault("max_new_tokens", self.tokenizer.context_length)
        config = self._generation_config(settings)
        ends = minigpt4.end_sequences(self.tokenizer)
        single = tuple(seq[0] for seq in ends if len(seq) == 1)
        if single:          # a one-id "###" stops the rows; longer spellings are cut afterwards
            config = config.replace(eos_token_id=tuple(config.eos_token_id or ()) + single)
        prompt = {k: jnp.broadcast_to(v, (images.shape[0], v.shape[-1])) for k, v in self._prompt(0).items()}
        out = minigpt4.chat(self.model, {"params": params}, images, prompt["after"], config,
                            before=prompt["before"], before_mask=prompt["before_mask"], after_mask=prompt["after_mask"],
                            generator=self._generator(config.total_length(prompt["after"].shape[1])))
        ids = np.asarray(out.generated).astype(np.int32)
        return jnp.asarray(minigpt4.cut_at_end(ids, ends, self.tokenizer.pad_token_id))
