"""MAE fine-tuning on ImageNet-1k (He et al. 2022; recipe from facebookresearch/mae FINETUNE.md
and main_finetune.py), with layer-wise learning-rate decay.

Model: the pretrained ViT encoder with its [CLS] token kept, global average pooling over the
patch tokens, then LayerNorm (`fc_norm`) and a linear head; learned position embeddings.
Optimiser: AdamW β=(0.9, 0.999), weight decay 0.05, lr = blr × 1024 / 256 with blr 5e-4 (B) /
1e-3 (L, H), layer decay 0.65 (B) / 0.75 (L, H), 5 warmup epochs, cosine, batch 1024, 100 epochs
(B) / 50 (L, H), label smoothing 0.1. Layer decay multiplies block i's lr by
decay ** (depth + 1 - (i + 1)), embeddings by decay ** (depth + 1).

Regularisation: drop path 0.1 (B) / 0.2 (L) / 0.3 (H), rising linearly over the blocks; mixup
0.8 / cutmix 1.0 (switch prob 0.5, every batch, label smoothing folded into the mixed targets),
applied on device in the train step.

Augmentation, as main_finetune.py builds it with timm's create_transform: random resized crop
(area 0.08-1, bicubic), flip, RandAugment `rand-m9-mstd0.5-inc1` (the `randaugment` op: 2 layers,
magnitude 9 ± 0.5, each op with prob 0.5, ImageNet-mean fill, bicubic), normalisation, then
random erasing 0.25 ('pixel' mode, on the normalised image).

Initialisation (`:init_from=DIR`, an in1k_pretrain.py workdir or a model directory from
mmjax-convert; `init.preset="mae_to_vit"`, see mmjax/warm_start.py): copy `embedding`, `cls` and
`encoder`, start the learned `posemb` from the fixed sin-cos table, and `norm` (fc_norm) and
`head` fresh, as main_finetune.py does. Without `init_from` the model trains from scratch.

Expected (from the MAE-pretrained encoder): IN-1k top-1 83.6 (B), 85.9 (L), 86.9 (H)
[repo README, via RECIPES.md §2].

  mmjax-train --config experiments/mae/in1k_finetune.py:variant=B/16,data_dir=/data/tfds,init_from=runs/mae_b16 \\
      --workdir runs/mae_ft_b16
  mmjax-train --config experiments/mae/in1k_finetune.py:smoke=True --workdir /tmp/smoke_mae_ft
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.data import presets

IN1K_TRAIN = 1_281_167
BATCH = 1024
# variant name -> (base lr per 256 examples, layer decay, epochs)
RECIPE = {"B": (5e-4, 0.65, 100), "L": (1e-3, 0.75, 50), "H": (1e-3, 0.75, 50)}
DROP_PATH = {"B": 0.1, "L": 0.2, "H": 0.3}   # FINETUNE.md


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B/16", data_dir=None, init_from=None, smoke=False)
    name = arg.variant.partition("/")[0]
    if name not in RECIPE:
        raise ValueError(f"MAE fine-tuning recipes exist for {sorted(RECIPE)}, got variant {arg.variant!r}")
    base_lr, layer_decay, epochs = RECIPE[name]
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    steps_per_epoch = IN1K_TRAIN // BATCH
    c.total_steps = epochs * steps_per_epoch
    c.model = dict(variant=arg.variant, pool="gap", class_token=True, fc_norm=True, posemb="learn",
                   num_classes=1000, ln_eps=1e-6, dtype="bfloat16", scan=True, remat_policy="dots_no_batch",
                   drop_path=DROP_PATH[name])
    c.loss = dict(name="softmax_xent", label_smoothing=0.1)
    c.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
    c.init = dict(source=arg.init_from, preset="mae_to_vit")
    c.input = dict(
        data=dict(name="imagenet2012", split="train", data_dir=arg.data_dir),
        batch_size=BATCH,
        pp=presets.DEIT_TRAIN_PP,
        worker_count=16,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=None,
                       layer_decay=layer_decay)
    c.schedule = dict(lr=base_lr * BATCH / 256, warmup_steps=5 * steps_per_epoch, decay="cosine", end_lr=1e-6)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=5_000, top1=dict(
        data=dict(name="imagenet2012", split="validation", data_dir=arg.data_dir),
        pp=presets.DEIT_EVAL_PP,
        batch_size=1024, max_examples=None))
    if arg.smoke:   # a few steps of a tiny model on the embedded shapes data: runs in CI
        smoke.short_run(c)
        c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, num_classes=24,
                       dtype="float32", scan=True, remat_policy="none")
        smoke.shapes_input(c, "resize(32)|flip_lr|randaugment|normalize('imagenet')|random_erasing(0.25)"
                              "|keep('image','label')")
        smoke.shapes_eval(c.evals.top1, "resize(32)|normalize('imagenet')|keep('image','label')", 16)
    return c
