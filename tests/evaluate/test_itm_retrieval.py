"""The itm_retrieval evaluator (ALBEF/BLIP protocol) with a stand-in task whose predict functions
are known tables: ITC from noisy embeddings, ITM from a given matrix over (image, text) pairs of
the split. Expected recalls are computed here, query by query, from the same tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from mmjax import sharding
from mmjax.data import shapes_captions, sources, tokenizers
from mmjax.evaluate import attributes, retrieval, runner
from mmjax.evaluate.drivers import itm_retrieval

N = 40
DATA = {"name": "mmjax_shapes", "split": "test"}
CONTEXT = 32


def _row_of(keys, queries):
    """Index of the row of `keys` equal to each query row (the stand-in's way to know the example)."""
    return jnp.argmax((queries.reshape(len(queries), -1)[:, None, :] == keys[None]).all(-1), axis=1)


_embed_images = jax.jit(lambda p, x: p["image_emb"][_row_of(p["image_keys"], x)])
_embed_texts = jax.jit(lambda p, t: p["text_emb"][_row_of(p["text_keys"], t)])
_image_tokens = jax.jit(lambda p, x: _row_of(p["image_keys"], x)[:, None].astype(jnp.float32))
_match = jax.jit(lambda p, img, t: p["itm"][img[:, 0].astype(jnp.int32), _row_of(p["text_keys"], t)])


class TableTask:
    """Predict functions read from tables indexed by the example each image / text is."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.config = ConfigDict({"task": "table"})
        self.itm_shapes = []

    def embed_images(self, params, images):
        return _embed_images(params, images)

    def embed_texts(self, params, tokens):
        return _embed_texts(params, tokens)

    def image_tokens(self, params, images):
        return _image_tokens(params, images)

    def match_tokens(self, params, image_tokens, tokens):
        self.itm_shapes.append((image_tokens.shape, tokens.shape))
        return _match(params, image_tokens, tokens)


@pytest.fixture(scope="module")
def split():
    tokenizer = tokenizers.build_tokenizer({"name": "shapes_wordpiece", "context_length": CONTEXT})
    source = sources.get_source(DATA)
    examples = [source[i] for i in range(N)]
    images = np.stack([e["image"] for e in examples]).reshape(N, -1).astype(np.int32)
    tokens = tokenizer([e["caption"] for e in examples])
    assert len({im.tobytes() for im in images}) == N and len({t.tobytes() for t in tokens}) == N, \
        "the stand-in identifies examples by their image and caption"
    rng = np.random.default_rng(0)
    image_emb = rng.normal(size=(N, 16))
    text_emb = image_emb + 2.0 * rng.normal(size=(N, 16))      # ITC R@1 about one half
    return tokenizer, images, tokens, image_emb, text_emb


def _params(split, itm):
    _, images, tokens, image_emb, text_emb = split
    return {"image_keys": jnp.asarray(images), "text_keys": jnp.asarray(tokens), "itm": jnp.asarray(itm, jnp.float32),
            "image_emb": jnp.asarray(image_emb, jnp.float32), "text_emb": jnp.asarray(text_emb, jnp.float32)}


def _cfg(**options):
    base = dict(data=DATA, pp="tokenize(key='caption', out='text')|keep('image', 'text')", batch_size=16,
                max_examples=N)
    return ConfigDict({**base, **options})


def _expected(sims, itm, k, ks, add_itc):
    """Re-ranked recall@ks written out query by query: candidates = the k best by ITC; each scored
    ITM (+ ITC); the true item's rank among them, or a miss beyond k when it is not one."""
    def ranks(s, m):
        out = []
        for q in range(len(s)):
            cand = np.argsort(-s[q], kind="stable")[:k]
            score = m[q, cand] + (s[q, cand] if add_itc else 0)
            ordered = cand[np.argsort(-score, kind="stable")]
            out.append(int(np.flatnonzero(ordered == q)[0]) if q in cand else k)
        return np.asarray(out)

    r_i2t, r_t2i = ranks(sims, itm), ranks(sims.T, itm.T)
    return {f"{d}_r{K}": float(np.mean(r < K)) for d, r in (("i2t", r_i2t), ("t2i", r_t2i)) for K in ks}


def _sims(split):
    _, _, _, a, b = split
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _run(split, itm, **options):
    task = TableTask(split[0])
    mesh = sharding.make_mesh([("data", -1)])
    got = itm_retrieval.run(task, _params(split, itm), mesh, _cfg(**options), "ret")
    return got, task


@pytest.mark.parametrize("add_itc", [True, False])
def test_oracle_itm_finds_every_true_pair_among_the_candidates(split, add_itc):
    sims, ks, k = _sims(split), (1, 3), 8
    got, task = _run(split, 5.0 * np.eye(N), k=k, ks=ks, add_itc=add_itc, itm_batch_size=20)
    itc = retrieval.recall_at_k(split[3], split[4], ks)
    assert {m: got[f"ret/itc_{m}"] for m in itc} == pytest.approx(itc)
    assert got["ret/itc_i2t_r1"] < 0.6 and got["ret/itc_t2i_r1"] < 0.6
    in_top_k = {f"i2t_r{K}": np.mean([q in np.argsort(-sims[q])[:k] for q in range(N)]) for K in ks}
    in_top_k |= {f"t2i_r{K}": np.mean([q in np.argsort(-sims[:, q])[:k] for q in range(N)]) for K in ks}
    assert {m: got[f"ret/{m}"] for m in in_top_k} == pytest.approx(in_top_k)
    assert got["ret/i2t_r1"] > got["ret/itc_i2t_r1"] + 0.2 and got["ret/t2i_r1"] > got["ret/itc_t2i_r1"] + 0.2
    # One compiled shape: 20 rounded up to the 8 devices' multiple; each distinct pair scored once.
    assert set(task.itm_shapes) == {((24, 1), (24, CONTEXT))}
    pairs = {(i, int(j)) for i in range(N) for j in np.argsort(-sims[i], kind="stable")[:k]}
    pairs |= {(int(i), j) for j in range(N) for i in np.argsort(-sims[:, j], kind="stable")[:k]}
    assert len(task.itm_shapes) == -(-len(pairs) // 24)


def test_adversarial_itm_puts_the_true_pair_last(split):
    got, _ = _run(split, -5.0 * np.eye(N), k=4, ks=(1, 2, 3), add_itc=True)
    assert all(got[f"ret/{d}_r{K}"] == 0.0 for d in ("i2t", "t2i") for K in (1, 2, 3))
    assert got["ret/itc_i2t_r1"] > 0.2


@pytest.mark.parametrize("add_itc, k", [(True, 8), (False, 8), (True, N)])
def test_any_itm_matches_the_protocol_written_out(split, add_itc, k):
    itm = np.random.default_rng(1).normal(size=(N, N)) + 2.0 * np.eye(N)
    ks = (1, 5, 8)
    got, _ = _run(split, itm, k=k, ks=ks, add_itc=add_itc, itm_batch_size=64)
    want = _expected(_sims(split), itm, k, ks, add_itc)
    assert {m: got[f"ret/{m}"] for m in want} == pytest.approx(want)
    if k == N:   # every item re-ranked: the ranking is ITM + ITC over the whole split
        full = retrieval.recall_from_scores(itm + _sims(split), (itm + _sims(split)).T, ks)
        assert {m: got[f"ret/{m}"] for m in full} == pytest.approx(full)


def test_recall_beyond_the_candidates_is_refused(split):
    with pytest.raises(ValueError, match=r"evals\.ret: recall@10 needs .* set evals\.ret\.k \(now 4\) >= max\(ks\)"):
        _run(split, np.eye(N), k=4, ks=(1, 10))


def test_an_empty_split_is_named(split):
    task = TableTask(split[0])
    with pytest.raises(ValueError, match=r"evals\.ret: the evaluation split has no examples"):
        itm_retrieval.run(task, _params(split, np.eye(N)), sharding.make_mesh([("data", -1)]),
                          _cfg(max_examples=0), "ret")


def test_the_runner_knows_the_kind_and_its_keys():
    cfg = dict(kind="itm_retrieval", data=DATA, pp="keep('image')")
    assert [e.kind for e in runner.evaluators(ConfigDict({"ret": cfg}))] == ["itm_retrieval"]
    with pytest.raises(ValueError, match=r"evals\.ret \(kind 'itm_retrieval'\): unknown key\(s\) \['topk'\]"):
        runner.evaluators(ConfigDict({"ret": dict(cfg, topk=3)}))
    with pytest.raises(ValueError, match=r"needs the task to provide \['image_tokens', 'match_tokens'\]"):
        runner.check(_WithoutItm())


class _WithoutItm:
    config = ConfigDict({"task": "clip", "evals": {"ret": dict(kind="itm_retrieval", data=DATA, pp="keep('image')")}})

    def embed_images(self, params, images):
        return images

    def embed_texts(self, params, tokens):
        return tokens


def test_attribute_words_add_recall_over_every_true_caption(split):
    """`attribute_words`: the same rankings scored with every caption true of the image a hit."""
    words = shapes_captions.attribute_words()
    itm = np.random.default_rng(2).normal(size=(N, N)) + 2.0 * np.eye(N)
    pp = "tokenize(key='caption', out='text')|keep('image', 'text', 'caption', 'color', 'shape', 'size', 'position')"
    got, _ = _run(split, itm, k=8, ks=(1, 5), add_itc=False, pp=pp, attribute_words=words)
    source = sources.get_source(DATA)
    examples = [source[i] for i in range(N)]
    relevant = attributes.consistent_pairs([e["caption"] for e in examples],
                                           {f: np.array([e[f] for e in examples]) for f in words}, words)
    sims = _sims(split)
    want = retrieval.recall_with_relevance(sims, sims.T, relevant, (1, 5))
    assert {m: got[f"ret/itc_consistent_{m}"] for m in want} == pytest.approx(want)
    for m in want:   # the own caption is always true, so consistent recall is never below the exact one
        assert got[f"ret/itc_consistent_{m}"] >= got[f"ret/itc_{m}"]
        assert got[f"ret/consistent_{m}"] >= got[f"ret/{m}"]
    assert relevant.sum() > N and relevant.diagonal().all()   # some captions are true of other images
    cand_i2t, cand_t2i = retrieval.top_k_candidates(sims, 8), retrieval.top_k_candidates(sims.T, 8)
    rows = np.arange(N)[:, None]
    reranked = retrieval.recall_with_relevance(
        retrieval.reranked_scores(sims, cand_i2t, itm[rows, cand_i2t], False),
        retrieval.reranked_scores(sims.T, cand_t2i, itm.T[rows, cand_t2i], False), relevant, (1, 5))
    assert {m: got[f"ret/consistent_{m}"] for m in reranked} == pytest.approx(reranked)
