"""Tasks by name: the trainer builds one from `config.task`."""

from __future__ import annotations

import ml_collections

from mmjax.tasks.base import Task

_TASKS = {
    "classification": "mmjax.tasks.classification:ClassificationTask",
    "contrastive": "mmjax.tasks.contrastive:ContrastiveTask",
    "contrastive_momentum": "mmjax.tasks.momentum_contrastive:MomentumContrastiveTask",
    "mae": "mmjax.tasks.mae:MAETask",
    "beit": "mmjax.tasks.beit:BEiTTask",
    "beit_classification": "mmjax.tasks.beit:BEiTClassificationTask",
    "vilt": "mmjax.tasks.vilt:ViltPretrainTask",
    "vilt_vqa": "mmjax.tasks.vilt:ViltVqaTask",
    "albef": "mmjax.tasks.albef:AlbefPretrainTask",
    "blip": "mmjax.tasks.blip:BlipPretrainTask",
    "blip_retrieval": "mmjax.tasks.blip_retrieval_finetune:BlipRetrievalTask",
    "blip_caption": "mmjax.tasks.blip_finetune:BlipCaptionTask",
    "blip_vqa": "mmjax.tasks.blip_finetune:BlipVqaTask",
    "blip2_stage1": "mmjax.tasks.blip2:Blip2Stage1Task",
    "blip2_stage2": "mmjax.tasks.blip2:Blip2Stage2Task",
    "blip2_stage2_t5": "mmjax.tasks.blip2_t5:Blip2Stage2T5Task",
    "minigpt4": "mmjax.tasks.minigpt4:MiniGPT4Task",
    "causal_lm": "mmjax.tasks.causal_lm:CausalLMTask",
    "resampler_lm": "mmjax.tasks.resampler_lm:ResamplerLMTask",
}


def get_task(config: ml_collections.ConfigDict) -> Task:
    """Builds the task named by `config.task`, and checks that it can serve every evaluator of
    `config.evals` (a retrieval evaluator on a classifier fails here, not after training)."""
    if config.task not in _TASKS:
        raise ValueError(f"Unknown task {config.task!r}; known: {sorted(_TASKS)}")
    import importlib

    from mmjax.evaluate import runner

    module, cls = _TASKS[config.task].split(":")
    task = getattr(importlib.import_module(module), cls)(config)
    runner.check(task)
    return task
