"""BLIP-2 stage 2 with OPT: the stage-1 Q-Former's 32 queries, projected, are the soft prompt of a frozen
OPT-2.7B / 6.7B trained with the LM loss on the caption (Li et al. 2023, Sec. 3.3 and 3.5; salesforce/LAVIS
lavis/models/blip2_models/blip2_opt.py, lavis/projects/blip2/train/pretrain_stage2.yaml).

Recipe [paper and repo; ../shared/RECIPES.md §11]: frozen EVA-CLIP ViT-g/14 at 224 px (its final LayerNorm
trains), the Q-Former and queries from stage 1 (trained further), a new Linear(768 → OPT width), frozen
OPT; the LM loss scores the caption tokens only (not the queries, not the BOS `</s>`), text truncated at
32 tokens. AdamW β = (0.9, 0.98), weight decay 0.05, peak lr 1e-4 after 2,000 warmup steps, cosine to 5e-5
(paper's stage-2 minimum), 80k steps, global batch 1,920 (OPT; FlanT5's is 1,520). Images as stage 1.
Differences here:
* The frozen towers' layers are scanned (`scan=True`: one compiled layer each; unscanned model
  directories and checkpoints load into them).
* Initialisation (`init=DIR`): one model directory in Blip2LM's layout (vision_model, query_tokens,
  qformer, language_model): the stage-1 result and OPT converted with mmjax-convert and merged, the new
  language_projection fresh (the paper's start); or a converted LAVIS blip2_opt / transformers
  Blip2ForConditionalGeneration directory with `fresh_projection=False` to continue it. The stage-1 run's
  workdir alone lacks the LM.
* LAVIS appends "\n" to every caption (the answer delimiter it later prompts with); the tokenize op here
  does not. The frozen towers run in float32 unless `--config.model.dtype=bfloat16` (LAVIS: fp16);
  `--config.model.lm.param_dtype=bfloat16` also stores the OPT in bf16 (it is frozen: no master copy needed).
* `vocab=` is the OPT tokenizer directory (vocab.json + merges.txt); `lm=opt-6.7b` picks the larger LM.

Expected [paper Table 2, repo projects/blip2/README.md]: OPT-2.7B zero-shot VQAv2 53.5 (OPT-6.7B 54.3),
NoCaps CIDEr ≈ 119-121 after COCO fine-tuning.
  mmjax-train --config experiments/blip2/stage2_opt.py:shards=/data/129m/{00000..12899}.tar,vocab=models/opt-2.7b,init=models/blip2_stage2_init --workdir runs/blip2_stage2_opt27
  mmjax-train --config experiments/blip2/stage2_opt.py:lm=opt-6.7b,shards=/data/129m/{00000..12899}.tar,vocab=models/opt-6.7b,init=models/blip2_stage2_init67 --workdir runs/blip2_stage2_opt67
  mmjax-train --config experiments/blip2/stage2_opt.py:smoke=True --workdir /tmp/smoke_blip2_stage2
"""

import ml_collections

from mmjax import configs, smoke

BATCH = 1_920
STEPS = 80_000
TEXT_LEN = 32
LMS = ("opt-2.7b", "opt-6.7b")
FREEZE = (r"^vision_model/(?!norm/)", r"^language_model/")
PP_TRAIN = ("decode|inception_crop(224, area_min=0.5, method='bicubic')|flip_lr|normalize('clip')"
            "|tokenize(key='caption',out='text')|keep('image','text')")


def _tokenizer(vocab: str | None, context_length: int) -> dict:
    """OPT's GPT-2 BPE from `vocab` (a directory); `vocab=shapes` lets the shapes word tokenizer stand
    in (the LM keeps OPT's 50,272 ids) where no OPT tokenizer files are at hand."""
    if vocab == "shapes":
        return dict(name="shapes", context_length=context_length)
    return dict(name="gpt2_bpe", path=vocab, style="opt", context_length=context_length)


def get_config(arg=None):
    arg = configs.parse_arg(arg, lm="opt-2.7b", image_dir=None, captions=None, shards=None, vocab=None, init=None,
                            fresh_projection=True, smoke=False)
    if arg.lm not in LMS:
        raise ValueError(f"lm must be one of {LMS}, got {arg.lm!r}")
    c = ml_collections.ConfigDict()
    c.task = "blip2_stage2"
    c.seed = 0
    c.total_steps = STEPS
    c.model = dict(vision=dict(variant="g/14", depth=39, scan=True), qformer=dict(num_queries=32), lm=dict(variant=arg.lm, scan=True))
    c.loss = dict(prompt_length=1)      # the BOS is not scored
    data = (dict(name="webdataset", shards=arg.shards) if arg.shards
            else dict(name="folder", image_dir=arg.image_dir, captions=arg.captions))
    c.input = dict(data=data, batch_size=BATCH, pp=PP_TRAIN, tokenizer=_tokenizer(arg.vocab, TEXT_LEN),
                   worker_count=0)
    if arg.init:
        c.init = dict(source=arg.init, fresh=[r"language_projection/.*"] if arg.fresh_projection else [])
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, freeze=list(FREEZE))
    c.schedule = dict(lr=1e-4, warmup_steps=2_000, decay="cosine", end_lr=5e-5)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=0)     # zero-shot VQA / captioning evaluations are run on the trained model
    if arg.smoke:   # a few steps of a tiny stage 2 (frozen tiny ViT and OPT-structured LM) on shapes captions
        c.model = dict(vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                       qformer=dict(width=32, depth=2, num_heads=2, mlp_dim=64, num_queries=4),
                       lm=dict(kind="opt", width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=78, max_len=32))
        c.input.tokenizer = _tokenizer("shapes", 16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')")
        smoke.short_run(c, steps=4, log_every=2)
    c.model.dtype = "float32"               # the towers' compute dtype: "bfloat16" on accelerators
    c.model.lm.param_dtype = "float32"      # the frozen OPT's storage: "bfloat16" halves it
    return c
