"""Training a Perceiver-resampler bridge (mmjax.models.resampler_lm.ResamplerLM) into a frozen decoder
LM: BLIP-2 stage 2's objective and predict functions (mmjax.tasks.blip2.Blip2Stage2Task: the LM loss
on the text after the soft prompt, `caption`, zero-shot `answer`) with Flamingo's resampler in the
Q-Former's place. Which towers are frozen is the recipe's `optimizer.freeze`. Config::

    task = "resampler_lm"
    model = dict(vision=dict(...), resampler=dict(depth=2, num_latents=16, ...), lm=dict(...))
    loss = dict(prompt_length=1)
"""

from __future__ import annotations

import ml_collections

from mmjax import flops
from mmjax.models import resampler_lm
from mmjax.tasks import blip2 as blip2_tasks

MODEL_KEYS = ("vision", "resampler", "lm", "dtype")


class ResamplerLMTask(blip2_tasks.Blip2Stage2Task):
    """Trains ResamplerLM on batches of "image" and LM-tokenized "text" (BOS first, right padding)."""

    def build_model(self, config: ml_collections.ConfigDict):
        fields = blip2_tasks.checked_keys(config.model.to_dict(), MODEL_KEYS, "model")
        if "resampler" in fields:
            fields["resampler_fields"] = fields.pop("resampler")
        return resampler_lm.ResamplerLM(**fields)

    def train_flops_per_example(self, batch_shapes):
        hw, length = tuple(batch_shapes["image"][1:3]), batch_shapes["text"][1]
        frozen = blip2_tasks.frozen_towers(self, batch_shapes)
        return flops.total(resampler_lm.train_flops(self.model, hw, length, frozen["vision_model"],
                                                    frozen["language_model"]))
