"""Image↔text retrieval recall@K over a set of embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.evaluate.zeroshot import normalize


def recall_at_k(image_embs: np.ndarray, text_embs: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                text_to_image: np.ndarray | None = None) -> dict[str, float]:
    """R@K both ways. `text_to_image[j]` is the image index of caption j (default: j).

    Image→text counts a hit when any of the image's captions is in the top K; text→image when
    the caption's own image is in the top K (the usual COCO/Flickr protocol).
    """
    n_img, n_txt = len(image_embs), len(text_embs)
    owner = np.arange(n_txt) if text_to_image is None else np.asarray(text_to_image)
    if owner.shape != (n_txt,) or owner.max(initial=-1) >= n_img or owner.min(initial=0) < 0:
        raise ValueError(f"text_to_image must map each of {n_txt} captions to one of {n_img} images")
    sims = normalize(image_embs) @ normalize(text_embs).T            # (n_img, n_txt)
    out = {}
    # Rank of the best-ranked matching caption for each image.
    order_i2t = np.argsort(-sims, axis=1, kind="stable")
    match = owner[order_i2t] == np.arange(n_img)[:, None]
    first_hit_i2t = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    # Rank of the true image for each caption.
    order_t2i = np.argsort(-sims.T, axis=1, kind="stable")
    first_hit_t2i = (order_t2i == owner[:, None]).argmax(axis=1)
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(first_hit_i2t < k))
        out[f"t2i_r{k}"] = float(np.mean(first_hit_t2i < k))
    return out
