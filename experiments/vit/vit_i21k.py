"""ViT-B/16 pretraining on ImageNet-21k, original recipe (Dosovitskiy et al. 2021, "An Image is
Worth 16x16 Words", Table 3 / App. B.1).

Recipe sources. The hyper-parameters are the ones a vision_transformer maintainer gave for the
released i21k B/16 checkpoint in google-research/vision_transformer issue #2 (Adam, batch 4096,
lr 1e-3, 10k warmup, linear decay to 1e-5, wd 0.03, dropout 0.1, 90 epochs, representation
(pre-logits) size 768, head bias initialised to -10). The same numbers are in the paper's Table 3
[paper; not re-checked here]. A -10 head bias only makes sense with a per-class sigmoid loss, so
this config uses sigmoid cross-entropy, as big_vision's i21k configs do. Set `loss=softmax_xent`
to try softmax instead. Weight decay uses optax.adamw's lr-scaled decoupled convention, the same
as flax.optim.Adam's `weight_decay` that the original code used. Decay is masked off biases,
norms, position embeddings and the class token. The paper's own masking is not stated.

Expected: this pretraining run has no standard headline of its own; the number is after IN-1k
fine-tuning, which is a separate recipe. timm measures the original-recipe i21k B/16 weights,
fine-tuned on IN-1k, at 84.21% top-1 @384 and 81.78% @224
[repo:huggingface/pytorch-image-models results/results-imagenet.csv, via RECIPES.md §1]. The
paper's headline for this data set is ViT-L/16 (I21k) 85.30% [paper; not re-checked]. During
pretraining this config reports top-1 on a held-out 25,600-image slice of ImageNet-21k.
Hardware and time: the paper says ViT-L/16 on I21k trains in about 30 days on one 8-core cloud
TPUv3 [paper; not re-checked]. B/16 takes roughly a third of that compute.

Data: ImageNet-21k (fall11, about 14.2M images, 21,843 classes) is not in public TFDS, and mmjax
never downloads it. Prepare it yourself as a TFDS array_record builder named `imagenet21k`, with
features {'image', 'label'} and one split `full`, in DATA_DIR. As in big_vision, the first
51,200 examples are held out: train on `full[51200:]` and evaluate on `full[:25600]`.

  mmjax-train --config experiments/vit/vit_i21k.py:data_dir=/data/tfds --workdir runs/vit_i21k_b16
  mmjax-train --config experiments/vit/vit_i21k.py:smoke=True --workdir /tmp/smoke_vit_i21k
"""

import ml_collections

from mmjax import configs, smoke

NUM_CLASSES = 21_843
I21K_IMAGES = 14_197_122          # fall11 release; your prepared copy may differ slightly
HOLDOUT = 51_200                  # full[:51200] is held out, as in big_vision's vit_i21k.py
BATCH = 4096
EPOCHS = 90


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B/16", data_dir=None, loss="sigmoid_xent", smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    # 90 epochs x (14,197,122 - 51,200 = 14,145,922 train images) // 4096 = 310,823 steps.
    # To count the prepared split instead, pass --config.total_steps=None (num_epochs is then used).
    c.total_steps = EPOCHS * (I21K_IMAGES - HOLDOUT) // BATCH
    c.num_epochs = EPOCHS
    c.model = dict(
        variant=arg.variant, pool="cls", posemb="learn",
        representation_size=768,        # the paper's pre-training head: one tanh hidden layer
        num_classes=NUM_CLASSES, head_zero_init=True, head_bias_init=-10.0,
        dropout=0.1, dtype="bfloat16", scan=True, remat_policy="dots_no_batch",
    )
    c.loss = dict(name=arg.loss)
    data = dict(name="imagenet21k", split=f"full[{HOLDOUT}:]", data_dir=arg.data_dir)
    c.input = dict(
        data=data,
        batch_size=BATCH,
        pp="decode|inception_crop(224)|flip_lr|value_range(-1,1)|keep('image','label')",
        worker_count=16,                # JPEG decoding and cropping need worker processes
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.03,
                       grad_clip_norm=None)   # the sources give no clipping for pretraining
    c.schedule = dict(lr=1e-3, warmup_steps=10_000, decay="linear", end_lr=1e-5)
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
                       representation_size=64, num_classes=24, dtype="float32")
        smoke.shapes_input(c, "resize(32)|flip_lr|value_range(-1,1)|keep('image','label')")
        smoke.shapes_eval(c.evals.top1, "resize(32)|value_range(-1,1)|keep('image','label')")
    return c
