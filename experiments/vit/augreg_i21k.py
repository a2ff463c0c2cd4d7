"""ViT pretraining on ImageNet-21k, AugReg recipe (Steiner et al. 2022, "How to train your ViT?
Data, Augmentation, and Regularization in Vision Transformers"). B/16 by default; set `variant`
to Ti/16, S/32, S/16, B/32, B/16 or L/16.

Recipe source: google-research/big_vision `big_vision/configs/vit_i21k.py` (via RECIPES.md §1b,
re-read for this file). Settings: sigmoid cross-entropy over 21,843 classes, head bias -10,
batch 4096, 300 epochs (the paper also runs 30), a GAP head with learned position embeddings and
no pre-logits layer, and `scale_by_adam` with a bfloat16 first moment. Also lr 1e-3, 10k warmup,
cosine decay, global-norm clipping at 1, no dropout or stochastic depth.
big_vision's decoupled `wd=1e-4` is applied unscaled by lr. At lr 1e-3 it equals the paper's
"wd 0.1", which is `weight_decay=0.1` in optax.adamw's lr-scaled convention used here. mmjax
decays kernels and embeddings but not biases, norms, position embeddings or the class token
(RECIPES.md §1b).

Augmentation: big_vision picks RandAugment plus mixup per size: Ti/16 and S/32 use none; S/16
uses light1 = randaug(2,0); B/32 and B/16 use light2 = randaug(2,10) + mixup p=0.2; L/16 uses
medium2 = randaug(2,15) + mixup p=0.5.
RandAugment is reproduced APPROXIMATELY (`RANDAUG`). big_vision's `randaug` is TF's
`distort_image_with_randaugment` (tensorflow/tpu autoaugment.py), not timm's: it applies every
chosen op (no 0.5 coin) at the fixed magnitude (no noise; 15 goes past timm's cap of 10), with
the unsigned, weakening-with-magnitude Posterize/Solarize/enhance ranges, nearest-neighbour
warps, grey fill and 100-pixel translations. So the `randaugment` op runs with prob=1,
magnitude_std=0, magnitude_max=max(m, 10), increasing=False, fill=128, interpolation='nearest'
and translate_pct=100/224. Still different: TF also draws Cutout (a grey square of side 8·m px)
as a 16th op, which timm's op set lacks, so the other ops come up 1/15 instead of 1/16 of the
time; TF's Contrast blends towards (pixel count / 256) rather than the mean grey, a quirk of its
code; at m=15 TF's SolarizeAdd adds 165 where timm's caps at 128; warps may differ by a pixel
(TF's and PIL's pixel-centre conventions). Magnitude 0 (light1) behaves as in TF: Posterize
keeps 0 bits and Solarize inverts every pixel.
Mixup IS reproduced (`c.mixup`): big_vision's `p` is the Beta concentration and every batch is
mixed, without CutMix, so B/32 and B/16 use mixup_alpha=0.2 and L/16 mixup_alpha=0.5 with
cutmix_alpha=0 and prob=1. big_vision pairs each example with its neighbour (roll by one), mmjax
with the flipped batch (timm's pairing); for a shuffled batch each example's partner is equally
random either way.

Expected: after IN-1k fine-tuning at 384 px (20k steps; a separate recipe), B/16 reaches
85.49% top-1 and L/16 85.59%, S/16 83.73%, Ti/16 78.22% [repo:google-research/vision_transformer
README, via RECIPES.md §1b]. timm measures B/16 at 86.01% @384
[repo:huggingface/pytorch-image-models results/results-imagenet.csv]. During pretraining this
config reports top-1 on big_vision's held-out "test" slice `full[:25600]`. Hardware and time:
not recorded in the sources used here.

Data: ImageNet-21k (fall11, about 14.2M images, 21,843 classes) is not in public TFDS, and mmjax
never downloads it. Prepare it yourself as a TFDS array_record builder named `imagenet21k`, with
features {'image', 'label'} and one split `full`, in DATA_DIR. Training uses `full[51200:]`, as
in big_vision.

  mmjax-train --config experiments/vit/augreg_i21k.py:variant=B/16,data_dir=/data/tfds --workdir runs/augreg_b16
  mmjax-train --config experiments/vit/augreg_i21k.py:variant=L/16,epochs=30,data_dir=/data/tfds --workdir runs/augreg_l16_30ep
  mmjax-train --config experiments/vit/augreg_i21k.py:smoke=True --workdir /tmp/smoke_augreg_i21k
"""

