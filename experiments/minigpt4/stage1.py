"""MiniGPT-4 stage 1: BLIP-2's frozen EVA ViT-g/14 and Q-Former, one new Linear(768 → Vicuna width) and a frozen
Vicuna, trained with the LM loss on image-caption pairs (Zhu et al. 2023, Sec. 3.1; Vision-CAIR/MiniGPT-4
minigpt4/models/mini_gpt4.py, train_configs/minigpt4_stage1_pretrain.yaml).

Recipe [repo; ../shared/RECIPES.md §13]: only `llama_proj` (mmjax: language_projection) trains; ViT, its norm
(`ln_vision`), the queries and the Q-Former are frozen with the LM. No prompt: [BOS, 32 image queries, caption +
"\n"], the loss on the caption. AdamW, weight decay 0.05, lr 1e-4 after 5,000 warmup steps, cosine to 8e-5,
4 epochs × 5,000 iterations = 20k steps, global batch 256 (64 on each of 4 A100s), text up to 32 tokens,
images 224 px. Data: ≈5M LAION / CC+SBU pairs (sampled 115:14).
Differences here:
* The frozen towers' layers are scanned (`scan=True`: one compiled layer each; unscanned model
  directories and checkpoints load into them).
* Initialisation (`init=DIR`): a MiniGPT4 model directory from `mmjax-convert --source minigpt4` with
  eva_vit_g.pth, BLIP-2's blip2_pretrained_flant5xxl.pth and the Vicuna folder (no llama_proj file: it is
  the layer stage 1 trains, started fresh here).
* The official warmup starts at 1e-6 and its cosine runs per epoch; here the warmup starts at 0 and the
  cosine runs per step. The tokenizer adds no BOS (the model puts one before the image) and pads with id 0.
* `vocab=` is Vicuna's tokenizer.model; `vocab=shapes` lets the shapes word tokenizer stand in (the LM keeps
  its 32,000 ids) where no LLaMA tokenizer is at hand.

Expected: the paper reports no benchmark number (its evaluation is qualitative); stage 1 alone describes images
but in broken, repetitive text, which stage 2 fixes.
  mmjax-train --config experiments/minigpt4/stage1.py:shards=/data/laion_ccsbu/{00000..04999}.tar,vocab=models/vicuna-13b/tokenizer.model,init=models/minigpt4_init --workdir runs/minigpt4_stage1
  mmjax-train --config experiments/minigpt4/stage1.py:lm=vicuna-7b,shards=/data/laion_ccsbu/{00000..04999}.tar,vocab=models/vicuna-7b/tokenizer.model,init=models/minigpt4_init7 --workdir runs/minigpt4_stage1_7b
  mmjax-train --config experiments/minigpt4/stage1.py:smoke=True --workdir /tmp/smoke_minigpt4_stage1
"""

import ml_collections

from mmjax import configs, smoke

BATCH = 256
STEPS = 20_000
TEXT_LEN = 32
LMS = ("vicuna-13b", "vicuna-7b")
FREEZE = (r"^(?!language_projection/)",)       # everything but the one linear layer
PP_TRAIN = ("decode|resize(224, method='bicubic')|normalize('clip')"
            "|tokenize(key='caption',out='text',suffix='\\n')|keep('image','text')")
SMOKE_MODEL = dict(vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                   qformer=dict(width=32, depth=2, num_heads=2, mlp_dim=64, num_queries=4),
                   lm=dict(kind="llama", width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=78, max_len=64))


def tokenizer(vocab: str | None, context_length: int) -> dict:
    """LLaMA's SentencePiece from `vocab` (a tokenizer.model), no BOS or EOS added; `vocab=shapes`: the
    shapes word tokenizer."""
    if vocab == "shapes":
        return dict(name="shapes", context_length=context_length)
    return dict(name="spm", path=vocab, style="llama", add_bos=False, add_eos=False, pad_token_id=0,
                context_length=context_length)


def get_config(arg=None):
    arg = configs.parse_arg(arg, lm="vicuna-13b", image_dir=None, captions=None, shards=None, vocab=None, init=None,
                            smoke=False)
    if arg.lm not in LMS:
        raise ValueError(f"lm must be one of {LMS}, got {arg.lm!r}")
    c = ml_collections.ConfigDict()
    c.task = "minigpt4"
    c.seed = 0
    c.total_steps = STEPS
    c.model = dict(vision=dict(variant="g/14", depth=39, scan=True), qformer=dict(num_queries=32), lm=dict(variant=arg.lm, scan=True))
    data = (dict(name="webdataset", shards=arg.shards) if arg.shards
            else dict(name="folder", image_dir=arg.image_dir, captions=arg.captions))
    c.input = dict(data=data, batch_size=BATCH, pp=PP_TRAIN, tokenizer=tokenizer(arg.vocab, TEXT_LEN),
                   worker_count=0)
    if arg.init:
        c.init = dict(source=arg.init, fresh=[r"language_projection/.*"])
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, freeze=list(FREEZE))
    c.schedule = dict(lr=1e-4, warmup_steps=5_000, decay="cosine", end_lr=8e-5)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=0)
    if arg.smoke:   # a few steps of a tiny MiniGPT-4 (frozen tiny towers and LLaMA-structured LM) on shapes captions
        c.model = SMOKE_MODEL
        c.input.tokenizer = tokenizer("shapes", 16)
        smoke.shapes_input(c, "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')")
        smoke.short_run(c, steps=4, log_every=2)
    return c
