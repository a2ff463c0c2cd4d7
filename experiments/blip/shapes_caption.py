"""BLIP's captioning fine-tune (Li et al. 2022; the official caption_coco.yaml's objective and
decoding) on the embedded shapes data: a small BlipCaptioner trained from scratch captions
held-out 32×32 images.

The decoder reads "[DEC] a picture of <caption> [SEP]" and is trained with the LM loss, label
smoothing 0.1, on the caption tokens after the prompt (mmjax/tasks/blip_finetune.py); captions of
the test split are generated with beam search (3 beams, 20 tokens at most, 5 at least, prompt
included, as BLIP's COCO evaluation). Differences from BLIP: a small ViT/8 with a convolutional
stem and a 2-layer decoder from scratch instead of BLIP-base from pretraining, 32-pixel images, the
shapes WordPiece vocabulary with one added id as [DEC].

Expected (measured: 1000 steps of 64, seed 0, one run; 36 min on 2 CPU cores shared with other jobs,
load average ~14): on 1000 held-out test images, beam 3, the caption names the image's colour in
0.999 of them (chance 1/4) and its shape in 0.31 (chance 1/6: shape is learnt slowly, as it was by
the main job's earlier ViT/8 tower); BLEU-4 0.17, CIDEr 1.50 against the one reference caption
(greedy: 0.999 / 0.29, BLEU-4 0.15, CIDEr 1.36). Final train loss 1.60 (label-smoothed). "Names" =
contains a word of the right colour / shape and none of another (the captioning evaluator's rule).
E.g. "the square is blue and small" -> "there is a small blue square in the center of the image".
  mmjax-train --config experiments/blip/shapes_caption.py --workdir runs/blip_caption
  mmjax-train --config experiments/blip/shapes_caption.py:smoke=True --workdir /tmp/smoke_blip_caption
"""

import ml_collections

from mmjax import configs, smoke
from mmjax.data import shapes_captions, shapes_render

CONTEXT = 24       # caption tokens with [CLS]/[SEP]; the prompt adds 3 positions
VOCAB = 198        # the shapes WordPiece vocabulary; id 198 is the added [DEC]
ATTRIBUTE_WORDS = {
    "color": list(shapes_render.COLORS),
    "shape": [sorted(set(shapes_captions.SHAPE_WORDS[s])) for s in shapes_render.SHAPES],
}


def get_config(arg=None):
    arg = configs.parse_arg(arg, steps=1000, batch=64, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "blip_caption"
    c.seed = 0
    c.total_steps = arg.steps
    c.model = dict(
        vision=dict(variant=None, width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=8, conv_stem=(32, 64)),
        text=dict(variant=None, width=128, depth=2, num_heads=4, mlp_dim=512, vocab_size=VOCAB + 1, max_len=32),
    )
    c.caption = dict(prompt="a picture of ", bos_token_id=VOCAB, label_smoothing=0.1,
                     generation=dict(num_beams=3, max_length=20, min_length=5))
    c.input = dict(
        data=dict(name="mmjax_shapes", split="train"),
        batch_size=arg.batch,
        pp="resize(32)|value_range(-1,1)|tokenize(key='caption',out='text')|keep('image','text')",
        tokenizer=dict(name="shapes_wordpiece", context_length=CONTEXT),
        worker_count=0,
    )
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip_norm=1.0)
    c.schedule = dict(lr=1e-3, warmup_steps=50, decay="cosine", end_lr=0.0)
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
    c.sharding = "dp"
    c.log_every_steps = 50
    c.checkpoint = dict(every_steps=500, keep=2)
    c.evals = dict(
        every_steps=500,
        caption=dict(kind="captioning", data=dict(name="mmjax_shapes", split="test"),
                     pp="resize(32)|value_range(-1,1)|keep('image','caption','color','shape')",
                     batch_size=250, max_examples=1000,
                     generation=dict(num_beams=3, max_length=20, min_length=5),
                     attribute_words=ATTRIBUTE_WORDS),
    )
    if arg.smoke:
        smoke.short_run(c, steps=4, log_every=2)
        c.model.vision.update(width=32, depth=1, num_heads=2, mlp_dim=64, conv_stem=())
        c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
        c.input.batch_size = 16
        c.evals.caption.update(batch_size=16, max_examples=16)
    return c
