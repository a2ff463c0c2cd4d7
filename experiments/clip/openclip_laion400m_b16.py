"""OpenCLIP ViT-B/16 on LAION-400M (Ilharco et al. 2021, mlfoundations/open_clip; release v0.2,
pretrained tags `laion400m_e31` / `laion400m_e32`), a reproduction of CLIP (Radford et al. 2021)
on open data.

Recipe and sources (all in the mlfoundations/open_clip repository):
- Batch and hardware [docs/PRETRAINED.md, "ViT-B/16 224x224"]: global batch 33,792 (192 per GPU
  on 176 A100-40GB), about 61 hours (10,700 GPU-hours).
- Length, warmup and loss [README.md, SLURM script for the LAION-400M runs]: 32 epochs and 2,000
  warmup steps, with `--local-loss --gather-with-grad`, which is the ordinary contrastive loss
  over the full global batch (mmjax's "clip" loss).
- Optimiser defaults [src/open_clip_train/params.py, `get_default_params` and argument defaults,
  read from open_clip_train 3.3.0]. The script sets no optimiser flags, so the defaults apply:
  AdamW lr 5e-4, β1 0.9, β2 0.98, ε 1e-6 ("params from paper" for ViTs), weight decay 0.2, cosine
  schedule, no gradient clipping, precision `amp` (fp16 autocast). Issue #100 confirms the
  maintainers used the CLIP paper's hyper-parameters, and issue #598 points to the README script
  plus PRETRAINED.md for the B/16 details.
- Weight decay [src/open_clip_train/main.py]: applied to every weight except gains, biases and
  the temperature (parameters with ndim < 2 or named "ln", "bn", "bias" or "logit_scale").
- Architecture [src/open_clip/model_configs/ViT-B-16.json, pretrained.py]: ViT-B/16 image tower
  (768 wide, 12 layers) and text tower 512 wide, 8 heads, 12 layers, context 77, vocab 49,408;
  512-d embedding, plain GELU. These weights are not a `-quickgelu` config, unlike OpenAI's and
  the LAION-400M B/32. Logit scale starts at ln(1/0.07) and is clamped at 100.
- Augmentation [src/open_clip/transform.py]: a random resized crop of 224 px with area 0.9-1.0
  and bicubic resampling, no flip, and OpenAI's mean/std. Eval resizes the short side to 224 and
  takes a centre crop.
Differences here: bf16 compute instead of fp16 autocast.

Expected: zero-shot ImageNet-1k top-1 of 67.07% (docs/PRETRAINED.md). open_clip's benchmark table
gives 67.05% for `laion400m_e32` and 66.98% for `laion400m_e31` [docs/openclip_results.csv]. For
comparison, OpenAI's own B/16 scores 68.34% in that table. PRETRAINED.md notes a shard-shuffling
bug in that run, fixed at epoch 26.

Zero-shot eval: this config uses 7 of CLIP's 80 templates, not the full 80 that open_clip's own
eval uses. They are open_clip's SIMPLE_IMAGENET_TEMPLATES, from OpenAI's prompt-engineering
notebook; expect a slightly lower number. The eval needs readable class names. TFDS
`imagenet2012` names its classes by WordNet id (n01440764, ...), so pass `class_names_file=` a
text file with open_clip's IMAGENET_CLASSNAMES, one per line, in label order.

Data: nothing is downloaded. Fetch LAION-400M yourself (for example with img2dataset) and
unpack it into a folder with a captions JSONL, lines like {"image": "relative/path.jpg",
"caption": "..."}, using `image_dir=` and `captions=`. mmjax has no webdataset-shard source yet.
Prepare `imagenet2012` (split `validation`) with TFDS in array_record format in `data_dir=`.

  mmjax-train --config experiments/clip/openclip_laion400m_b16.py:image_dir=/data/laion400m,captions=/data/laion400m/captions.jsonl,data_dir=/data/tfds,class_names_file=/data/imagenet_clip_classnames.txt --workdir runs/openclip_laion400m_b16
  mmjax-train --config experiments/clip/openclip_laion400m_b16.py:smoke=True --workdir /tmp/smoke_openclip_laion400m_b16
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.evaluate import zeroshot

NUM_PAIRS = 400_000_000           # nominal LAION-400M; the copy you can still fetch is smaller
BATCH = 33_792                    # 176 GPUs x 192
EPOCHS = 32
# open_clip_train/main.py decays every weight except gains, biases and logit_scale; the class
# token (1-D there, 3-D here) is excluded too. Position and token embeddings are decayed.
WD_EXCLUDE = (r"logit_scale", r"norm|ln_|(^|/)scale$", r"bias", r"(^|/)cls$")


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B/16", image_dir=None, captions=None, data_dir=None,
                            class_names_file=None, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    # 32 epochs x 400,000,000 pairs // 33,792 = 378,787 steps (about 12.8B samples seen).
    # To count your local copy instead, pass --config.total_steps=None (num_epochs is then used).
    c.total_steps = EPOCHS * NUM_PAIRS // BATCH
    c.num_epochs = EPOCHS
    tower = dict(act="gelu", scan=True, remat_policy="dots_no_batch")
    c.model = dict(
        embed_dim=512,
        image=dict(variant=arg.variant, **tower),   # CLIP adds pool=cls, ln_pre, no patch bias
        text=dict(vocab_size=49_408, context_length=77, width=512, depth=12, num_heads=8, **tower),
        logit_scale_init=2.659260,      # ln(1 / 0.07)
        dtype="bfloat16",               # both towers and the projections compute in bf16
    )
    c.loss = dict(name="clip")
    c.input = dict(
        data=dict(name="folder", image_dir=arg.image_dir, captions=arg.captions),
        batch_size=BATCH,
        pp="decode|inception_crop(224, area_min=0.9, method='bicubic')|normalize('clip')"
           "|tokenize(key='caption',out='text')|keep('image','text')",
        tokenizer=dict(name="clip", context_length=77),
        # 0 until mmjax's ClipTokenizer pickles into grain workers (its per-instance lru_cache
        # does not); then raise to ~16 so JPEG decoding keeps up.
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                       grad_clip_norm=None, wd_exclude=list(WD_EXCLUDE))
    c.schedule = dict(lr=5e-4, warmup_steps=2_000, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"                 # with fsdp=1 this is plain data parallelism; raise it to shard
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    class_names = zeroshot.read_class_names(arg.class_names_file) if arg.class_names_file else None
    c.evals = dict(
        every_steps=NUM_PAIRS // BATCH,  # once per epoch (open_clip: --zeroshot-frequency)
        zeroshot=dict(
            data=dict(name="imagenet2012", split="validation", data_dir=arg.data_dir),
            pp="decode|resize_small(224, method='bicubic')|central_crop(224)|normalize('clip')"
               "|keep('image','label')",
            batch_size=1024, templates=list(zeroshot.SIMPLE_IMAGENET_TEMPLATES), class_names=class_names,
            max_examples=None),
    )
    if arg.smoke:   # a few steps of a tiny CLIP on the embedded shapes data: runs in CI
        smoke.tiny_clip(c, norm="clip")
    return c
