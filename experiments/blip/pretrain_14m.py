"""BLIP pretraining, ViT-B/16 on 14M or 129M image-text pairs (Li et al. 2022, Sec. 4.1; salesforce/BLIP
configs/pretrain.yaml, configs/med_config.json, models/blip_pretrain.py, pretrain.py).

Recipe [paper and repo; ../shared/RECIPES.md §7]: ViT-B/16 at 224 px and a BERT-base multimodal
mixture of encoder-decoder (vocab 30,522 + [DEC], [ENC]; the decoder shares all but self-attention),
ITC against a momentum model (0.995) with queues of 57,600 and momentum distillation α 0.4
(ramped linearly over the first 2 epochs, BLIP's pretrain.py), ITM on hard negatives, LM with label
smoothing 0.1; embed 256, temperature 0.07 learned in [0.001, 0.5]; text truncated at 30 tokens.
AdamW, weight decay 0.05, lr 3e-4 after a 3,000-step linear warmup, 20 epochs, global batch 2,880
(paper, ViT-B; the repo's config says 75 per GPU). Augmentation: random resized crop 224 with
scale 0.2-1.0 (bicubic), horizontal flip, RandAugment(2, 5); CLIP's mean/std.
Differences here:
* lr schedule: BLIP decays the lr stepwise, lr = 3e-4 · 0.9^epoch (code; paper 0.85). mmjax.optim
  offers cosine / linear decays, so this is a cosine from 3e-4 to 3e-4 · 0.9^19 ≈ 4.05e-5 (the
  last epoch's lr) over the 20 epochs: the same end points, a higher lr mid-run (mean 0.57 of
  the peak against 0.44 for the steps).
* Initialisation: BLIP starts the ViT from DeiT-B/16 ImageNet weights and the text towers from
  bert-base-uncased. Here both are random unless warm-started (convert those checkpoints with
  mmjax-convert first); expect lower numbers from scratch.
* bf16 compute and scanned, rematerialised layers are not used: the decoder shares the encoder's
  layers by name (BlipPretrain refuses scan=True).
* CapFilt (the 129M set's bootstrapped captions) is a separate data-preparation step; point
  `captions=` at the filtered JSONL.

Data (nothing is downloaded): `data=14m` (COCO, Visual Genome, CC3M, CC12M, SBU; about 14M
images) or `data=129m` (+115M LAION-400M images), as a folder with a captions JSONL
(`image_dir=`, `captions=`) or webdataset shards (`shards=/data/{00000..09999}.tar`);
`pairs=N` counts your local copy. The tokenizer is bert-base-uncased's vocab.txt (`vocab=PATH`),
and the model vocabulary is its size + 2.

Expected [paper, as ../shared/RECIPES.md §7 quotes it]: after fine-tuning, ViT-B (129M, CapFilt-L)
VQAv2 test-dev 78.25; ViT-L 129M COCO TR@1 82.4 / IR@1 65.1 (the 14M ViT-B lands below these).
  mmjax-train --config experiments/blip/pretrain_14m.py:image_dir=/data/14m,captions=/data/14m/captions.jsonl,vocab=/data/bert-base-uncased/vocab.txt --workdir runs/blip_14m
  mmjax-train --config experiments/blip/pretrain_14m.py:data=129m,shards=/data/129m/{00000..12899}.tar,vocab=/data/bert-base-uncased/vocab.txt --workdir runs/blip_129m
  mmjax-train --config experiments/blip/pretrain_14m.py:smoke=True --workdir /tmp/smoke_blip_14m
"""

import ml_collections

from mmjax import configs, smoke

PAIRS = {"14m": 14_000_000, "129m": 129_000_000}   # nominal image counts; `:pairs=N` counts your copy
BATCH = 2_880
EPOCHS = 20
QUEUE = 57_600          # 20 global batches
LR, DECAY_RATE = 3e-4, 0.9
TEXT_LEN = 30
BERT_VOCAB = 30_522
PP_TRAIN = ("decode|inception_crop(224, area_min=0.2, method='bicubic')|flip_lr|randaugment(2, 5)"
            "|normalize('clip')|tokenize(key='caption',out='text')|keep('image','text')")


def _vocab_size(path: str | None) -> int:
    """The tokenizer's vocabulary (lines of vocab.txt; bert-base-uncased's 30,522 when unnamed)."""
    if not path:
        return BERT_VOCAB
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def get_config(arg=None):
    arg = configs.parse_arg(arg, data="14m", pairs=0, image_dir=None, captions=None, shards=None, vocab=None,
                            smoke=False)
    if arg.data not in PAIRS:
        raise ValueError(f"data must be one of {sorted(PAIRS)}, got {arg.data!r}")
    steps_per_epoch = (arg.pairs or PAIRS[arg.data]) // BATCH
    c = ml_collections.ConfigDict()
    c.task = "blip"
    c.seed = 0
    c.total_steps = EPOCHS * steps_per_epoch
    c.model = dict(
        embed_dim=256, temperature_init=0.07,
        vision=dict(variant="B/16"),
        text=dict(variant="base", vocab_size=_vocab_size(arg.vocab) + 2, max_len=512, dropout=0.1),
    )
    c.momentum = dict(decay=0.995, queue_size=QUEUE, alpha=0.4, alpha_warmup_steps=2 * steps_per_epoch)
    c.loss = dict(label_smoothing=0.1, negative_floor=1e-4)
    data = (dict(name="webdataset", shards=arg.shards) if arg.shards
            else dict(name="folder", image_dir=arg.image_dir, captions=arg.captions))
    c.input = dict(data=data, batch_size=BATCH, pp=PP_TRAIN,
                   tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=TEXT_LEN), worker_count=0)
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05)
    c.schedule = dict(lr=LR, warmup_steps=3_000, decay="cosine", end_lr=LR * DECAY_RATE ** (EPOCHS - 1))
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=0)    # BLIP evaluates after fine-tuning (experiments/blip/retrieval*.py ...)
    if arg.smoke:   # a few steps of a tiny BLIP on the embedded shapes captions
        c.model = dict(embed_dim=16,
                       vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                       text=dict(variant=None, width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=200,
                                 max_len=16, dropout=0.0))
        c.input.tokenizer = dict(name="shapes_wordpiece", context_length=16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')")
        c.momentum.update(queue_size=4 * c.input.batch_size, alpha_warmup_steps=2)
        smoke.short_run(c, steps=4, log_every=2)
    return c
