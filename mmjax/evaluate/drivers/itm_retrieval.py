"""Image↔text retrieval with ITM re-ranking (the ALBEF / BLIP protocol).

ITC ranks every caption for every image (and every image for every caption) by the cosine of
their embeddings; the k best of each query are then scored by the fusion encoder's ITM head,
which sees the pair together and is far more accurate but costs one forward pass per pair. The
final ranking is the ITM logit (+ the ITC similarity with `add_itc`, as BLIP does; ALBEF uses
the logit alone) over the k candidates, every other item below them. Reported: ITC alone
(NAME/itc_i2t_r1 ...) and re-ranked (NAME/i2t_r1 ...); with `attribute_words`, both again counting
any caption true of the image (NAME/itc_consistent_i2t_r1, NAME/consistent_i2t_r1; see the
`retrieval` evaluator).

A pair that is a candidate both ways is scored once. The pairs go to `match_tokens` in batches
of one fixed size (the last padded), so its jit compiles once.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax import sharding
from mmjax.evaluate import attributes, retrieval, split
from mmjax.evaluate.drivers import SPLIT_OPTIONS, column

NEEDS = ("embed_images", "embed_texts", "image_tokens", "match_tokens")
OPTIONS = SPLIT_OPTIONS + ("ks", "k", "add_itc", "itm_batch_size", "attribute_words")
REQUIRED = ("data", "pp")
DEFAULT_KS = (1, 5, 10)
DEFAULT_K = 16
DEFAULT_ITM_BATCH = 64


def _concat(parts: list) -> Any:
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def score_pairs(task: Any, params: Any, mesh: Mesh, image_tokens: Any, tokens: np.ndarray, pairs: np.ndarray,
                batch_size: int) -> np.ndarray:
    """ITM logits of the (image index, text index) rows of `pairs`, in batches of `batch_size`
    (rounded up to the data-parallel size; the last batch padded with the first pair)."""
    dp = sharding.data_parallel_size(mesh)
    batch_size = -(-int(batch_size) // dp) * dp
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
        leaves, treedef = jax.tree.flatten(image_tokens)
        batch = {f"image_tokens_{i}": leaf[padded[:, 0]] for i, leaf in enumerate(leaves)}
        batch["text"] = tokens[padded[:, 1]]
        on_mesh = split.put_global(batch, mesh)
        images = jax.tree.unflatten(treedef, [on_mesh[f"image_tokens_{i}"] for i in range(len(leaves))])
        logits = np.asarray(split.fetch(task.match_tokens(params, images, on_mesh["text"])))
        if logits.shape != (batch_size,):
            raise ValueError(f"match_tokens must return ({batch_size},) logits for {batch_size} pairs, "
                             f"got shape {logits.shape}")
        out.append(logits[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def run(task: Any, params: Any, mesh: Mesh, cfg: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    ks = tuple(int(k) for k in cfg.get("ks", DEFAULT_KS))
    k = int(cfg.get("k", DEFAULT_K))
    if k < 1 or max(ks) > k:
        raise ValueError(f"evals.{name}: recall@{max(ks)} needs at least that many re-ranked candidates; "
                         f"set evals.{name}.k (now {k}) >= max(ks) = {max(ks)}")

    def embed(batch):
        images = batch["image"]
        return (task.embed_images(params, images), task.embed_texts(params, column(batch, "text", name)),
                task.image_tokens(params, images))

    words = dict(cfg.get("attribute_words") or {})
    image_embs, text_embs, image_tokens, tokens, columns = [], [], [], [], []
    for batch, (i, t, tok) in split.run_over_split(cfg, mesh, embed, tokenizer=task.tokenizer, name=f"evals.{name}"):
        image_embs.append(i)
        text_embs.append(t)
        image_tokens.append(tok)
        tokens.append(np.asarray(column(batch, "text", name)))
        if words:
            columns.append(attributes.caption_columns(batch, words, lambda b, key: column(b, key, name)))
    image_tokens, tokens = _concat(image_tokens), np.concatenate(tokens)
    sims = retrieval.similarities(np.concatenate(image_embs), np.concatenate(text_embs))   # (images, texts)

    i2t = retrieval.top_k_candidates(sims, k)        # (images, k) text indices
    t2i = retrieval.top_k_candidates(sims.T, k)      # (texts, k) image indices
    n_img, n_txt = sims.shape
    pair_ids = np.concatenate([(np.arange(n_img)[:, None] * n_txt + i2t).ravel(),
                               (t2i * n_txt + np.arange(n_txt)[:, None]).ravel()])
    unique, where = np.unique(pair_ids, return_inverse=True)
    logits = score_pairs(task, params, mesh, image_tokens, tokens, np.stack([unique // n_txt, unique % n_txt], 1),
                         int(cfg.get("itm_batch_size", DEFAULT_ITM_BATCH)))[where]
    itm_i2t, itm_t2i = logits[:i2t.size].reshape(i2t.shape), logits[i2t.size:].reshape(t2i.shape)

    add_itc = bool(cfg.get("add_itc", True))
    itc = retrieval.recall_from_scores(sims, sims.T, ks)
    rerank_i2t = retrieval.reranked_scores(sims, i2t, itm_i2t, add_itc)
    rerank_t2i = retrieval.reranked_scores(sims.T, t2i, itm_t2i, add_itc)
    reranked = retrieval.recall_from_scores(rerank_i2t, rerank_t2i, ks)
    out = {**{f"{name}/itc_{m}": v for m, v in itc.items()}, **{f"{name}/{m}": v for m, v in reranked.items()}}
    if words:
        for prefix, (s_i2t, s_t2i) in (("itc_", (sims, sims.T)), ("", (rerank_i2t, rerank_t2i))):
            recalls = attributes.consistent_recalls(columns, s_i2t, s_t2i, words, ks)
            out.update({f"{name}/{prefix}consistent_{m}": v for m, v in recalls.items()})
    return out
