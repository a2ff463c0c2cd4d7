"""BLIP pretraining (Li et al. 2022) on the embedded shapes data set: ITC + ITM + captioning LM on the CPU.

A small BLIP: a ViT/8 (width 128, depth 4) with a convolutional stem (32, 64) (as the main job's CLIP)
and a 2-layer BERT text encoder (width 128) whose causal decoder shares all but its self-attention
(mmjax/models/blip_pretrain.py), trained with BLIP's three losses (mmjax/tasks/blip.py): ITC
against a momentum model and queues of 8 batches with momentum distillation (α 0.4 ramped over
the first 100 steps), ITM on hard negatives, LM with label smoothing 0.1. Evaluated on the
held-out test split: ITC retrieval and ITM re-ranking of each query's ITC top-16 (BLIP's
protocol, `itm_retrieval`), and greedy captions of the held-out images scored by BLEU-4 / CIDEr
and by whether they name the right colour and shape (`captioning`).

Measured (one run, seed 0, `:steps=500` = the default, batch 64; 2 CPU cores shared with about
five other jobs, load average ~14: 40 min of training after a 170 s compile), on the first 500
test images:
* greedy captions (`captioning`): the right colour word in 0.998 of them (chance 0.25), the
  right shape word in 0.192 (chance 1/6 ≈ 0.17: shape not learned yet); CIDEr 0.85, BLEU-4 0.074.
  Training LM token accuracy 0.59.
* retrieval among 500 (chance R@1 0.002): ITC i2t / t2i R@1 0.004 / 0.022, R@5 0.038 / 0.120;
  ITM re-ranking of the ITC top-16: R@1 0.016 / 0.024, R@5 0.048 / 0.114 (the CLIP main job
  reaches about 0.3 / 0.25; many test captions are interchangeable).
* ITM did NOT learn in 500 steps: its training accuracy stays at 0.667, the rate of answering
  "no match" to every pair (1 positive : 2 hard negatives), loss 0.64 -> 0.61. A likely cause (not
  measured): the hard negatives come from an ITC whose temperature falls fast (logit scale
  14 -> 187), so they are mostly captions of the same colour and shape, often describing the
  image equally well. Longer runs are not measured.

`clip=RUN` starts the image encoder from the main job's CLIP run (its image tower's architecture and
weights, fine-tuned at a tenth of the rate), as BLIP starts from an ImageNet ViT; measured in the
README's "Fusion encoders on shapes" table (`python -m benchmarks.shapes_fusion`) at 1,500 steps: ITM
re-ranking lifts image→text R@1 there, where after 500 it still lowered it.
  mmjax-train --config experiments/blip/shapes.py --workdir runs/blip_shapes
  mmjax-train --config experiments/blip/shapes.py:clip=runs/clip,steps=1500 --workdir runs/blip_shapes_from_clip
  mmjax-train --config experiments/blip/shapes.py:steps=1800 --workdir runs/blip_shapes_long
"""

import ml_collections

from mmjax import configs, shapes_bridges, smoke
from mmjax.data import shapes_captions

# The shapes tokenizer's vocabulary (mmjax/data/tokenizers/shapes_vocab.txt) + BLIP's [DEC], [ENC].
TOKENIZER_VOCAB = 198
CONTEXT = 24


def get_config(arg=None):
    arg = configs.parse_arg(arg, clip=None, steps=500, batch=64, queue=512, alpha=0.4, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "blip"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(
        embed_dim=128,
        vision=dict(variant=None, width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=8, conv_stem=(32, 64)),
        text=dict(variant=None, width=128, depth=2, num_heads=4, mlp_dim=512, vocab_size=TOKENIZER_VOCAB + 2,
                  max_len=CONTEXT),
    )
    c.momentum = dict(decay=0.995, queue_size=arg.queue, alpha=arg.alpha, alpha_warmup_steps=100)
    c.loss = dict(label_smoothing=0.1, negative_floor=1e-4)
    pp_train = "resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')"
    c.input = dict(
        data=dict(name="mmjax_shapes", split="train"),
        batch_size=arg.batch,
        pp=pp_train,
        tokenizer=dict(name="shapes_wordpiece", context_length=CONTEXT),
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0)
    if arg.clip:   # the image encoder from the main job's CLIP run, fine-tuned at a tenth of the rate
        c.model.vision = dict(shapes_bridges.VISION)
        c.init = shapes_bridges.clip_image_tower_init(arg.clip, "vision_model")
        c.optimizer.lr_multipliers = ((r"^vision_model/", 0.1),)
    c.schedule = dict(lr=5e-4, warmup_steps=50, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 25
    c.checkpoint = dict(every_steps=500, keep=2)
    pp_eval = "resize(32)|value_range(-1,1)"
    test = dict(name="mmjax_shapes", split="test")
    c.evals = dict(
        every_steps=0,   # at the end
        itm_retrieval=dict(kind="itm_retrieval", data=test,
                           pp=pp_eval + "|tokenize(key='caption',out='text')"
                                        "|keep('image','text','caption','color','shape','size','position')",
                           batch_size=250, max_examples=500, ks=(1, 5), k=16, add_itc=True,
                           attribute_words=shapes_captions.attribute_words()),
        captioning=dict(kind="captioning", data=test,
                        pp=pp_eval + "|keep('image','caption','color','shape','size','position')",
                        batch_size=250, max_examples=500, generation=dict(max_new_tokens=CONTEXT - 1),
                        attribute_words=shapes_captions.attribute_words()),
    )
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.input.batch_size = 16
        c.momentum.queue_size = 64
        for name in ("itm_retrieval", "captioning"):
            c.evals[name].max_examples = 32
            c.evals[name].batch_size = 32
        c.evals.captioning.generation = dict(max_new_tokens=8)
    return c
