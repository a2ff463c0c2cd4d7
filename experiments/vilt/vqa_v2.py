"""ViLT-B/32 VQA v2 fine-tune (Kim et al. 2021, Sec. 4.2; dandelin/ViLT vilt/config.py
`task_finetune_vqa`, objectives.py `compute_vqa`).

Recipe: the pretrained ViLT (200k steps, experiments/vilt/pretrain_4m.py, or transformers'
dandelin/vilt-b32-mlm converted by `mmjax-convert --from hf`) with a fresh VQA head on the pooled
vector (dense 2×768, LayerNorm, GELU, dense to the answers); BCE on VQA v2's soft scores (from
the 10 annotators' answers, pp op `vqa_targets`) times the number of answers. ViLT's answer list
has 3,129 answers (`:answers=PATH`, one per line in head order; the head's size is read from it).
AdamW lr 1e-4, wd 0.01, batch 256, 10 epochs, warmup 10%, linear decay to 0, dropout 0.1, images
384, questions up to 40 tokens. Evaluation: the vqa evaluator's VQA v2 soft score on held-out
questions (test-dev needs the evaluation server).

The head learns at 10× the rate (ViLT's lr_mult for `vqa_classifier`: `optimizer.lr_multipliers`).
Deviations: images are resized to 384×384 (ViLT: shorter side 384, longer ≤ 640).
Data format: `data=dict(name="vqa_folder", image_dir=..., questions=...)`, a JSONL line per
question {"image": path, "question": str, "answers": [10 annotator answers]}, as
experiments/blip/vqa_v2.py. The step count assumes VQA v2 train + val (443,757 + 214,354
questions), which ViLT trains on less a 1,000-image minival [not re-checked].

Expected: VQAv2 test-dev 71.26 (ViLT-B/32, 200k pretraining steps) [paper, Table 2].
Hardware and time: ViLT fine-tunes on 8 V100s [paper; not re-checked].
  mmjax-train --config experiments/vilt/vqa_v2.py:init=models/vilt_b32_mlm,vocab=models/vilt_b32_mlm/vocab.txt,answers=/data/vqa/answers_3129.txt,image_dir=/data/coco,questions=/data/vqa/trainval.jsonl,test_questions=/data/vqa/minival.jsonl --workdir runs/vilt_vqa
  mmjax-train --config experiments/vilt/vqa_v2.py:smoke=True --workdir /tmp/smoke_vilt_vqa
"""

import ml_collections

from mmjax import configs, smoke

QUESTIONS = 443_757 + 214_354      # VQA v2 train + val
BATCH, EPOCHS = 256, 10
STEPS = EPOCHS * QUESTIONS // BATCH
IMAGE, TEXT_LEN = 384, 40
# A pretrained ViLT (vilt workdir or converted model directory) -> the VQA model: a fresh head.
FROM_PRETRAINED = dict(fresh=[r"vqa_head/.*"], drop=[r"lm_head/.*", r"itm_head/.*", r"retrieval_head/.*"])


def get_config(arg=None):
    arg = configs.parse_arg(arg, init=None, vocab=None, answers=None, image_dir=None, questions=None,
                            test_questions=None, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "vilt_vqa"
    c.seed = 0
    c.total_steps = STEPS
    c.answers = arg.answers
    c.model = dict(variant="B/32", image_size=IMAGE, vocab_size=30_522, max_len=TEXT_LEN, ln_eps=1e-12,
                   dropout=0.1, dtype="bfloat16")
    if arg.init:
        c.init = dict(source=arg.init, **FROM_PRETRAINED)
    c.input = dict(
        data=dict(name="vqa_folder", image_dir=arg.image_dir, questions=arg.questions),
        batch_size=BATCH,
        pp=f"decode|resize({IMAGE})|value_range(-1,1)|tokenize(key='question',out='text')"
           f"|vqa_targets(answer_list={arg.answers!r})|keep('image','text','vqa_targets')",
        tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=TEXT_LEN),
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                       lr_multipliers=((r"^vqa_head/", 10.0),))
    c.schedule = dict(lr=1e-4, warmup_steps=STEPS // 10, decay="linear", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=2_000, keep=2)
    c.evals = dict(every_steps=QUESTIONS // BATCH, vqa=dict(
        kind="vqa", data=dict(name="vqa_folder", image_dir=arg.image_dir, questions=arg.test_questions),
        pp=f"decode|resize({IMAGE})|value_range(-1,1)|tokenize(key='question',out='text')|keep('image','text','answers')",
        batch_size=256, max_examples=None, answers_key="answers"))
    if arg.smoke:   # a few steps of a tiny ViLT on generated shapes questions (mmjax.data.shapes_vqa)
        c.answers = "shapes"
        c.model = dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, image_size=32,
                       vocab_size=256, max_len=16, ln_eps=1e-12)
        c.input.tokenizer = dict(name="shapes_wordpiece", context_length=16)
        question = "resize(32)|value_range(-1,1)|shapes_question|tokenize(key='question',out='text')"
        smoke.shapes_input(c, f"{question}|keep('image','text','answer_id')", batch_size=8)
        smoke.shapes_eval(c.evals.vqa, f"{question}|keep('image','text','answer')", 8)
        c.evals.vqa.answers_key = "answer"
        smoke.short_run(c)
    return c
