"""BLIP VQA fine-tune on VQA v2 (Li et al. 2022, Sec. 5.3; the official configs/vqa.yaml,
train_vqa.py and models/blip_vqa.py).

Recipe: BlipQuestionAnswering (ViT-B/16 at 480 pixels; the image-grounded question encoder and
an answer decoder cross-attending to the question), started from a BLIP checkpoint; the answer
decoder's LM loss (label smoothing 0.1) on every answer of a question, weighted by its share of
the annotators (10 answers at 0.1 each = BLIP's per-unique-answer frequency weights), summed per
question and averaged over questions (mmjax/tasks/blip_finetune.py). AdamW, weight decay 0.05, lr
2e-5 on a cosine to 0 over 10 epochs, batch 16 per GPU on 8 GPUs = 128. Training data: VQA v2
train + val and Visual Genome QA (BLIP's train_files). Questions up to 35 tokens.

Data format: `data=dict(name="vqa_folder", image_dir=..., questions=...)`, a JSONL with one line
per question {"image": path, "question": str, "answers": [10 annotator answers]} (a source mmjax
does not have yet: the recipe names the format it expects). Evaluation: the vqa evaluator's VQA
v2 soft score on held-out questions (test-dev needs the evaluation server).

Deviations: answers are generated (beam 3, ≤ 10 tokens) rather than ranked over the 3,128
candidate answers of the official evaluation (`inference: 'rank'`, k_test 128); mmjax's
timm-style RandAugment op set; a per-step cosine (BLIP: per epoch).

Initialisation (`init_from`): a model directory converted from transformers
(`mmjax-convert --from hf Salesforce/blip-vqa-base`, say) or a blip_vqa workdir; `vocab` its BERT
vocab.txt / tokenizer.json. Expected: VQA v2 test-dev 78.25 (ViT-B, 129M, CapFilt-L) [paper, via
RECIPES.md §7]; 77.54 (ViT-B, 14M) [paper Table 8; not re-checked]. Hardware: 8 A100s.
  mmjax-train --config experiments/blip/vqa_v2.py:init_from=models/blip_vqa_base,vocab=models/blip_vqa_base/vocab.txt,image_dir=/data/coco,questions=/data/vqa/train.jsonl,test_questions=/data/vqa/val.jsonl --workdir runs/blip_vqa
  mmjax-train --config experiments/blip/vqa_v2.py:smoke=True --workdir /tmp/smoke_blip_vqa
"""

import ml_collections

from mmjax import configs, smoke

TRAIN_PP = ("decode|inception_crop(480, area_min=0.5, method='bicubic')|flip_lr"
            "|randaugment(num_layers=2, magnitude=5, magnitude_std=0.0)|normalize('clip')"
            "|tokenize(key='question',out='text')|tokenize(key='answers',out='answer_tokens')"
            "|keep('image','text','answer_tokens')")
EVAL_PP = ("decode|resize(480, method='bicubic')|normalize('clip')|tokenize(key='question',out='text')"
           "|keep('image','text','answers')")
GENERATION = dict(num_beams=3, max_length=10, min_length=1)


def get_config(arg=None):
    arg = configs.parse_arg(arg, init_from=None, vocab=None, image_dir=None, questions=None, test_questions=None,
                            epochs=10, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "blip_vqa"
    c.seed = 0
    c.num_epochs = arg.epochs
    c.model = dict(vision=dict(variant="B/16"), text=dict(), dtype="bfloat16")
    c.vqa = dict(bos_token_id=30522, enc_token_id=None, label_smoothing=0.1, generation=GENERATION)
    c.init = dict(source=arg.init_from)
    c.input = dict(
        data=dict(name="vqa_folder", image_dir=arg.image_dir, questions=arg.questions),
        batch_size=128, pp=TRAIN_PP,
        tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=35),
        worker_count=16,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=None)
    c.schedule = dict(lr=2e-5, warmup_steps=0, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=0, vqa=dict(
        kind="vqa", data=dict(name="vqa_folder", image_dir=arg.image_dir, questions=arg.test_questions),
        pp=EVAL_PP, batch_size=256, max_examples=None, answers_key="answers"))
    if arg.smoke:   # a few steps of a tiny model on generated shapes questions (mmjax.data.shapes_vqa)
        smoke.short_run(c)
        c.model = dict(vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                       text=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=199,
                                 max_len=64), dtype="float32")
        c.vqa.bos_token_id = 198    # one id past the shapes WordPiece vocabulary
        c.input.tokenizer = dict(name="shapes_wordpiece", context_length=16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|shapes_question|tokenize(key='question',out='text')"
                              "|tokenize(key='answer',out='answer_tokens')|keep('image','text','answer_tokens')",
                           batch_size=8)
        smoke.shapes_eval(c.evals.vqa, "resize(32)|value_range(-1,1)|shapes_question"
                                       "|tokenize(key='question',out='text')|keep('image','text','answer')", 8)
        c.evals.vqa.answers_key = "answer"
    return c
