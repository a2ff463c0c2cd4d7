"""A tiny LLaMA-structured language model pretrained on the embedded shapes text: the frozen LM that the
bridge demos on shapes (experiments/blip2/shapes_stage2.py, experiments/minigpt4/shapes.py,
experiments/perceiver/shapes.py) plug images into, as BLIP-2 plugs its Q-Former into OPT.

Its documents are a shapes caption followed by either a question about the same image and its
answer, "<caption> question: <question> answer: <answer>" (the question from mmjax/data/shapes_vqa.py),
or another caption of the same scene (the `shapes_caption` pp op), one drawn per document. So the LM
learns to write captions and to answer questions from what the text before them says, which is what a
frozen LLM brings to BLIP-2: a soft prompt then stands in for that earlier text. (With documents of a caption
and a question alone, no caption ever follows other text: bridges into such an LM passed next to
nothing of the image into its captions in our runs; see the README.) Word tokenizer over the caption and question words (94 ids),
documents of at most 40 tokens.

Model: RMSNorm, rotary positions, SwiGLU (mmjax.models.decoder_lm, kind "llama"), 128 wide, 2 layers,
4 heads. AdamW, lr 2e-3 with a cosine decay, 1,000 steps of 64 documents.
  mmjax-train --config experiments/lm/shapes.py --workdir runs/lm_shapes
  mmjax-train --config experiments/lm/shapes.py:smoke=True --workdir /tmp/smoke_lm_shapes
"""

import ml_collections

from mmjax import configs, shapes_bridges, smoke

DOCUMENT = "format(['{caption} question: {question} answer: {answer}', '{caption} {caption2}'], out='document')"
PP = (f"shapes_question(out='question')|shapes_caption(out='caption2')|{DOCUMENT}"
      "|tokenize(key='document',out='text')|keep('text')")


def get_config(arg=None):
    arg = configs.parse_arg(arg, steps=1000, batch=64, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "causal_lm"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(shapes_bridges.LM)
    c.input = dict(data=dict(name="mmjax_shapes", split="train"), batch_size=arg.batch, pp=PP,
                   tokenizer=dict(shapes_bridges.LM_TOKENIZER), worker_count=0)
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0)
    c.schedule = dict(lr=2e-3, warmup_steps=50, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50
    c.checkpoint = dict(every_steps=500, keep=1)
    c.evals = dict(every_steps=0)
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
        c.input.batch_size = 16
    return c
