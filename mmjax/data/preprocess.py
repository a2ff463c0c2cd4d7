"""Per-example preprocessing configured by a big_vision-style string.

    "resize(36)|random_crop(32)|flip_lr|value_range(-1,1)|tokenize(key='caption', out='text')"

Ops are separated by `|`; each is `name` or `name(args)` whose arguments are
Python literals (parsed with `ast.literal_eval`, never `eval`). Image ops act on
`key='image'` unless told otherwise. Random ops draw only from the numpy
Generator passed with each example, so a pipeline is reproducible from its seed.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmjax import configs
from mmjax.data import color_jitter, image_ops, mlm_masking, randaugment, random_erasing

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]
Tokenizer = Callable[[list[str]], Any]  # list of texts -> int (N, L)

# name -> (image function, whether it needs the rng).
_IMAGE_OPS: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    "decode": (image_ops.decode, False),
    "resize": (image_ops.resize, False),
    "resize_small": (image_ops.resize_small, False),
    "central_crop": (image_ops.central_crop, False),
    "random_crop": (image_ops.random_crop, True),
    "inception_crop": (image_ops.inception_crop, True),
    "flip_lr": (image_ops.flip_lr, True),
    "value_range": (image_ops.value_range, False),
    "normalize": (image_ops.normalize, False),
}
# name -> class configured (and its arguments checked) once, when the pp string is built;
# its instances map (image, rng) -> image.
_IMAGE_TRANSFORMS: dict[str, Callable[..., Callable[[np.ndarray, np.random.Generator], Any]]] = {
    "color_jitter": color_jitter.ColorJitter,
    "randaugment": randaugment.RandAugment,
    "random_erasing": random_erasing.RandomErasing,
}
KNOWN_OPS: list[str] = sorted([*_IMAGE_OPS, *_IMAGE_TRANSFORMS, "tokenize", "mlm_mask", "rename", "keep",
                                 "shapes_question", "shapes_caption", "vqa_targets", "format"])


def split_ops(pp: str) -> list[str]:
    """Splits `pp` at the `|` characters that are outside brackets and quotes."""
    return [part.strip() for part in configs.split_top_level(pp, "|")]


def parse_op(spec: str) -> tuple[str, tuple, dict]:
    """Parses `name(args)` into (name, positional args, keyword args) of literals."""
    try:
        node = ast.parse(spec, mode="eval").body
        if isinstance(node, ast.Name):
            return node.id, (), {}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if any(isinstance(a, ast.Starred) for a in node.args) or any(
                    k.arg is None for k in node.keywords):
                raise ValueError("*args and **kwargs are not supported")
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            return node.func.id, args, kwargs
        raise ValueError("expected `name` or `name(literal args)`")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"cannot parse pp op {spec!r}: {e}") from e


class Preprocess:
    """Callable `(example, rng) -> example` built from a pp string.

    The input dict is not modified. `tokenizer` (list[str] -> int (N, L)) is
    needed only by the `tokenize` op.
    """

    def __init__(self, pp: str, tokenizer: Tokenizer | None = None):
        self.pp = pp
        self._ops: list[tuple[str, Op]] = []
        for spec in split_ops(pp) if pp.strip() else []:
            if not spec:
                raise ValueError(f"empty op in pp string {pp!r}")
            name, args, kwargs = parse_op(spec)
            self._ops.append((spec, build_op(name, args, kwargs, tokenizer)))

    def __call__(self, example: Example, rng: np.random.Generator | None = None) -> Example:
        rng = np.random.default_rng(0) if rng is None else rng
        example = dict(example)
        for _, op in self._ops:
            example = op(example, rng)
        return example

    @property
    def ops(self) -> list[str]:
        """The op specs, in order."""
        return [spec for spec, _ in self._ops]

    def __repr__(self) -> str:
        return f"Preprocess({self.pp!r})"


def build_op(name: str, args: tuple, kwargs: dict, tokenizer: Tokenizer | None = None) -> Op:
    """Returns the op `name` configured with literal `args` / `kwargs`."""
    if name in _IMAGE_OPS:
        return _image_op(name, args, kwargs)
    if name in _IMAGE_TRANSFORMS:
        return _image_transform_op(name, args, kwargs)
    if name == "tokenize":
        return _call_factory(name, _tokenize_op, args, kwargs, tokenizer=tokenizer)
    if name == "mlm_mask":
        return _call_factory(name, _mlm_mask_op, args, kwargs, tokenizer=tokenizer)
    if name == "rename":
        return _call_factory(name, _rename_op, args, kwargs)
    if name == "keep":
        return _call_factory(name, _keep_op, args, kwargs)
    if name == "shapes_question":
        return _call_factory(name, _shapes_question_op, args, kwargs)
    if name == "vqa_targets":
        return _call_factory(name, _vqa_targets_op, args, kwargs)
    if name == "format":
        return _call_factory(name, _format_op, args, kwargs)
    if name == "shapes_caption":
        return _call_factory(name, _shapes_caption_op, args, kwargs)
    raise ValueError(f"unknown pp op {name!r}; known ops: {', '.join(KNOWN_OPS)}")


def _call_factory(name: str, factory: Callable[..., Op], args: tuple, kwargs: dict, **extra) -> Op:
    try:
        inspect.signature(factory).bind(*args, **kwargs, **extra)
    except TypeError as e:
        raise ValueError(f"pp op {name!r}: bad arguments {args}, {kwargs}: {e}") from e
    return factory(*args, **kwargs, **extra)


def _get(name: str, example: Example, key: str) -> Any:
    if key not in example:
        raise KeyError(f"pp op {name!r}: no key {key!r} in example with keys {sorted(example)}")
    return example[key]


def _image_op(name: str, args: tuple, kwargs: dict) -> Op:
    fn, random = _IMAGE_OPS[name]
    kwargs = dict(kwargs)
    key = kwargs.pop("key", "image")
    rng_kw = {"rng": None} if random else {}
    try:
        inspect.signature(fn).bind(None, *args, **kwargs, **rng_kw)
    except TypeError as e:
        params = list(inspect.signature(fn).parameters)[1:]
        raise ValueError(
            f"pp op {name!r}: bad arguments {args}, {kwargs} (takes {params} and key=): {e}"
        ) from e

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = _get(name, example, key)
        extra = {"rng": rng} if random else {}
        example[key] = fn(image, *args, **kwargs, **extra)
        return example

    return op


def _image_transform_op(name: str, args: tuple, kwargs: dict) -> Op:
    kwargs = dict(kwargs)
    key = kwargs.pop("key", "image")
    transform = _call_factory(name, _IMAGE_TRANSFORMS[name], args, kwargs)

    def op(example: Example, rng: np.random.Generator) -> Example:
        example[key] = transform(_get(name, example, key), rng)
        return example

    return op


def _tokenize_op(key: str = "caption", out: str = "text", suffix: str = "", prefix: str = "", *,
                 tokenizer: Tokenizer | None) -> Op:
    """Tokenizes a text (-> int32 (L,)) or a list of texts (-> int32 (N, L)), wrapped first in
    `prefix` and `suffix` (an end symbol written as text, such as MiniGPT-4's "###"; a prompt
    template such as BLIP-2's "Question: " ... " Answer:")."""
    if tokenizer is None:
        raise ValueError(
            "pp op 'tokenize' needs a tokenizer: pass tokenizer=... to the pipeline/Preprocess"
        )

    def op(example: Example, rng: np.random.Generator) -> Example:
        text = _get("tokenize", example, key)
        single = isinstance(text, (str, bytes))
        texts = [text] if single else list(np.asarray(text, dtype=object).reshape(-1))
        texts = [prefix + (t.decode("utf-8") if isinstance(t, bytes) else str(t)) + suffix for t in texts]
        tokens = np.asarray(tokenizer(texts)).astype(np.int32)
        example[out] = tokens[0] if single else tokens
        return example

    return op


def _mlm_mask_op(prob: float = 0.15, whole_word: bool = False, key: str = "text", inputs: str = "mlm_input",
                 labels: str = "mlm_labels", mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                 ignore_id: int = mlm_masking.IGNORE_ID, *, tokenizer: Tokenizer | None) -> Op:
    """BERT MLM masking of tokenized `key` (see mlm_masking.mask_tokens); `key` itself is kept."""
    needed = ["mask_token_id", "vocab_size", "special_token_ids"] + (["is_continuation"] if whole_word else [])
    missing = [a for a in needed if not hasattr(tokenizer, a)]
    if tokenizer is None or missing:
        raise ValueError(f"pp op 'mlm_mask' needs the pipeline's WordPiece tokenizer (with {needed}); got "
                         f"{type(tokenizer).__name__}" + (f" lacking {missing}" if tokenizer is not None else ""))
    settings = dict(mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                    special_token_ids=tokenizer.special_token_ids, prob=prob, whole_word=whole_word,
                    is_continuation=getattr(tokenizer, "is_continuation", None) if whole_word else None,
                    mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob,
                    ignore_id=ignore_id)
    probe = np.array([tokenizer.mask_token_id], dtype=np.int32)
    mlm_masking.mask_tokens(probe, np.random.default_rng(0), **settings)   # bad settings fail at build time

    def op(example: Example, rng: np.random.Generator) -> Example:
        example[inputs], example[labels] = mlm_masking.mask_tokens(_get("mlm_mask", example, key), rng, **settings)
        return example

    return op


def _rename_op(**new_to_old: str) -> Op:
    """`rename(text='caption')` moves example['caption'] to example['text']."""
    def op(example: Example, rng: np.random.Generator) -> Example:
        values = {new: _get("rename", example, old) for new, old in new_to_old.items()}
        for old in new_to_old.values():
            example.pop(old)
        example.update(values)
        return example

    return op


def _keep_op(*keys: str) -> Op:
    """Drops every key not listed."""
    def op(example: Example, rng: np.random.Generator) -> Example:
        return {k: _get("keep", example, k) for k in keys}

    return op


def _shapes_question_op(out: str = "question", answer: str = "answer", answer_id: str = "answer_id",
                        question_type: str = "question_type") -> Op:
    """A generated question about a shapes example (mmjax.data.shapes_vqa): its text, answer string,
    answer index in shapes_vqa.ANSWERS and question type index, drawn from the example's rng."""
    from mmjax.data import shapes_vqa

    def op(example: Example, rng: np.random.Generator) -> Example:
        text, answer_text, qtype = shapes_vqa.ask(example, rng)
        example.update({out: text, answer: answer_text, answer_id: np.int32(shapes_vqa.ANSWER_INDEX[answer_text]),
                        question_type: np.int32(qtype)})
        return example

    return op


def _format_op(template: str | Sequence[str], out: str = "text") -> Op:
    """`format('{caption} question: {question} answer: {answer}', out='document')`: a text made
    of example fields (str.format names), as a language model's pretraining document. Several
    templates: one drawn per example from its rng (captions mixed with question-answer texts)."""
    import string

    templates = [template] if isinstance(template, str) else list(template)
    fields = [[f for _, f, _, _ in string.Formatter().parse(t) if f is not None] for t in templates]
    if not templates or any(not fs or not all(f.isidentifier() for f in fs) for fs in fields):
        raise ValueError(f"pp op 'format': every template of {template!r} must name example fields, as '{{caption}}'")

    def op(example: Example, rng: np.random.Generator) -> Example:
        index = int(rng.integers(len(templates))) if len(templates) > 1 else 0
        values = {}
        for f in fields[index]:
            value = _get("format", example, f)
            values[f] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        example[out] = templates[index].format(**values)
        return example

    return op


def _shapes_caption_op(out: str = "caption2") -> Op:
    """Another caption of a shapes example's scene (mmjax.data.shapes_captions.recaption), drawn
    from the example's rng: text whose content the earlier caption predicts, for LM documents."""
    from mmjax.data import shapes_captions

    def op(example: Example, rng: np.random.Generator) -> Example:
        factors = [int(np.asarray(_get("shapes_caption", example, k))) for k in ("color", "shape", "size", "position")]
        example[out] = shapes_captions.recaption(*factors, rng)
        return example

    return op


def _vqa_targets_op(answer_list: str, key: str = "answers", out: str = "vqa_targets") -> Op:
    """VQA v2 soft-score targets (num_answers,) float32 of the annotators' answers in `key`, over the
    answer vocabulary of file `answer_list` (one answer per line, in head order), as ViLT trains its
    BCE head (mmjax.evaluate.vqa_score.soft_score_targets); answers outside the list are dropped."""
    from mmjax import paths
    from mmjax.evaluate import vqa_score

    if not paths.isfile(answer_list):
        raise ValueError(f"pp op 'vqa_targets': answer_list {answer_list!r} is not a file (one answer per line)")
    with paths.open(answer_list) as f:
        index = {line.rstrip("\n"): i for i, line in enumerate(line for line in f if line.strip())}

    def op(example: Example, rng: np.random.Generator) -> Example:
        answers = _get("vqa_targets", example, key)
        # "" pads a question's answers to the batch's length (vqa_folder): it is no annotator
        answers = [answers] if isinstance(answers, str) else [str(a) for a in answers if str(a).strip()]
        example[out] = vqa_score.soft_score_targets([answers], index)[0]
        return example

    return op
