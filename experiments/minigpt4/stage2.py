"""MiniGPT-4 stage 2: the stage-1 model fine-tuned on ≈3.5k curated detailed descriptions inside its
conversation template (Zhu et al. 2023, Sec. 3.2; Vision-CAIR/MiniGPT-4 train_configs/minigpt4_stage2_finetune.yaml,
prompts/alignment.txt).

Recipe [repo; ../shared/RECIPES.md §13]: only `llama_proj` (language_projection) trains. Each batch draws one
instruction, "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", and the loss scores the
description + "###". lr 3e-5 after 200 warmup steps, cosine to 1e-5, 5 epochs × 200 iterations = 1,000 steps,
batch 12, text up to 160 tokens, weight decay 0.05. Data: cc_sbu_align (image + detailed description).
Differences here:
* `init=DIR` is the stage-1 run's workdir or a converted MiniGPT-4 directory (nothing fresh).
* Batch 12 splits over 4 data-parallel devices; the other devices (a multiple of 4 in all) split the
  frozen Vicuna's heads and MLP (`tensor`).
* Generation stops at the tokenizer's EOS and at "###", as the official demo (a one-id "###" ends decoding, the two-id
  spelling is cut from the answer afterwards).
* As stage 1: per-step cosine, warmup from 0; `vocab=shapes` stands in for Vicuna's tokenizer.model.

Expected: qualitative (detailed, fluent descriptions and conversation; the paper has no benchmark number).
  mmjax-train --config experiments/minigpt4/stage2.py:image_dir=/data/cc_sbu_align/image,captions=/data/cc_sbu_align/filter_cap.jsonl,vocab=models/vicuna-13b/tokenizer.model,init=runs/minigpt4_stage1 --workdir runs/minigpt4_stage2
  mmjax-train --config experiments/minigpt4/stage2.py:smoke=True --workdir /tmp/smoke_minigpt4_stage2
"""

import os

from mmjax import configs
from mmjax.models import minigpt4

BATCH = 12
STEPS = 1_000
TEXT_LEN = 160
INSTRUCTIONS = ("<Img><ImageHere></Img> Describe this image in detail.",
                "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
                "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
                "<Img><ImageHere></Img> Could you describe the contents of this image for me?")
PP_TRAIN = ("decode|resize(224, method='bicubic')|normalize('clip')"
            f"|tokenize(key='caption',out='text',suffix='{minigpt4.END_SYMBOL}')|keep('image','text')")


def get_config(arg=None):
    arg = configs.parse_arg(arg, lm="vicuna-13b", image_dir=None, captions=None, vocab=None, init=None, smoke=False)
    stage1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1.py")
    vocab = f",vocab={arg.vocab}" if arg.vocab else ""
    c = configs.load_config(f"{stage1}:lm={arg.lm}{vocab},smoke={arg.smoke}")   # model, tokenizer, freezing
    with c.unlocked():
        c.prompt = dict(template=minigpt4.STAGE2_TEMPLATE, instructions=list(INSTRUCTIONS))
        if arg.smoke:       # stage 1's tiny smoke run, with the template
            return c
        c.total_steps = STEPS
        c.input.data = dict(name="folder", image_dir=arg.image_dir, captions=arg.captions)
        c.input.batch_size = BATCH
        c.mesh = [("data", 4), ("fsdp", 1), ("tensor", -1)]   # 12 splits 4 ways; the rest shards the LM's heads
        c.sharding = "fsdp_tp"
        c.input.pp = PP_TRAIN
        c.input.tokenizer.context_length = TEXT_LEN
        c.init = dict(source=arg.init) if arg.init else None
        c.schedule = dict(lr=3e-5, warmup_steps=200, decay="cosine", end_lr=1e-5)
        c.checkpoint = dict(every_steps=200, keep=2)
        c.log_every_steps = 20
    return c
