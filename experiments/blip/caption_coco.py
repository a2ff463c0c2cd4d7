"""BLIP captioning fine-tune on COCO (Li et al. 2022, Sec. 5.2; the official
configs/caption_coco.yaml and train_caption.py).

Recipe: BlipCaptioner (ViT-B/16 or ViT-L/16 at 384 pixels + BERT-base image-grounded causal
decoder), started from a BLIP checkpoint; LM loss with label smoothing 0.1 on the caption tokens
after the prompt "a picture of " ([DEC] as bos; mmjax/tasks/blip_finetune.py). AdamW, weight
decay 0.05, lr 1e-5 (B) / 2e-6 (L) on a cosine to 0 over 5 epochs, batch 32 (B) / 16 (L) per GPU
on 8 GPUs = 256 / 128. Augmentation as BLIP's retrieval fine-tune (random resized crop 0.5–1,
flip, RandAugment 2 ops of magnitude 5, CLIP normalisation). Evaluation: beam search with 3 beams,
at most 20 and at least 5 tokens (prompt included), BLEU-4 and CIDEr on the Karpathy test split.

Deviations: mmjax's timm-style RandAugment op set; a per-step cosine (BLIP: per epoch); captions
up to 40 tokens with the prompt counted here on top of them (BLIP truncates prompt + caption at 40).

Initialisation (`init_from`): a model directory converted from transformers
(`mmjax-convert --from hf Salesforce/blip-image-captioning-base`, say) or a blip_caption workdir.
`vocab`: the checkpoint's BERT vocab.txt / tokenizer.json.

Expected: COCO Karpathy test CIDEr 129.7 / BLEU-4 38.6 (ViT-B, 14M pretraining) [paper Table 7;
not re-checked]; ViT-L 129M: CIDEr 136.7 [paper, via RECIPES.md §7]. Hardware: 8 A100s.
  mmjax-train --config experiments/blip/caption_coco.py:init_from=models/blip_caption_base,vocab=models/blip_caption_base/vocab.txt,image_dir=/data/coco,captions=/data/coco/train.jsonl,test_captions=/data/coco/test.jsonl --workdir runs/blip_cap_coco
  mmjax-train --config experiments/blip/caption_coco.py:smoke=True --workdir /tmp/smoke_blip_cap_coco
"""

import ml_collections

from mmjax import configs, smoke

VARIANTS = {"B": (dict(variant="B/16"), 1e-5, 256), "L": (dict(variant="L/16"), 2e-6, 128)}
TRAIN_PP = ("decode|inception_crop(384, area_min=0.5, method='bicubic')|flip_lr"
            "|randaugment(num_layers=2, magnitude=5, magnitude_std=0.0)|normalize('clip')"
            "|tokenize(key='caption',out='text')|keep('image','text')")
EVAL_PP = "decode|resize(384, method='bicubic')|normalize('clip')|keep('image','caption')"
GENERATION = dict(num_beams=3, max_length=20, min_length=5)


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B", init_from=None, vocab=None, image_dir=None, captions=None,
                            test_captions=None, epochs=5, smoke=False)
    if arg.variant not in VARIANTS:
        raise ValueError(f"BLIP captioning recipes exist for variants {sorted(VARIANTS)}, got {arg.variant!r}")
    vision, lr, batch = VARIANTS[arg.variant]
    c = ml_collections.ConfigDict()
    c.task = "blip_caption"
    c.seed = 0
    c.num_epochs = arg.epochs
    c.model = dict(vision=vision, text=dict(), dtype="bfloat16")
    c.caption = dict(prompt="a picture of ", bos_token_id=30522, label_smoothing=0.1, generation=GENERATION)
    c.init = dict(source=arg.init_from)
    c.input = dict(
        data=dict(name="folder", image_dir=arg.image_dir, captions=arg.captions),
        batch_size=batch, pp=TRAIN_PP,
        tokenizer=dict(name="wordpiece", path=arg.vocab, context_length=40),
        worker_count=16,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=None)
    c.schedule = dict(lr=lr, warmup_steps=0, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=2_000, keep=2)
    c.evals = dict(every_steps=0, caption=dict(
        kind="captioning", data=dict(name="folder", image_dir=arg.image_dir, captions=arg.test_captions),
        pp=EVAL_PP, batch_size=256, max_examples=None, generation=GENERATION))
    if arg.smoke:   # a few steps of a tiny model on the embedded shapes data: runs in CI
        smoke.short_run(c)
        c.model = dict(vision=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8),
                       text=dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=199,
                                 max_len=64), dtype="float32")
        c.caption.bos_token_id = 198    # one id past the shapes WordPiece vocabulary
        c.input.tokenizer = dict(name="shapes_wordpiece", context_length=24)
        smoke.shapes_input(c, "resize(32)|flip_lr|value_range(-1,1)|tokenize(key='caption',out='text')"
                              "|keep('image','text')", batch_size=8)
        smoke.shapes_eval(c.evals.caption, "resize(32)|value_range(-1,1)|keep('image','caption')", 8)
    return c
