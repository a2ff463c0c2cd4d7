"""Top-1 accuracy from logits, respecting a padding mask."""

from __future__ import annotations

import numpy as np


def top1(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, int]:
    """Returns (correct, counted) so that batches can be summed before dividing."""
    mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
    correct = (np.argmax(logits, axis=-1) == labels) & mask
    return int(correct.sum()), int(mask.sum())
