"""BEiT-B/16 pretraining on ImageNet-1k (Bao et al. 2022, "BEiT: BERT Pre-Training of Image
Transformers"; recipe from microsoft/unilm beit/README.md and run_beit_pretraining.py).

Model: ViT-B/16 with layer scale 0.1, a shared relative position bias, no absolute position
embedding, a mask token, and a linear head onto the 8192 visual tokens. Targets: the frozen
DALL-E dVAE tokenizer's argmax tokens of the same image at 112×112 (a 14×14 grid aligned with the
16-px patches). Masking: blockwise, 75 of 196 patches (≈40%), blocks ≥ 16 patches, aspect ratio
in [0.3, 1/0.3]. Loss: cross-entropy on the masked patches. Optimiser: AdamW β=(0.9, 0.999),
eps 1e-8, lr 1.5e-3, weight decay 0.05, gradient clipping 3.0, batch 2048, 10 warmup epochs,
cosine to 1e-5, 800 epochs.

Differences from the reference: the tokenizer sees the 224-px crop resized to 112 px with
Lanczos inside the step (BEiT resizes the same crop from the original image). BEiT's colour
jitter (0.4, 0.4, 0.4) is the `color_jitter` pp op, right after decoding as in BEiT. Drop path
0.1 (rising over the blocks) and BEiT's "rescale" init of the attention-output and fc2 kernels
(÷ sqrt(2 · layer), the BEiT model's default) are on.

Tokenizer weights: OpenAI's DALL-E encoder (`encoder.pkl`) converted into an mmjax model
directory holding a `mmjax.models.dvae.DVAEEncoder` (mmjax-convert gains the dVAE table with the
conversion work of this issue); pass it as `tokenizer=DIR`.

Expected: no number of its own; BEiT-B pretrained on IN-1k (800 epochs) and fine-tuned with
in1k_finetune.py reaches IN-1k top-1 83.2 [paper Table 1; not re-checked]. The masked-token
loss and accuracy on a validation slice are reported during training. Data: TFDS `imagenet2012`
prepared locally in DATA_DIR (mmjax never downloads it).

  mmjax-train --config experiments/beit/in1k_pretrain.py:tokenizer=/ckpt/dalle_dvae,data_dir=/data/tfds \\
      --workdir runs/beit_b16_in1k
  mmjax-train --config experiments/beit/in1k_pretrain.py:smoke=True --workdir /tmp/smoke_beit
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.data import image_ops

IN1K_TRAIN = 1_281_167
BATCH = 2048
EPOCHS = 800


def get_config(arg=None):
    arg = configs.parse_arg(arg, tokenizer="", data_dir=None, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "beit"
    c.seed = 0
    steps_per_epoch = IN1K_TRAIN // BATCH
    c.total_steps = EPOCHS * steps_per_epoch
    c.model = dict(variant="B/16", vocab_size=8192, layer_scale=0.1, rel_pos="shared", abs_posemb=False,
                   ln_eps=1e-6, dtype="bfloat16", scan=True, remat_policy="dots_no_batch", drop_path=0.1)
    mean, std = image_ops.NORMALIZE_PRESETS["imagenet"]
    c.tokenizer = dict(checkpoint=arg.tokenizer or None, image_size=112, pixel_mean=mean, pixel_std=std)
    c.masking = dict(num_masking_patches=75, min_num_patches=16, min_aspect=0.3)
    c.input = dict(
        data=dict(name="imagenet2012", split="train", data_dir=arg.data_dir),
        batch_size=BATCH,
        pp="decode|color_jitter(0.4, 0.4, 0.4)|inception_crop(224, area_min=0.08, method='bicubic')|flip_lr"
           "|normalize('imagenet')|keep('image')",
        worker_count=16,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=3.0,
                       freeze=("^tokenizer/",))
    c.schedule = dict(lr=1.5e-3, warmup_steps=10 * steps_per_epoch, decay="cosine", end_lr=1e-5)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    c.evals = dict(every_steps=10_000, mim=dict(
        data=dict(name="imagenet2012", split="validation", data_dir=arg.data_dir),
        pp="decode|resize_small(256, method='bicubic')|central_crop(224)|normalize('imagenet')|keep('image')",
        batch_size=1024, max_examples=10_000, seed=0))
    if arg.smoke:   # a few steps of a tiny BEiT and dVAE (random weights) on the shapes data: runs in CI
        smoke.short_run(c)
        c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, vocab_size=64,
                       dtype="float32", remat_policy="none")
        c.tokenizer.update(checkpoint="random", image_size=32, n_hid=16, blocks_per_group=1, vocab_size=64)
        c.masking.update(num_masking_patches=6, min_num_patches=2)
        smoke.shapes_input(c, "color_jitter(0.4, 0.4, 0.4)|resize(32)|flip_lr|normalize('imagenet')|keep('image')")
        smoke.shapes_eval(c.evals.mim, "resize(32)|normalize('imagenet')|keep('image')", 16)
    return c
