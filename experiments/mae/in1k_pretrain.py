"""MAE pretraining on ImageNet-1k (He et al. 2022, "Masked Autoencoders Are Scalable Vision
Learners"; recipe from facebookresearch/mae PRETRAIN.md and main_pretrain.py).

Model: ViT encoder on the 25% visible patches (`mae_vit_{base,large,huge}_patch*_dec512d8b`):
variant B/16, L/16 or H/14, fixed 2-D sin-cos position embeddings, decoder 512 wide, 8 blocks,
16 heads; random masking ratio 0.75; loss on masked patches only, per-patch normalised pixels
(`norm_pix_loss`, unbiased variance, eps 1e-6). Optimiser: AdamW β=(0.9, 0.95), weight decay
0.05 (not on biases, norms, tokens), lr = 1.5e-4 × 4096 / 256 = 2.4e-3, 40 warmup epochs, then
half-cycle cosine to 0, batch 4096, 800 epochs (`:epochs=1600` for the paper's main results).
Augmentation: RandomResizedCrop(224, scale (0.2, 1), bicubic) + horizontal flip only.

Expected: no number of its own; the pretrained encoder fine-tuned with in1k_finetune.py reaches
IN-1k top-1 83.6 (B), 85.9 (L), 86.9 (H) [repo README, via RECIPES.md §2]. The reconstruction
loss on a 10,000-image validation slice is reported during training. Hardware and time: ViT-L,
800 epochs, about 42 h on 64 V100 [repo PRETRAIN.md]. Data: TFDS `imagenet2012` prepared
locally in DATA_DIR (mmjax never downloads it).

  mmjax-train --config experiments/mae/in1k_pretrain.py:variant=L/16,epochs=800,data_dir=/data/tfds \\
      --workdir runs/mae_l16_800ep
  mmjax-train --config experiments/mae/in1k_pretrain.py:smoke=True --workdir /tmp/smoke_mae_in1k
"""

import ml_collections

from mmjax import configs, smoke

IN1K_TRAIN = 1_281_167
BATCH = 4096
BASE_LR = 1.5e-4          # per 256 examples


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B/16", epochs=800, data_dir=None, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "mae"
    c.seed = 0
    steps_per_epoch = IN1K_TRAIN // BATCH
    c.total_steps = arg.epochs * steps_per_epoch
    c.model = dict(variant=arg.variant, decoder_width=512, decoder_depth=8, decoder_heads=16,
                   decoder_mlp_dim=2048, mask_ratio=0.75, ln_eps=1e-6, dtype="bfloat16", scan=True,
                   remat_policy="dots_no_batch")
    c.loss = dict(norm_pix=True)
    c.input = dict(
        data=dict(name="imagenet2012", split="train", data_dir=arg.data_dir),
        batch_size=BATCH,
        pp="decode|inception_crop(224, area_min=0.2, method='bicubic')|flip_lr|normalize('imagenet')|keep('image')",
        worker_count=16,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip_norm=None)
    c.schedule = dict(lr=BASE_LR * BATCH / 256, warmup_steps=40 * steps_per_epoch, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=10_000, recon=dict(
        data=dict(name="imagenet2012", split="validation", data_dir=arg.data_dir),
        pp="decode|resize_small(256)|central_crop(224)|normalize('imagenet')|keep('image')",
        batch_size=1024, max_examples=10_000, seed=0))
    if arg.smoke:   # a few steps of a tiny MAE on the embedded shapes data: runs in CI
        smoke.short_run(c)
        c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                       decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32,
                       dtype="float32", scan=True, remat_policy="none")
        smoke.shapes_input(c, "resize(32)|flip_lr|normalize('imagenet')|keep('image')")
        smoke.shapes_eval(c.evals.recon, "resize(32)|normalize('imagenet')|keep('image')", 16)
    return c
