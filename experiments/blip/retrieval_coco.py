"""BLIP image–text retrieval fine-tune on COCO (Li et al. 2022, Sec. 5.1; the official
configs/retrieval_coco.yaml and train_retrieval.py).

Recipe: BlipRetrieval (ViT-B/16 or ViT-L/16 at 384 pixels + BERT-base image-grounded encoder),
started from a BLIP checkpoint, ITC against a momentum model (decay 0.995) and queues of 57,600
with image-id-aware targets and momentum distillation α 0.4 (ramped over the first epoch), plus
ITM on hard negatives from the global batch (negative_all_rank); mmjax/tasks/blip_retrieval_finetune.py.
AdamW, weight decay 0.05, lr 1e-5 (B) / 5e-6 (L) on a cosine to 0 over 6 epochs, batch 32 (B) /
16 (L) per GPU on 8 GPUs = 256 / 128. Augmentation: random resized crop (scale 0.5–1, bicubic),
flip, RandAugment with 2 ops of magnitude 5, CLIP normalisation; captions up to 35 tokens.
Evaluation: ITC recall plus ITM re-ranking of each query's top k_test = 256 candidates with the ITC
similarity added to the ITM logit (itm_retrieval evaluator).

Deviations: RandAugment draws from mmjax's timm-style op set (BLIP lists its own 10 ops); the lr
follows a per-step cosine (BLIP sets it once per epoch); the folder source yields no image ids, so
COCO's five captions of one image are not yet each other's positives (the task reads "image_id"
when a source provides it).

Initialisation (`init_from`): a model directory converted from transformers
(`mmjax-convert --from hf Salesforce/blip-itm-base-coco`, say) or a blip_retrieval workdir; the
temperature starts fresh at 0.07 (transformers' checkpoints have none). `vocab`: the checkpoint's
BERT vocab.txt / tokenizer.json.

Expected (ViT-B, 14M pretraining): COCO 5k test TR@1 80.6 / IR@1 63.1 [paper Table 5; not
re-checked]; ViT-L 129M: TR@1 82.4 / IR@1 65.1 [paper, via RECIPES.md §7]. Hardware: 8 A100s.
  mmjax-train --config experiments/blip/retrieval_coco.py:variant=B,init_from=models/blip_itm_base,vocab=models/blip_itm_base/vocab.txt,image_dir=/data/coco,captions=/data/coco/train.jsonl,test_captions=/data/coco/test.jsonl --workdir runs/blip_ret_coco
  mmjax-train --config experiments/blip/retrieval_coco.py:smoke=True --workdir /tmp/smoke_blip_ret_coco
"""

import ml_collections

from mmjax import configs, smoke

# variant -> (vision ViT, lr, batch); BLIP-base's is transformers' default vision tower
VARIANTS = {"B": (dict(variant="B/16"), 1e-5, 256), "L": (dict(variant="L/16"), 5e-6, 128)}
COCO_KARPATHY_TRAIN = 566_747     # caption–image pairs, for the distillation ramp of one epoch
TRAIN_PP = ("decode|inception_crop(384, area_min=0.5, method='bicubic')|flip_lr"
            "|randaugment(num_layers=2, magnitude=5, magnitude_std=0.0)|normalize('clip')"
            "|tokenize(key='caption',out='text')|keep('image','text')")
EVAL_PP = "decode|resize(384, method='bicubic')|normalize('clip')|tokenize(key='caption',out='text')|keep('image','text')"


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B", init_from=None, vocab=None, image_dir=None, captions=None,
                            test_captions=None, epochs=6, queue=57_600, k_test=256, smoke=False)
    if arg.variant not in VARIANTS:
        raise ValueError(f"BLIP retrieval recipes exist for variants {sorted(VARIANTS)}, got {arg.variant!r}")
    vision, lr, batch = VARIANTS[arg.variant]
    c = ml_collections.ConfigDict()
    c.task = "blip_retrieval"
    c.seed = 0
    c.num_epochs = arg.epochs
    c.model = dict(vision=vision, text=dict(), embed_dim=256, learn_temperature=True, dtype="bfloat16")
    c.momentum = dict(decay=0.995, queue_size=arg.queue, distill=0.4,
                      distill_warmup_steps=COCO_KARPATHY_TRAIN // batch)
    c.itm = dict(enc_token_id=None)
    c.init = dict(source=arg.init_from, fresh=["temp"], drop=["temp"])
    c.input = dict(
        data=dict(name="folder", image_dir=arg.image_dir, captions=arg.captions),
        batch_size=batch, pp=TRAIN_PP,
        tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=35),
        worker_count=16,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=None)
    c.schedule = dict(lr=lr, warmup_steps=0, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=2_000, keep=2)
    c.evals = dict(every_steps=0, retrieval=dict(
        kind="itm_retrieval", data=dict(name="folder", image_dir=arg.image_dir, captions=arg.test_captions),
        pp=EVAL_PP, batch_size=256, max_examples=None, ks=(1, 5, 10), k=arg.k_test, add_itc=True))
    if arg.smoke:   # a few steps of a tiny model on the embedded shapes data: runs in CI
        tiny_smoke(c)
    return c


def tiny_smoke(c: ml_collections.ConfigDict) -> None:
    """A tiny BlipRetrieval on shapes with the shapes WordPiece vocabulary (shared by the Flickr recipe)."""
    smoke.short_run(c)
    c.model = dict(vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                   text=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=199, max_len=64),
                   embed_dim=16, learn_temperature=True, dtype="float32")
    c.init = dict(source=None)
    c.input.tokenizer = dict(name="shapes_wordpiece", context_length=24)
    smoke.shapes_input(c, "resize(32)|flip_lr|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')",
                       batch_size=8)
    c.momentum.update(queue_size=32, distill_warmup_steps=2)
    c.evals.retrieval.update(data=dict(name="mmjax_shapes", split="test"), batch_size=16, max_examples=16, k=8, ks=(1, 5),
                             pp="resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')")
