"""CLIP ViT-B/16, paper recipe (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", Sec. 2.5 and Tables 19-20).

Recipe (RECIPES.md §4; the optimisation numbers are [paper; not re-checked against the PDF]):
- Optimiser: Adam with decoupled weight decay 0.2, not applied to gains or biases; β1 0.9,
  β2 0.98, ε 1e-6.
- Batch and length: batch 32,768 for 32 epochs over the 400M-pair WIT set.
- Schedule: 2,000 warmup steps, then cosine decay; peak lr 5e-4 for B/32 and B/16, 4e-4 for L/14.
- Architecture [repo:openai/CLIP clip/model.py; open_clip model_configs/ViT-B-16.json]:
  - Towers: ViT-B/16 image tower (768 wide, 12 layers) with `ln_pre`, no patch bias and a CLS
    readout; text tower 512 wide, 8 heads, 12 layers, context 77, BPE vocab 49,408, read at the
    EOT token.
  - Embedding and activation: 512-d joint embedding; QuickGELU in both towers.
  - Temperature: learnable logit scale initialised to ln(1/0.07), clamped at 100.
- Augmentation: a random square crop of the resized image is the only augmentation [paper].
Differences here: bf16 compute instead of fp16 mixed precision, and fp32 Adam moments; the paper
keeps the Adam statistics in half precision. Weight decay follows the paper and open_clip
(`open_clip_train/main.py`): every weight is decayed except gains, biases, the temperature and
the class token. That includes position and token embeddings.

Expected: zero-shot ImageNet-1k top-1 of 68.3% for OpenAI's released B/16 weights, as open_clip
re-measures them with CLIP's 80 prompt templates [repo:mlfoundations/open_clip
docs/openclip_results.csv, row `ViT-B-16,openai`, 0.6834]. The paper's headline is L/14@336
76.2% [paper; not re-checked]. WIT is not public, so a run on another 400M-pair set will differ.
Hardware and time: the paper gives no B/16 figure; L/14 took 12 days on 256 V100s [paper; not
re-checked].

Zero-shot eval: this config uses 7 of CLIP's 80 templates, not the full 80. They are the ones
forward selection picked in OpenAI's Prompt_Engineering_for_ImageNet notebook, shipped by
open_clip as SIMPLE_IMAGENET_TEMPLATES. Expect a result a little below the 80-template number.
The eval needs readable class names. TFDS `imagenet2012` names its classes by WordNet id
(n01440764, ...), which makes meaningless prompts. So pass `class_names_file=` a text file with
CLIP's 1000 curated ImageNet class names, one per line, in label order (the list is
open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES). Without it, the names come from the data set.

Data: nothing is downloaded. Put the training pairs in a folder with a captions JSONL, lines like
{"image": "relative/path.jpg", "caption": "..."}, using `image_dir=` and `captions=`. Prepare
`imagenet2012` (split `validation`) with TFDS in array_record format in `data_dir=`.

  mmjax-train --config experiments/clip/vit_b16.py:variant=B/16,image_dir=/data/pairs,captions=/data/pairs/captions.jsonl,data_dir=/data/tfds,class_names_file=/data/imagenet_clip_classnames.txt --workdir runs/clip_b16
  mmjax-train --config experiments/clip/vit_b16.py:smoke=True --workdir /tmp/smoke_clip_vit_b16
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.evaluate import zeroshot

# variant: (embed_dim, text width, text heads, text depth, peak lr) [RECIPES.md §4; lr: paper].
VARIANTS = {
    "B/32": (512, 512, 8, 12, 5e-4),
    "B/16": (512, 512, 8, 12, 5e-4),
    "L/14": (768, 768, 12, 12, 4e-4),
}
NUM_PAIRS = 400_000_000           # WIT
BATCH = 32_768
EPOCHS = 32
# Weight decay on every weight except gains (norm scales), biases, the temperature and the class
# token, like open_clip_train/main.py; position and token embeddings are decayed.
WD_EXCLUDE = (r"logit_scale", r"norm|ln_|(^|/)scale$", r"bias", r"(^|/)cls$")


def get_config(arg=None):
    arg = configs.parse_arg(arg, variant="B/16", image_dir=None, captions=None, data_dir=None,
                            class_names_file=None, smoke=False)
    if arg.variant not in VARIANTS:
        raise ValueError(f"CLIP recipe variants: {sorted(VARIANTS)}, not {arg.variant!r}")
    embed_dim, text_width, text_heads, text_depth, lr = VARIANTS[arg.variant]
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    # 32 epochs x 400,000,000 pairs // 32,768 = 390,625 steps (12,207 steps per epoch).
    # To count a local data set instead, pass --config.total_steps=None (num_epochs is then used).
    c.total_steps = EPOCHS * NUM_PAIRS // BATCH
    c.num_epochs = EPOCHS
    tower = dict(act="quick_gelu", scan=True, remat_policy="dots_no_batch")
    c.model = dict(
        embed_dim=embed_dim,
        image=dict(variant=arg.variant, **tower),   # CLIP adds pool=cls, ln_pre, no patch bias
        text=dict(vocab_size=49_408, context_length=77, width=text_width, depth=text_depth,
                  num_heads=text_heads, **tower),
        logit_scale_init=2.659260,      # ln(1 / 0.07)
        dtype="bfloat16",               # both towers and the projections compute in bf16
    )
    c.loss = dict(name="clip")
    c.input = dict(
        data=dict(name="folder", image_dir=arg.image_dir, captions=arg.captions),
        batch_size=BATCH,
        pp="decode|resize_small(224, method='bicubic')|random_crop(224)|normalize('clip')"
           "|tokenize(key='caption',out='text')|keep('image','text')",
        tokenizer=dict(name="clip", context_length=77),
        # 0 until mmjax's ClipTokenizer pickles into grain workers (its per-instance lru_cache
        # does not); then raise to ~16 so JPEG decoding keeps up.
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                       grad_clip_norm=None, wd_exclude=list(WD_EXCLUDE))
    c.schedule = dict(lr=lr, warmup_steps=2_000, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "fsdp"                 # with fsdp=1 this is plain data parallelism; raise it to shard
    c.log_every_steps = 100
    c.checkpoint = dict(every_steps=5_000, keep=2)
    class_names = zeroshot.read_class_names(arg.class_names_file) if arg.class_names_file else None
    c.evals = dict(
        every_steps=NUM_PAIRS // BATCH,  # once per epoch
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
