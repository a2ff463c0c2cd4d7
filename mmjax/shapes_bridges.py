"""What the bridge demos on the embedded shapes data share (experiments/lm/shapes.py,
experiments/blip2/shapes_stage{1,2}.py, experiments/minigpt4/shapes.py, experiments/perceiver/shapes.py).

They rebuild BLIP-2's setting in miniature: a frozen image encoder (the main job's CLIP image tower,
experiments/clip/shapes.py, as BLIP-2 uses EVA-CLIP's), a frozen language model (experiments/lm/shapes.py,
as BLIP-2 uses OPT), and a small trained bridge between them. This module holds the frozen towers'
architectures, the warm-start rules that take them from their runs' workdirs, and the held-out
evaluations (captions and prompted questions on the test split). The fusion demos (ALBEF, BLIP and
ViLT on shapes, `clip=`) take their image encoder from the same CLIP run.
"""

from __future__ import annotations

from mmjax.data import shapes_captions, shapes_render
from mmjax.data import shapes_vqa as vqa

# The main job's CLIP image tower (experiments/clip/shapes.py, RECIPE["image"]), every token out; a `clip=RUN`
# warm start reads it from that run (tests/test_warm_start.py checks that the shapes agree).
VISION = dict(variant=None, width=256, depth=1, num_heads=8, mlp_dim=256, patch_size=8, ln_eps=1e-5,
              conv_stem=(32, 64), conv_stem_depth=3, pre_norm=True, patch_bias=False, class_token=True)
# The frozen LM of experiments/lm/shapes.py and its word tokenizer (caption and question words).
LM = dict(kind="llama", width=128, depth=2, num_heads=4, mlp_dim=352, vocab_size=94, max_len=64)
LM_CONTEXT = 40
LM_TOKENIZER = dict(name="shapes", questions=True, context_length=LM_CONTEXT)
# The Q-Former / resampler scale of the demos: 16 queries of 128, 2 layers.
NUM_QUERIES = 16
QFORMER = dict(width=128, depth=2, num_heads=4, mlp_dim=512, num_queries=NUM_QUERIES, cross_attention_frequency=1)

# Captions are generated after these words (LAVIS prompts BLIP-2's captioner with "a photo of"): the
# shapes captions that start so always go on to name the position, where the LM's most likely caption
# ("a small red circle") stops before it.
CAPTION_PROMPT = "a picture of"
PP_IMAGE = "resize(32)|value_range(-1,1)"
PP_CAPTION = f"{PP_IMAGE}|tokenize(key='caption',out='text')|keep('image','text')"
# "question: <question> answer:" after the image, as BLIP-2's zero-shot VQA prompt.
PP_QUESTION = (f"{PP_IMAGE}|shapes_question(out='question')"
               "|tokenize(key='question',out='text',prefix='question: ',suffix=' answer:')")
ATTRIBUTE_WORDS = {
    "color": list(shapes_render.COLORS),
    "shape": [sorted(set(shapes_captions.SHAPE_WORDS[s])) for s in shapes_render.SHAPES],
    "position": shapes_captions.position_phrases(),
}
FROZEN = (r"^vision_model/", r"^language_model/")


def clip_vision_rules() -> list[tuple[str, str]]:
    """The image encoder (`vision_model/...`) read from a CLIP run's image tower (`visual/...`)."""
    return [(r"vision_model/(.*)", r"visual/\1")]


# The CLIP run's other parameters; its key biases too where the target attention has none (BLIP-2's
# vision tower, EVA's: a key bias adds one constant to each query's logits, which softmax cancels).
CLIP_UNUSED = (r"textual/.*", r"image_proj/.*", r"text_proj/.*", r"logit_scale")
CLIP_KEY_BIAS = r"visual/.*/attn/key/bias"


def clip_image_tower_init(clip: str, tower: str = "vision_model") -> dict:
    """`config.init` for a model whose image encoder `tower/...` starts from the main job's CLIP run
    (its `visual/...`), as ALBEF and BLIP start theirs from an ImageNet ViT; every other
    parameter keeps its fresh initialisation."""
    return dict(source=clip, rules=[(rf"{tower}/(.*)", r"visual/\1")], drop=list(CLIP_UNUSED),
                fresh=[rf"(?!{tower}/).*"])


def evals(every_steps: int, examples: int = 500) -> dict:
    """Captions (greedy; colour, shape and position named) and prompted questions on held-out images."""
    test = dict(name="mmjax_shapes", split="test")
    return dict(
        every_steps=every_steps,
        caption=dict(kind="captioning", data=dict(test), batch_size=250, max_examples=examples,
                     pp=f"{PP_IMAGE}|keep('image','caption','color','shape','position')",
                     generation=dict(max_new_tokens=24), attribute_words=ATTRIBUTE_WORDS),
        vqa=dict(kind="vqa", data=dict(test), batch_size=250, max_examples=examples,
                 pp=f"{PP_QUESTION}|keep('image','text','answer','question_type')", answers_key="answer",
                 question_types=list(vqa.QUESTION_TYPES)),
    )


def tiny(c, eval_examples: int = 16) -> None:
    """A recipe's smoke mode: a few steps of tiny frozen towers (the bridge's own sizes are the
    recipe's to shrink), batch 16, every evaluation on `eval_examples` held-out images."""
    from mmjax import smoke

    smoke.short_run(c, steps=4, log_every=2)
    c.model.vision.update(width=32, depth=1, num_heads=2, mlp_dim=64, conv_stem=())
    if "lm" in c.model:
        c.model.lm.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.input.batch_size = 16
    for name, block in c.evals.items():
        if name != "every_steps":
            block.update(batch_size=eval_examples, max_examples=eval_examples)
