"""ViLT-B/32 pretraining on the 4M image–text pairs, paper recipe (Kim et al. 2021, Sec. 4.1; RECIPES.md §5;
dandelin/ViLT vilt/config.py `task_mlm_itm whole_word_masking=True step200k`).

Model: ViT-B/32 (768 wide, 12 layers, 12 heads, MLP 3072, pre-LN, LayerNorm eps 1e-12) over
BERT-base embeddings (vocab 30,522, 40 text positions) and 384-px images, with modality-type
embeddings; heads: BERT's MLM head tied to the word embeddings and the 2-way ITM head on the
pooler; dropout 0.1. Objectives (mmjax/tasks/vilt.py): whole-word MLM 15% (80/10/10) on the true
image, and ITM with half of the images replaced plus word–patch alignment by IPOT (β 0.5, 50
iterations, weight 0.1) on unmasked text. AdamW lr 1e-4, wd 0.01, batch 4096, 200k steps (`:steps=100000`
for the 100k model), warmup 10%, linear decay to 0.

Deviations: ViLT initialises the transformer from timm's IN-21k ViT-B/32@384 (`:init=DIR`, a
model directory of it converted by mmjax-convert; the text embeddings, modality embeddings, pooler
and heads start fresh); images are resized to 384×384 (144 patches; ViLT keeps the aspect ratio,
shorter side 384, longer ≤ 640, and samples at most 200 patches per image); ITM's false images
come from the global batch, not from the whole data set; fp32 parameters with bf16 compute instead
of fp16 AMP. The tokenizer is bert-base-uncased's vocab.txt (`:vocab=PATH`; nothing is downloaded).

Expected: VQAv2 test-dev 71.26 after fine-tuning the 200k-step model (experiments/vilt/vqa_v2.py)
[paper, Table 2]. Hardware and time: about 3 days on 64 V100s (fp16) [paper, Sec. 4.1].
  mmjax-train --config experiments/vilt/pretrain_4m.py:image_dir=/data/4m,captions=/data/4m/captions.jsonl,vocab=/data/bert-base-uncased/vocab.txt,init=/models/vit_b32_384_in21k --workdir runs/vilt_4m
  mmjax-train --config experiments/vilt/pretrain_4m.py:smoke=True --workdir /tmp/smoke_vilt_4m
"""

import ml_collections

from mmjax import configs, smoke

BATCH = 4096
TEXT_LEN = 40
IMAGE = 384
# timm's ViT (converted) -> ViLT: same encoder layout; ViLT's own embeddings and heads start fresh.
FROM_VIT = dict(rules=[(r"patch_embed/(.*)", r"embedding/\1"), (r"pos_embedding", r"posemb/pos_embedding"),
                       (r"ln_final/(.*)", r"norm/\1")],
                fresh=[r"text_embeddings/.*", r"modality_embedding/.*", r"pooler/.*", r"lm_head/.*", r"itm_head/.*"],
                drop=[r"head/.*"])


def get_config(arg=None):
    arg = configs.parse_arg(arg, steps=200_000, image_dir=None, captions=None, vocab=None, init=None, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "vilt"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(variant="B/32", image_size=IMAGE, vocab_size=30_522, max_len=TEXT_LEN, ln_eps=1e-12,
                   dropout=0.1, dtype="bfloat16", scan=True, remat_policy="dots_no_batch")
    c.loss = dict(mlm=1.0, itm=1.0, wpa=0.1, ipot_iterations=50)
    c.input = dict(
        data=dict(name="folder", image_dir=arg.image_dir, captions=arg.captions),
        batch_size=BATCH,
        pp=f"decode|resize({IMAGE})|value_range(-1,1)|tokenize(key='caption',out='text')"
           "|mlm_mask(prob=0.15,whole_word=True)|keep('image','text','mlm_input','mlm_labels')",
        tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=TEXT_LEN),
        worker_count=0,
    )
    if arg.init:
        c.init = dict(source=arg.init, **FROM_VIT)
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    c.schedule = dict(lr=1e-4, warmup_steps=arg.steps // 10, decay="linear", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=0)
    if arg.smoke:   # a few steps of a tiny ViLT on the embedded shapes captions
        c.model = dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, image_size=32,
                       vocab_size=256, max_len=16, ln_eps=1e-12)
        c.loss.ipot_iterations = 5
        c.input.tokenizer = dict(name="shapes_wordpiece", context_length=16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')"
                              "|mlm_mask(prob=0.15,whole_word=True)|keep('image','text','mlm_input','mlm_labels')")
        smoke.short_run(c, steps=4, log_every=2)
    return c
