"""BLIP-2 stage 1: the Q-Former learns from a frozen EVA ViT-g/14 with ITC + ITM + ITG (Li et al. 2023,
Sec. 3.2 and 3.5; salesforce/LAVIS lavis/models/blip2_models/blip2_qformer.py,
lavis/projects/blip2/train/pretrain_stage1.yaml).

Recipe [paper and repo; ../shared/RECIPES.md §11]: frozen EVA-CLIP ViT-g/14 at 224 px (39 of 40 layers;
its final LayerNorm, LAVIS's `ln_vision`, trains), Q-Former = BERT-base (12 layers, 768, cross-attention
every 2nd layer) with 32 learned queries, vocabulary bert-base-uncased + [DEC], ITC/ITM embed 256,
temperature 0.07 learned; loss = ITC (max over queries, no momentum model, label smoothing 0.1) + ITM
(hard negatives over the global batch) + ITG (multimodal causal mask, label smoothing 0.1); text truncated
at 32 tokens. AdamW β = (0.9, 0.98), weight decay 0.05, peak lr 1e-4 after a 2,000-step linear warmup,
cosine to 1e-5 (LAVIS's min_lr), 250k steps, global batch 1,680 (ViT-g; the paper's 2,320 is ViT-L's).
Images: random resized crop 224, scale 0.5-1.0, bicubic, horizontal flip, CLIP's mean/std.
Differences here:
* The frozen towers' layers are scanned (`scan=True`: one compiled layer each; unscanned model
  directories and checkpoints load into them).
* Initialisation: BLIP-2 starts the ViT from EVA-CLIP and the Q-Former from bert-base-uncased. `init=DIR`
  warm-starts from a model directory in Blip2Retrieval's layout (what mmjax-convert writes for transformers'
  Blip2ForImageTextRetrieval or a LAVIS `blip2` file; assemble one from EVA-CLIP + BERT for the paper's
  start), the ITG head and temperature starting fresh; without it everything is random and the frozen ViT
  is useless.
* The ViT runs in float32 (LAVIS: fp16); set `--config.model.dtype=bfloat16` for bf16 compute.
* LAVIS draws ITM negatives with torch.multinomial per GPU from all-gathered similarities; here they are
  drawn over the global batch in one jax.random.categorical (mmjax.losses.matching), same distribution.
* CapFilt (the 129M set's synthetic captions) is a separate data-preparation step; point `captions=`
  at the filtered JSONL.

Data (nothing is downloaded): the BLIP 129M set (COCO, VG, CC3M, CC12M, SBU, 115M LAION-400M) as a folder
with a captions JSONL (`image_dir=`, `captions=`) or webdataset shards (`shards=`); `pairs=N` counts your
copy only for the log. The tokenizer is bert-base-uncased's vocab.txt (`vocab=PATH`).

Expected [repo projects/blip2/README.md, after stage 2 with FlanT5-XXL]: zero-shot VQAv2 65.0; stage 1 alone
is judged by zero-shot COCO retrieval after fine-tuning (paper Table 5).
  mmjax-train --config experiments/blip2/stage1.py:shards=/data/129m/{00000..12899}.tar,vocab=/data/bert-base-uncased/vocab.txt,init=models/blip2_stage1_init --workdir runs/blip2_stage1
  mmjax-train --config experiments/blip2/stage1.py:smoke=True --workdir /tmp/smoke_blip2_stage1
"""

import ml_collections

from mmjax import configs, smoke

BATCH = 1_680
STEPS = 250_000
TEXT_LEN = 32
BERT_VOCAB = 30_522
# The ViT is frozen, its final LayerNorm (LAVIS's ln_vision) is not.
FREEZE = (r"^vision_model/(?!norm/)",)
# Blip2Pretrain's parameters that a Blip2Retrieval directory lacks: the ITG head and the ITC temperature.
FRESH = (r"lm_(transform|norm)/.*", r"lm_bias", r"temp")
PP_TRAIN = ("decode|inception_crop(224, area_min=0.5, method='bicubic')|flip_lr|normalize('clip')"
            "|tokenize(key='caption',out='text')|keep('image','text')")


def _vocab_size(path: str | None) -> int:
    """The tokenizer's vocabulary (lines of vocab.txt; bert-base-uncased's 30,522 when unnamed)."""
    if not path:
        return BERT_VOCAB
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def get_config(arg=None):
    arg = configs.parse_arg(arg, image_dir=None, captions=None, shards=None, vocab=None, init=None, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "blip2_stage1"
    c.seed = 0
    c.total_steps = STEPS
    c.model = dict(vision=dict(variant="g/14", depth=39, scan=True), qformer=dict(num_queries=32),
                   vocab_size=_vocab_size(arg.vocab) + 1, max_len=512, embed_dim=256, temperature_init=0.07)
    c.loss = dict(itc_label_smoothing=0.1, lm_label_smoothing=0.1, negative_floor=0.0)
    data = (dict(name="webdataset", shards=arg.shards) if arg.shards
            else dict(name="folder", image_dir=arg.image_dir, captions=arg.captions))
    c.input = dict(data=data, batch_size=BATCH, pp=PP_TRAIN,
                   tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=TEXT_LEN), worker_count=0)
    if arg.init:
        c.init = dict(source=arg.init, fresh=list(FRESH))
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, freeze=list(FREEZE))
    c.schedule = dict(lr=1e-4, warmup_steps=2_000, decay="cosine", end_lr=1e-5)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=0)     # BLIP-2 evaluates after stage 2 / fine-tuning
    if arg.smoke:   # a few steps of a tiny stage 1 on the embedded shapes captions
        c.model = dict(vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                       qformer=dict(width=32, depth=2, num_heads=2, mlp_dim=64, num_queries=4),
                       vocab_size=198 + 1, max_len=16, embed_dim=16)
        c.input.tokenizer = dict(name="shapes_wordpiece", context_length=16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')")
        smoke.short_run(c, steps=4, log_every=2)
    c.model.dtype = "float32"               # the towers' compute dtype: "bfloat16" on accelerators
    return c
