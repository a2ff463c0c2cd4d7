"""Zero-shot classification: prompt templates → class embeddings → nearest class per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# The 7 of CLIP's 80 ImageNet prompt templates chosen by forward selection (OpenAI's
# prompt-engineering notebook; open_clip's SIMPLE_IMAGENET_TEMPLATES).
SIMPLE_IMAGENET_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


def read_class_names(path: str) -> list[str]:
    """One class name per non-empty line of a UTF-8 file (e.g. CLIP's ImageNet class names,
    since TFDS `imagenet2012` names its classes by WordNet id)."""
    from mmjax import paths  # local files or bucket URLs alike

    with paths.open(paths.expand(path), encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"class_names_file {path!r} has no names")
    return names


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """(C, D) normalised class embeddings: the mean over templates of normalised prompt embeddings."""
    if not class_names or not templates:
        raise ValueError("Zero-shot classification needs at least one class name and one template")
    if any("{}" not in t for t in templates):
        raise ValueError(f"Every template needs a '{{}}' placeholder for the class name: {list(templates)}")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = normalize(np.asarray(encode_texts(prompts), np.float32))
    emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return normalize(emb)


def zeroshot_top1(image_embs: np.ndarray, labels: np.ndarray, class_embs: np.ndarray) -> float:
    """Top-1 accuracy of assigning each image to its most similar class embedding."""
    scores = normalize(image_embs) @ class_embs.T
    return float(np.mean(np.argmax(scores, axis=1) == labels))