import ml_collections

from mmjax import configs, smoke

NUM_CLASSES = 21_843
I21K_IMAGES = 14_197_122          # fall11 release; your prepared copy may differ slightly
HOLDOUT = 51_200                  # big_vision: train_split = 'full[51200:]'
BATCH = 4096
# big_vision's mixup p (a Beta concentration) per variant; the others use no mixup.
MIXUP_ALPHA = {"B/32": 0.2, "B/16": 0.2, "L/16": 0.5}
# big_vision vit_i21k.py's per-variant augmentation setting (RandAugment below, mixup above).
AUG_SETTING = {"Ti/16": "none", "S/32": "none", "S/16": "light1", "B/32": "light2",
               "B/16": "light2", "L/16": "medium2"}
# big_vision's randaug(num_layers, magnitude) per setting; None: no RandAugment.
RANDAUG = {"none": None, "light1": (2, 0), "light2": (2, 10), "medium2": (2, 15)}


def _randaug_pp(setting):
    """big_vision's randaug(n, m) as the `randaugment` pp op set to TF's semantics as far as they
    go (see the docstring), with its trailing `|`; empty without RandAugment."""
    if RANDAUG[setting] is None:
        return ""
    layers, magnitude = RANDAUG[setting]
    return (f"randaugment({layers}, {magnitude}, magnitude_std=0.0, magnitude_max={max(magnitude, 10)}, "
            f"increasing=False, prob=1.0, fill=128, interpolation='nearest', translate_pct={100 / 224})|")


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B/16", epochs=300, data_dir=None, smoke=False)
    if arg.variant not in AUG_SETTING:
        raise ValueError(f"AugReg i21k has settings for {sorted(AUG_SETTING)}, not {arg.variant!r}")
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    # 300 epochs x (14,197,122 - 51,200 = 14,145,922 train images) // 4096 = 1,036,078 steps
    # (30 epochs: 103,607). To count the prepared split instead, pass --config.total_steps=None.
    c.total_steps = arg.epochs * (I21K_IMAGES - HOLDOUT) // BATCH
    c.num_epochs = arg.epochs
    c.model = dict(
        variant=arg.variant, pool="gap", posemb="learn", representation_size=None,
        num_classes=NUM_CLASSES, head_zero_init=True, head_bias_init=-10.0,
        dropout=0.0, dtype="bfloat16", scan=True, remat_policy="dots_no_batch",
    )
    c.loss = dict(name="sigmoid_xent")
    if arg.variant in MIXUP_ALPHA:
        c.mixup = dict(mixup_alpha=MIXUP_ALPHA[arg.variant], cutmix_alpha=0.0, switch_prob=0.5, prob=1.0)
    c.input = dict(
        data=dict(name="imagenet21k", split=f"full[{HOLDOUT}:]", data_dir=arg.data_dir),
        batch_size=BATCH,
        # big_vision: decode_jpeg_and_inception_crop(224)|flip_lr|<randaug per AUG_SETTING>|value_range(-1,1)
        pp=f"decode|inception_crop(224)|flip_lr|{_randaug_pp(AUG_SETTING[arg.variant])}value_range(-1,1)"
           "|keep('image','label')",
        worker_count=16,
    )
    # scale_by_adam (b1 0.9, b2 0.999, eps 1e-8) with mu in bf16, decoupled wd 1e-4 == 0.1 x lr.
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                       grad_clip_norm=1.0, mu_dtype="bfloat16")
    c.schedule = dict(lr=1e-3, warmup_steps=10_000, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"                 # with fsdp=1 this is plain data parallelism; raise it to shard
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(
        every_steps=10_000,
        top1=dict(data=dict(name="imagenet21k", split="full[:25600]", data_dir=arg.data_dir),
                  pp="decode|resize_small(256)|central_crop(224)|value_range(-1,1)|keep('image','label')",
                  batch_size=1024, max_examples=None),
    )
    if arg.smoke:   # a few steps of a tiny ViT on the embedded shapes data: runs in CI
        smoke.short_run(c)
        c.model.update(width=64, depth=2, num_heads=2, mlp_dim=256, patch_size=8,
                       num_classes=24, dtype="float32")
        smoke.shapes_input(c, f"resize(32)|flip_lr|{_randaug_pp(AUG_SETTING[arg.variant])}value_range(-1,1)"
                              "|keep('image','label')")
        smoke.shapes_eval(c.evals.top1, "resize(32)|value_range(-1,1)|keep('image','label')")
    return c
