"""Image↔text retrieval recall@K over a set of embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.evaluate.zeroshot import normalize


def similarities(image_embs: np.ndarray, text_embs: np.ndarray) -> np.ndarray:
    """(n_img, n_txt) cosine similarities; images with several embeddings each (n_img, Q, D),
    BLIP-2's one per query, score a text by their best one (the paper's ITC at test time)."""
    image_embs, text_embs = normalize(np.asarray(image_embs)), normalize(np.asarray(text_embs))
    if image_embs.ndim == 3:
        return np.einsum("iqd,td->itq", image_embs, text_embs).max(axis=-1)
    return image_embs @ text_embs.T


def recall_at_k(image_embs: np.ndarray, text_embs: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                text_to_image: np.ndarray | None = None) -> dict[str, float]:
    """R@K both ways. `text_to_image[j]` is the image index of caption j (default: j).

    Image→text counts a hit when any of the image's captions is in the top K; text→image when
    the caption's own image is in the top K (the usual COCO/Flickr protocol). Image embeddings
    may be (n_img, Q, D), several per image (see `similarities`).
    """
    sims = similarities(image_embs, text_embs)            # (n_img, n_txt)
    return recall_from_scores(sims, sims.T, ks, text_to_image)


def recall_from_scores(scores_i2t: np.ndarray, scores_t2i: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                       text_to_image: np.ndarray | None = None) -> dict[str, float]:
    """R@K both ways from score matrices: `scores_i2t` (n_img, n_txt) ranks each image's captions,
    `scores_t2i` (n_txt, n_img) each caption's images (ties: the lower index first). Equal to
    `recall_at_k` when both are the cosine similarities; re-ranked retrieval passes its own."""
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be (n_txt, n_img) = {(n_txt, n_img)}, got {scores_t2i.shape}")
    owner = np.arange(n_txt) if text_to_image is None else np.asarray(text_to_image)
    if owner.shape != (n_txt,) or owner.max(initial=-1) >= n_img or owner.min(initial=0) < 0:
        raise ValueError(f"text_to_image must map each of {n_txt} captions to one of {n_img} images")
    out = {}
    # Rank of the best-ranked matching caption for each image.
    order_i2t = np.argsort(-scores_i2t, axis=1, kind="stable")
    match = owner[order_i2t] == np.arange(n_img)[:, None]
    first_hit_i2t = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    # Rank of the true image for each caption.
    order_t2i = np.argsort(-scores_t2i, axis=1, kind="stable")
    first_hit_t2i = (order_t2i == owner[:, None]).argmax(axis=1)
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(first_hit_i2t < k))
        out[f"t2i_r{k}"] = float(np.mean(first_hit_t2i < k))
    return out


def recall_with_relevance(scores_i2t: np.ndarray, scores_t2i: np.ndarray, relevant: np.ndarray,
                          ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K both ways where any pair marked in `relevant` (n_img, n_txt) counts as a hit, not only
    each item's own partner: for data sets whose captions also describe other images (the shapes
    data's "a red circle" fits every red circle). `relevant = eye` gives `recall_from_scores`."""
    n_img, n_txt = scores_i2t.shape
    relevant = np.asarray(relevant, bool)
    if relevant.shape != (n_img, n_txt) or scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_i2t, scores_t2i and relevant must be (n_img, n_txt), (n_txt, n_img) and "
                         f"(n_img, n_txt); got {scores_i2t.shape}, {scores_t2i.shape}, {relevant.shape}")
    out = {}
    for way, scores, rel in (("i2t", scores_i2t, relevant), ("t2i", scores_t2i, relevant.T)):
        order = np.argsort(-scores, axis=1, kind="stable")
        hits = np.take_along_axis(rel, order, axis=1)
        first = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
        for k in ks:
            out[f"{way}_r{k}"] = float(np.mean(first < k))
    return out


def top_k_candidates(sims: np.ndarray, k: int) -> np.ndarray:
    """(rows, min(k, columns)) column indices of each row's k highest scores, best first (ties:
    the lower index first): the candidates that ITM re-ranking scores (ALBEF/BLIP `k_test`)."""
    k = min(int(k), sims.shape[1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def reranked_scores(sims: np.ndarray, candidates: np.ndarray, itm: np.ndarray, add_itc: bool) -> np.ndarray:
    """Scores for `recall_from_scores` after re-ranking: row r's candidate columns
    `candidates[r]` score their ITM logits `itm[r]` (+ the similarity `sims`, as BLIP adds it;
    ALBEF does not); every other column scores -inf, below all candidates (BLIP and ALBEF fill
    -100)."""
    rows = np.arange(len(sims))[:, None]
    out = np.full(sims.shape, -np.inf)
    out[rows, candidates] = itm + (sims[rows, candidates] if add_itc else 0.0)
    return out
