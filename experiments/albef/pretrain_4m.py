"""ALBEF pretraining on the 4M (or 14M) image-text pairs, paper recipe (Li et al. 2021, Sec. 4-5;
RECIPES.md §6; salesforce/ALBEF configs/Pretrain.yaml, config_bert.json, Pretrain.py).

Model (mmjax/models/albef.py): ViT-B/16 at 256 px (DeiT layout, LayerNorm eps 1e-6) and BERT-base
(vocab 30,522) whose layers 0-5 encode text and 6-11 fuse it with the image by cross-attention;
MLM head tied to the word embeddings, 256-d ITC projections, ITM head, learned temperature 0.07
(clamped to [0.001, 0.5]). Objectives (mmjax/tasks/albef.py): ITC against a momentum model (EMA
0.995) and queues of 65,536 embeddings, momentum distillation α 0.4 ramped linearly over the
first epoch; ITM on hard negatives drawn from the ITC similarities; MLM 15% (80/10/10) with the
momentum model's soft labels; loss = mlm + itc + itm. AdamW lr 1e-4, wd 0.02, batch 512 (64 × 8
GPUs), 30 epochs, cosine decay to 1e-5 after 2,000 warm-up iterations (Pretrain.py: 20 × 100;
the paper's text says 1,000). Text: at most 30 WordPiece tokens (ALBEF truncates captions to 30).

Deviations: the warm-up starts at 0, not ALBEF's warmup_lr 1e-5; the image encoder and BERT start
from random weights here (ALBEF loads DeiT-B/16 and bert-base-uncased; convert them with
mmjax-convert and warm-start with --config.init, or resume from an official checkpoint through
mmjax.convert.albef.to_train_state); images are resized to 256×256 with a random flip instead of
ALBEF's RandomResizedCrop(0.2-1.0) + RandAugment; hard negatives are drawn from the global batch
(ALBEF: per GPU); bf16 compute with fp32 parameters instead of fp32 everywhere.

`:data=14m` sets the 14M pair count (CC12M added); `:pairs=N` counts a local copy. The tokenizer
is bert-base-uncased's vocab.txt (`:vocab=PATH`; nothing is downloaded).

Expected: ALBEF-4M fine-tuned COCO retrieval TR@1 73.1 / IR@1 56.8; ALBEF-14M VQAv2 test-dev 75.84,
COCO TR@1 77.6 / IR@1 60.7 [paper, Tables 2-4]. Hardware: 8 A100 GPUs [paper, Sec. 5]. The queue
must be a multiple of the global batch: 65,536 = 128 × 512.
  mmjax-train --config experiments/albef/pretrain_4m.py:image_dir=/data/4m,captions=/data/4m/captions.jsonl,vocab=/data/bert-base-uncased/vocab.txt --workdir runs/albef_4m
  mmjax-train --config experiments/albef/pretrain_4m.py:data=14m,image_dir=/data/14m,captions=/data/14m/captions.jsonl,vocab=/data/bert-base-uncased/vocab.txt --workdir runs/albef_14m
  mmjax-train --config experiments/albef/pretrain_4m.py:smoke=True --workdir /tmp/smoke_albef_4m
"""

import ml_collections

from mmjax import configs, smoke

PAIRS = {"4m": 5_100_000, "14m": 14_100_000}   # nominal caption counts; `:pairs=N` counts your copy
BATCH = 512
EPOCHS = 30
IMAGE = 256
TEXT_LEN = 30
PP_TRAIN = (f"decode|resize({IMAGE})|flip_lr|normalize('clip')|tokenize(key='caption',out='text')"
            "|mlm_mask(prob=0.15,key='text')|keep('image','text','mlm_input','mlm_labels')")


def get_config(arg=None):
    arg = configs.parse_arg(arg, data="4m", pairs=0, image_dir=None, captions=None, vocab=None, smoke=False)
    if arg.data not in PAIRS:
        raise ValueError(f"data must be one of {sorted(PAIRS)}, got {arg.data!r}")
    pairs = arg.pairs or PAIRS[arg.data]
    steps_per_epoch = pairs // BATCH
    c = ml_collections.ConfigDict()
    c.task = "albef"
    c.seed = 0
    c.total_steps = EPOCHS * steps_per_epoch
    c.model = dict(
        embed_dim=256, temperature_init=0.07, dtype="bfloat16",
        vision=dict(variant="B/16", scan=True, remat_policy="dots_no_batch"),
        text=dict(variant="base", vocab_size=30_522, max_len=512, cross_attention_from=6, dropout=0.1,
                  scan=True, remat_policy="dots_no_batch"),
    )
    c.momentum = dict(decay=0.995, queue_size=65_536, alpha=0.4, alpha_warmup_steps=steps_per_epoch)
    c.input = dict(
        data=dict(name="folder", image_dir=arg.image_dir, captions=arg.captions),
        batch_size=BATCH,
        pp=PP_TRAIN,
        tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=TEXT_LEN),
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.02)
    c.schedule = dict(lr=1e-4, warmup_steps=2_000, decay="cosine", end_lr=1e-5)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=0)
    if arg.smoke:   # a few steps of a tiny ALBEF on the embedded shapes captions
        c.model = dict(embed_dim=16,
                       vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                       text=dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=198, max_len=16,
                                 cross_attention_from=1, dropout=0.0))
        c.input.tokenizer = dict(name="shapes_wordpiece", context_length=16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')"
                              "|mlm_mask(prob=0.15,key='text')|keep('image','text','mlm_input','mlm_labels')")
        c.momentum.update(queue_size=4 * c.input.batch_size, alpha_warmup_steps=2)
        smoke.short_run(c, steps=4, log_every=2)
    return c
