"""BLIP-2 stage 2 with Flan-T5: the stage-1 Q-Former's 32 queries, projected, go with a caption prefix into
the encoder of a frozen FlanT5-XL / XXL whose decoder is trained to write the rest (prefix language modeling;
Li et al. 2023, Sec. 3.3 and 3.5; salesforce/LAVIS lavis/models/blip2_models/blip2_t5.py).

Recipe [paper and repo; ../shared/RECIPES.md §11]: frozen EVA-CLIP ViT-g/14 at 224 px (its final LayerNorm
trains), the Q-Former and queries from stage 1 (trained further), a new Linear(768 → T5 width), frozen Flan-T5
(bf16 in the paper); the loss is T5's cross-entropy on the suffix, text truncated at 32 tokens. AdamW β = (0.9,
0.98), weight decay 0.05, peak lr 1e-4 after 2,000 warmup steps, cosine to 5e-5 (paper's stage-2 minimum), 80k
steps, global batch 1,520 (FlanT5; OPT's is 1,920). Images as stage 1.
Differences here:
* The frozen towers' layers are scanned (`scan=True`: one compiled layer each; unscanned model
  directories and checkpoints load into them).
* The prefix / suffix split is the task's (mmjax/tasks/blip2_t5.py): a random number of leading words, from 0
  (captioning) to all but one, per example; neither the paper nor LAVIS's released code states the rule.
* Initialisation (`init=DIR`): one model directory in Blip2T5's layout (vision_model, query_tokens, qformer,
  language_model): the stage-1 result and Flan-T5 converted with mmjax-convert and merged, the new
  language_projection fresh; or a converted LAVIS blip2_t5 / transformers Blip2ForConditionalGeneration
  (Salesforce/blip2-flan-t5-*) directory with `fresh_projection=False` to continue it. The Flan-T5 of BLIP-2's
  checkpoints gates its feed-forward with the exact GELU (LAVIS sets dense_act_fn "gelu"; `lm.mlp` below).
* `vocab=` is Flan-T5's tokenizer (its tokenizer.model or tokenizer.json: words then </s>, no BOS).
  The frozen towers run in float32 unless `--config.model.dtype=bfloat16`.

Expected [paper Table 2, repo projects/blip2/README.md]: zero-shot VQAv2 test-dev 63.0 (ViT-g, FlanT5-XL), 65.0
(FlanT5-XXL, the repo's headline); NoCaps CIDEr ≈ 121 after COCO fine-tuning.
  mmjax-train --config experiments/blip2/stage2_t5.py:shards=/data/129m/{00000..12899}.tar,vocab=models/flan-t5-xl/spiece.model,init=models/blip2_stage2_t5_init --workdir runs/blip2_stage2_flant5xl
  mmjax-train --config experiments/blip2/stage2_t5.py:lm=flan-t5-xxl,shards=/data/129m/{00000..12899}.tar,vocab=models/flan-t5-xxl/spiece.model,init=models/blip2_stage2_t5xxl_init --workdir runs/blip2_stage2_flant5xxl
  mmjax-train --config experiments/blip2/stage2_t5.py:smoke=True --workdir /tmp/smoke_blip2_stage2_t5
"""

import ml_collections

from mmjax import configs, smoke

BATCH = 1_520
STEPS = 80_000
TEXT_LEN = 32
LMS = ("flan-t5-xl", "flan-t5-xxl")
FREEZE = (r"^vision_model/(?!norm/)", r"^language_model/")
PP_TRAIN = ("decode|inception_crop(224, area_min=0.5, method='bicubic')|flip_lr|normalize('clip')"
            "|tokenize(key='caption',out='text')|keep('image','text')")


def _tokenizer(vocab: str | None, context_length: int) -> dict:
    """Flan-T5's SentencePiece from `vocab` (tokenizer.model / tokenizer.json); `vocab=shapes` lets the
    shapes word tokenizer stand in (its start token is dropped by the task; the LM keeps Flan-T5's
    32,128 ids) where no T5 tokenizer file is at hand."""
    if vocab == "shapes":
        return dict(name="shapes", context_length=context_length)
    return dict(name="spm", path=vocab, style="t5", context_length=context_length)


def get_config(arg=None):
    arg = configs.parse_arg(arg, lm="flan-t5-xl", image_dir=None, captions=None, shards=None, vocab=None, init=None,
                            fresh_projection=True, smoke=False)
    if arg.lm not in LMS:
        raise ValueError(f"lm must be one of {LMS}, got {arg.lm!r}")
    c = ml_collections.ConfigDict()
    c.task = "blip2_stage2_t5"
    c.seed = 0
    c.total_steps = STEPS
    c.model = dict(vision=dict(variant="g/14", depth=39, scan=True), qformer=dict(num_queries=32),
                   lm=dict(variant=arg.lm, mlp="geglu_exact", scan=True))
    c.loss = dict(split="random")
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
    if arg.smoke:   # a few steps of a tiny stage 2 (frozen tiny ViT and Flan-T5-structured LM) on shapes captions
        c.model = dict(vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                       qformer=dict(width=32, depth=2, num_heads=2, mlp_dim=64, num_queries=4),
                       lm=dict(width=32, encoder_depth=2, decoder_depth=2, num_heads=2, head_dim=16, mlp_dim=64,
                               vocab_size=78, mlp="geglu_exact"))
        c.input.tokenizer = _tokenizer("shapes", 16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')")
        smoke.short_run(c, steps=4, log_every=2)
    c.model.dtype = "float32"               # the towers' compute dtype: "bfloat16" on accelerators
    return c
