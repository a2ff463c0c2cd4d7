"""FLIP ViT-B/16 on LAION-400M (Li, Fan, Hu, Feichtenhofer, He 2023, "Scaling Language-Image
Pre-training via Masking"): CLIP trained with half of the image patches dropped at random.

Recipe and sources (the official JAX code, facebookresearch/flip, read for this file):
- Masking [configs/cfg_flip_base.py, models_flip.py `random_mask`]: each image keeps a random
  50% of its patch tokens (position embeddings added first), in training only; evaluation sees
  every patch. The image tower's cost drops about in half (mmjax `model.image.patch_drop_ratio`).
- Architecture [configs/cfg_flip_base.py, configs/default.py]: image tower ViT-B/16 with fixed
  2-D sin-cos position embeddings and global average pooling; text tower 512 wide, 8 heads,
  12 layers, non-causal, 32 tokens, read at the first position; 512-d bias-free projections;
  GELU (tanh form), LayerNorm ε 1e-6; learnable temperature initialised at ln(1/0.07), clipped
  at 100. Variants: `variant=L/16` (text 768/12 heads, 768-d embedding) as cfg_flip_large.py.
- Optimiser [configs/default.py]: AdamW β1 0.9, β2 0.95, weight decay 0.2 (not on biases,
  norms, position embeddings), batch 65,536, lr 4e-6 per 256 examples (1.024e-3), warmup
  20 "ImageNet epochs" of 1,281,167 examples, cosine decay to 0, 10,000 such epochs in all
  (12.8B examples, about 32 LAION-400M epochs).
- Augmentation [configs/default.py, input_pipeline_laion.py]: random resized crop of area
  0.5-1 at 224 px, random horizontal flip, ImageNet mean/std.
- Unmasked tuning [README.md]: the paper then trains briefly with masking off, from the masked
  run's parameters (patch_drop_ratio=0, base lr 4e-8, 100 ImageNet epochs with 20 of warmup;
  +1.3 / +0.5 zero-shot at 75% / 50% masking, paper Table 1). `:unmasked_from=WORKDIR` is that
  stage (`init.preset="same"`: every parameter from the masked run, no optimizer state).
Differences here: CLIP's BPE tokenizer (vocab 49,408) instead of BERT's WordPiece (30,523); no
[CLS] token in the image tower, whose average pool in FLIP includes it; bf16 compute. The loss
is the full-batch contrastive loss, computed per data shard (`loss.impl="local"`, equal values
and gradients, less memory per device).

Expected: zero-shot ImageNet-1k top-1 68.0% for ViT-B/16 after 12.8B examples of LAION-400M,
74.3% for ViT-L/16 [repo README.md]. Hardware: v3-256 TPUs for B and L [repo README.md].

  mmjax-train --config experiments/flip/laion400m.py:image_dir=/data/laion400m,captions=/data/laion400m/captions.jsonl,data_dir=/data/tfds,class_names_file=/data/imagenet_clip_classnames.txt --workdir runs/flip_b16
  mmjax-train --config experiments/flip/laion400m.py:unmasked_from=runs/flip_b16,image_dir=/data/laion400m,captions=/data/laion400m/captions.jsonl,data_dir=/data/tfds,class_names_file=/data/imagenet_clip_classnames.txt \\
      --workdir runs/flip_b16_unmasked
  mmjax-train --config experiments/flip/laion400m.py:smoke=True --workdir /tmp/smoke_flip
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.evaluate import zeroshot

IMAGENET_EPOCH = 1_281_167        # FLIP counts "virtual ImageNet epochs" of this many examples
BATCH = 65_536
BASE_LR = 4e-6                    # per 256 examples
# name: (text width, text heads, embedding), from configs/cfg_flip_{base,large}.py / default.py
TEXT = {"B": (512, 8, 512), "L": (768, 12, 768)}
WD_EXCLUDE = (r"logit_scale", r"norm|ln_|(^|/)scale$", r"bias", r"pos_embedding")


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B/16", patch_drop_ratio=0.5, image_dir=None, captions=None,
                            data_dir=None, class_names_file=None, unmasked_from=None, smoke=False)
    size = arg.variant.split("/")[0]
    if size not in TEXT:
        raise ValueError(f"FLIP recipe variants are B/16 and L/16, got {arg.variant!r}")
    text_width, text_heads, embed_dim = TEXT[size]
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = 10_000 * IMAGENET_EPOCH // BATCH          # 195,490 steps
    tower = {"act": "gelu_tanh", "ln_eps": 1e-6, "scan": True, "remat_policy": "none"}
    c.model = {
        "embed_dim": embed_dim,
        "image": dict(variant=arg.variant, pool="gap", posemb="sincos2d", pre_norm=False, patch_bias=True,
                   patch_drop_ratio=arg.patch_drop_ratio, **tower),
        "text": dict(vocab_size=49_408, context_length=32, width=text_width, depth=12, num_heads=text_heads,
                  causal=False, pool="first", **tower),
        "logit_scale_init": 2.659260,      # ln(1 / 0.07); clipped at ln 100 by the model
        "dtype": "bfloat16",
    }
    c.loss = {"name": "clip", "impl": "local"}
    c.input = {
        "data": {"name": "folder", "image_dir": arg.image_dir, "captions": arg.captions},
        "batch_size": BATCH,
        "pp": "decode|inception_crop(224, area_min=0.5)|flip_lr|normalize('imagenet')"
           "|tokenize(key='caption',out='text')|keep('image','text')",
        "tokenizer": {"name": "clip", "context_length": 32},
        "worker_count": 0,
    }
    c.optimizer = {"name": "adamw", "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.2, "grad_clip_norm": None,
                       "wd_exclude": list(WD_EXCLUDE)}
    c.schedule = {"lr": BASE_LR * BATCH / 256, "warmup_steps": 20 * IMAGENET_EPOCH // BATCH, "decay": "cosine",
                      "end_lr": 0.0}
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = {"every_steps": 5_000, "keep": 2}
    if arg.unmasked_from:   # the unmasked tuning stage, from the masked run's parameters
        c.model.image.patch_drop_ratio = 0.0
        c.total_steps = 100 * IMAGENET_EPOCH // BATCH              # 1,954 steps
        c.schedule.update(lr=4e-8 * BATCH / 256, warmup_steps=20 * IMAGENET_EPOCH // BATCH)
    c.init = {"source": arg.unmasked_from, "preset": "same"}
    class_names = zeroshot.read_class_names(arg.class_names_file) if arg.class_names_file else None
    c.evals = {
        "every_steps": 10_000,
        "zeroshot": {
            "data": {"name": "imagenet2012", "split": "validation", "data_dir": arg.data_dir},
            "pp": "decode|resize_small(224)|central_crop(224)|normalize('imagenet')|keep('image','label')",
            "batch_size": 1024, "templates": list(zeroshot.SIMPLE_IMAGENET_TEMPLATES), "class_names": class_names,
            "max_examples": None},
    }
    if arg.smoke:   # a few steps of a tiny CLIP on the embedded shapes data: runs in CI
        smoke.tiny_clip(c, norm="imagenet")
        c.schedule.lr = 1e-3
    return c
