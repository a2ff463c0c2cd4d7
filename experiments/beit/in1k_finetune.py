"""BEiT-B/16 fine-tuning on ImageNet-1k (Bao et al. 2022; recipe from microsoft/unilm
beit/get_started_for_image_classification.md and run_class_finetuning.py).

Model: BEiT-B/16 with layer scale 0.1, a relative position bias per layer (the pretrained
shared table copied into every layer), mean pooling of the patch tokens → LayerNorm → linear
head (initialised ×0.001). Optimiser: AdamW β=(0.9, 0.999), lr 4e-3, weight decay 0.05, layer
decay 0.65, batch 1024, 20 warmup epochs, cosine to 1e-6, 100 epochs, label smoothing 0.1.

Regularisation: drop path 0.1 (rising linearly over the blocks), mixup 0.8 / cutmix 1.0 (switch
prob 0.5, every batch, label smoothing folded into the mixed targets, on device in the step).

Augmentation (run_class_finetuning.py's defaults, built by timm's create_transform): random
resized crop (bicubic), flip, RandAugment `rand-m9-mstd0.5-inc1` (the `randaugment` op: 2 layers,
magnitude 9 ± 0.5, each op with prob 0.5, mean-colour fill, bicubic), normalisation, then random
erasing 0.25 ('pixel' mode, on the normalised image).

Initialisation (`:init_from=DIR`, an in1k_pretrain.py workdir or a BEiT model directory from
mmjax-convert; `init.preset="beit_to_classifier"`, see mmjax/warm_start.py): copy the backbone,
give each layer's `rel_pos_bias/table` the shared pretrained one, start `norm` and `head` fresh,
drop the mask token, the visual-token head and the dVAE. Without `init_from` it trains from scratch.
At another resolution (BEiT's 384 fine-tunes: a 384 crop in the pp strings) the pretrained table
is resized to the new window with BEiT's geometric bicubic interpolation.

Expected (from BEiT-B pretrained 800 epochs on IN-1k): IN-1k top-1 83.2 at 224 px [paper
Table 1; not re-checked]; from the IN-22k-pretrained weights 83.7 [repo README, via RECIPES.md §3].

  mmjax-train --config experiments/beit/in1k_finetune.py:data_dir=/data/tfds,init_from=runs/beit_b16 \\
      --workdir runs/beit_ft_b16
  mmjax-train --config experiments/beit/in1k_finetune.py:smoke=True --workdir /tmp/smoke_beit_ft
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.data import presets

IN1K_TRAIN = 1_281_167
BATCH = 1024
EPOCHS = 100


def get_config(arg=None):
    arg = configs.parse_arg(arg, data_dir=None, init_from=None, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "beit_classification"
    c.seed = 0
    steps_per_epoch = IN1K_TRAIN // BATCH
    c.total_steps = EPOCHS * steps_per_epoch
    c.model = dict(variant="B/16", num_classes=1000, layer_scale=0.1, rel_pos="layer", abs_posemb=False,
                   head_init_scale=0.001, ln_eps=1e-6, dtype="bfloat16", scan=True, remat_policy="dots_no_batch",
                   drop_path=0.1)
    c.loss = dict(name="softmax_xent", label_smoothing=0.1)
    c.init = dict(source=arg.init_from, preset="beit_to_classifier")
    c.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
    c.input = dict(
        data=dict(name="imagenet2012", split="train", data_dir=arg.data_dir),
        batch_size=BATCH,
        pp=presets.DEIT_TRAIN_PP,
        worker_count=16,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=None,
                       layer_decay=0.65)
    c.schedule = dict(lr=4e-3, warmup_steps=20 * steps_per_epoch, decay="cosine", end_lr=1e-6)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=5_000, top1=dict(
        data=dict(name="imagenet2012", split="validation", data_dir=arg.data_dir),
        pp=presets.DEIT_EVAL_PP,
        batch_size=1024, max_examples=None))
    if arg.smoke:   # a few steps of a tiny BEiT classifier on the embedded shapes data: runs in CI
        smoke.short_run(c)
        c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, num_classes=24,
                       dtype="float32", remat_policy="none")
        smoke.shapes_input(c, "resize(32)|flip_lr|randaugment|normalize('imagenet')|random_erasing(0.25)"
                              "|keep('image','label')")
        smoke.shapes_eval(c.evals.top1, "resize(32)|normalize('imagenet')|keep('image','label')", 16)
    return c
