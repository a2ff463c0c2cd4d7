"""ViLT answers questions about the embedded shapes (Kim et al. 2021's VQA head and loss, on CPU).

A small ViLT (64 wide, 2 layers, 8-px patches) trained from scratch on generated questions about
the 32×32 shapes images (mmjax/data/shapes_vqa.py: "what colour is the shape?", "what shape is
it?", "how big is the shape?", "where is it?", five phrasings each, 22 answers): ViLT's VQA head
on the pooled vector, BCE on the soft-score targets × the number of answers. A convolutional stem
(Xiao et al. 2021) replaces the linear patch embedding (`:stem=False` for ViLT's own, which has
none); modality-type and position embeddings are ViLT's; the text is the shapes WordPiece vocabulary.

Measured (default settings, 1000 steps of 64, one run, seed 0, 1000 held-out test questions;
11 min on 2 CPU cores shared with four other jobs): accuracy (the evaluator's vqa/accuracy_<type>) colour 0.996 (chance 1/4), size 0.747
(chance 1/3), shape 0.192 (chance 1/6), position 0.115 (chance 1/9); overall 0.493. Colour and
size, which a pooled average of the patches carries, are learned; shape and position, which need
attention to pick out the shape's patches (the 3×3 positions of a large shape differ by 4–6
pixels), stay near chance in this budget, and longer or larger runs are not measured yet.

`clip=RUN` starts the transformer from the main job's CLIP image tower (FROM_CLIP below; width 256,
one layer, a conv stem of depth 3), as ViLT starts from an ImageNet-21k ViT; measured in the
README's "Fusion encoders on shapes" table.
  mmjax-train --config experiments/vilt/shapes_vqa.py --workdir runs/vilt_shapes_vqa
  mmjax-train --config experiments/vilt/shapes_vqa.py:clip=runs/clip --workdir runs/vilt_shapes_vqa_from_clip
  mmjax-train --config experiments/vilt/shapes_vqa.py:steps=3000,width=128,depth=4,patch=4 --workdir runs/vilt_vqa_b
"""

import ml_collections

from mmjax import configs, shapes_bridges, smoke
from mmjax.data.shapes_vqa import QUESTION_TYPES

PP_IMAGE = "resize(32)|value_range(-1,1)"
PP_QUESTION = "shapes_question(out='question')|tokenize(key='question',out='text')"
# `clip=RUN`: the transformer, its conv stem, [CLS] and image position embeddings from the main job's
# CLIP image tower (as ViLT starts from an ImageNet-21k ViT-B/32); the text and modality embeddings,
# pooler and VQA head fresh. CLIP's pre-norm (ViLT has none) is left out.
FROM_CLIP = dict(rules=[(r"(stem|encoder)/(.*)", r"visual/\1/\2"), (r"cls", r"visual/cls"),
                        (r"pos_embedding", r"visual/posemb/pos_embedding"), (r"ln_final/(.*)", r"visual/norm/\1")],
                 fresh=[r"text_embeddings/.*", r"modality_embedding/.*", r"pooler/.*", r"vqa_head/.*"],
                 drop=[r"visual/ln_pre/.*", *shapes_bridges.CLIP_UNUSED])


def get_config(arg=None):
    arg = configs.parse_arg(arg, clip=None, steps=1000, batch=64, width=64, depth=2, patch=8, stem=True, lr=2e-3,
                            smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "vilt_vqa"
    c.seed = 0
    c.total_steps = arg.steps
    c.answers = "shapes"
    c.model = dict(variant=None, width=arg.width, depth=arg.depth, num_heads=4, mlp_dim=4 * arg.width,
                   patch_size=arg.patch, image_size=32, vocab_size=256, max_len=16, ln_eps=1e-6,
                   conv_stem=(32, 64) if arg.stem else (), conv_stem_depth=1)
    c.input = dict(
        data=dict(name="mmjax_shapes", split="train"),
        batch_size=arg.batch,
        pp=f"{PP_IMAGE}|{PP_QUESTION}|keep('image','text','answer_id')",
        tokenizer=dict(name="shapes_wordpiece", context_length=16),
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, grad_clip_norm=1.0)
    c.schedule = dict(lr=arg.lr, warmup_steps=100, decay="cosine", end_lr=0.0)
    if arg.clip:   # the CLIP image tower's shape; its parts learn at a quarter of the rate
        vision = shapes_bridges.VISION
        c.model.update({k: vision[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "ln_eps",
                                               "conv_stem", "conv_stem_depth")})
        c.init = dict(source=arg.clip, **FROM_CLIP)
        c.optimizer.lr_multipliers = ((r"^(stem|encoder|cls|pos_embedding|ln_final)", 0.25),)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50
    c.checkpoint = dict(every_steps=500, keep=2)
    c.evals = dict(
        every_steps=500,
        vqa=dict(kind="vqa", data=dict(name="mmjax_shapes", split="test"),
                 pp=f"{PP_IMAGE}|{PP_QUESTION}|keep('image','text','answer','question_type')", batch_size=500,
                 max_examples=None, answers_key="answer", question_types=list(QUESTION_TYPES)),
    )
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8)
        c.input.batch_size = 16
        c.evals.vqa.update(batch_size=32, max_examples=32)
    return c
