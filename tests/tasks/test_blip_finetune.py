"""BLIP's fine-tuning tasks (mmjax/tasks/blip_finetune.py, blip_retrieval_finetune.py) on tiny
modules: each loss equals a hand-assembled reference, the predict functions follow the runner's
contract and the retrieval queues are FIFO with their image ids. Captioning learning on shapes:
tests/tasks/test_blip_learning.py (the pretraining decoder a captioner fine-tunes)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import tasks
from mmjax.losses import contrastive_queue, matching

VISION = dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8)
TEXT = dict(variant=None, width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=199, max_len=40)
BOS = 198           # one id past the shapes WordPiece vocabulary: the [DEC] of these tiny models
CAPTIONS = ["a red circle in the top left", "a big blue square", "green star", "a tiny yellow cross at the top"]


def _config(task: str, batch: int = 4, context: int = 16, **blocks) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(task=task, model=dict(vision=VISION, text=TEXT), **blocks, input=dict(
        batch_size=batch, tokenizer=dict(name="shapes_wordpiece", context_length=context))))


def _images(n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 32, 32, 3)), jnp.float32)


def _init(task, batch):
    return nn.meta.unbox(jax.jit(task.init_variables)(jax.random.key(0), batch))["params"]


def _smoothed_ce(logits: np.ndarray, target: int, eps: float = 0.1) -> float:
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
    return float(-(1 - eps) * logp[target] - eps * logp.mean())


# --- captioning --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioner():
    task = tasks.get_task(_config("blip_caption", caption=dict(bos_token_id=BOS, generation=dict(
        num_beams=3, max_length=14, min_length=5))))
    batch = {"image": _images(4), "text": jnp.asarray(task.tokenizer(CAPTIONS))}
    return task, batch, _init(task, batch)


def _forward(task, params):
    """The captioner's logits for hand-built decoder inputs: one compiled full forward pass."""
    return jax.jit(lambda images, ids: task.model.apply({"params": params}, images, ids, ids != 0)["logits"])


def test_caption_loss_scores_only_the_caption_after_the_prompt(captioner):
    task, batch, params = captioner
    tok = task.tokenizer
    prompt = tok.encode("a picture of")
    rows = [[BOS, *prompt, *tok.encode(c), tok.sep_token_id] for c in CAPTIONS]   # [DEC] prompt caption [SEP]
    ids = np.zeros((4, max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    logits = np.asarray(_forward(task, params)(batch["image"], jnp.asarray(ids)))
    terms = [_smoothed_ce(logits[i, t], row[t + 1])     # position t predicts token t + 1: caption words, [SEP]
             for i, row in enumerate(rows) for t in range(len(prompt), len(row) - 1)]
    loss, metrics = jax.jit(task.loss)(params, batch, jax.random.key(1))
    print(f"caption loss {float(loss):.6f}, hand-assembled {np.mean(terms):.6f} over {len(terms)} tokens")
    assert int(metrics["scored_tokens"]) == len(terms)
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)


def test_caption_predicts_greedy_tokens_of_the_full_forward_pass(captioner):
    task, batch, params = captioner
    tok = task.tokenizer
    ids = np.asarray(task.caption(params, batch["image"], {"num_beams": 1, "min_length": 0, "max_length": 10}))
    prompt = [BOS, *tok.encode("a picture of")]
    assert ids.shape == (4, 10 - len(prompt)) and ids.dtype == np.int32
    seqs = np.zeros((4, 10), np.int32)      # no cache: the causal decoder re-reads every sequence
    seqs[:, :len(prompt)] = prompt
    forward, done = _forward(task, params), np.zeros(4, bool)
    for t in range(len(prompt), 10):
        nxt = np.asarray(jnp.argmax(forward(batch["image"], jnp.asarray(seqs))[:, t - 1], axis=-1))
        seqs[:, t] = np.where(done, tok.pad_token_id, nxt)
        done |= nxt == tok.sep_token_id
    want = seqs[:, len(prompt):]
    want = np.where(want < tok.vocab_size, want, tok.pad_token_id)
    print(f"greedy captions: {tok.decode(ids)}")
    np.testing.assert_array_equal(ids, want)
    beams = np.asarray(task.caption(params, batch["image"]))        # the task's settings: 3 beams, 14 in all
    assert beams.shape == (4, 14 - len(prompt))
    assert all(isinstance(c, str) for c in tok.decode(beams))


def test_caption_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="caption.bos_token_id=30522 is outside"):
        tasks.get_task(_config("blip_caption"))   # BLIP-base's [DEC] in a 199-id tiny model
    with pytest.raises(ValueError, match=r"Unknown caption key\(s\) \['beams'\]"):
        tasks.get_task(_config("blip_caption", caption=dict(bos_token_id=BOS, beams=3)))
    with pytest.raises(ValueError, match="exceed the text tower's 40 position embeddings"):
        tasks.get_task(_config("blip_caption", context=38, caption=dict(bos_token_id=BOS)))


# --- retrieval ---------------------------------------------------------------------------------

QUEUE = 8


@pytest.fixture(scope="module")
def retrieval():
    def build(distill):
        config = _config("blip_retrieval", momentum=dict(queue_size=QUEUE, distill=distill, decay=0.9))
        config.model.update(embed_dim=16, learn_temperature=True)
        return tasks.get_task(config)

    task = build(0.4)
    batch = {"image": _images(4), "text": jnp.asarray(task.tokenizer(CAPTIONS)), "image_id": jnp.array([5, 5, 7, 9])}
    boxed = jax.jit(task.init_variables)(jax.random.key(0), batch)["params"]
    params = nn.meta.unbox(boxed)
    extra = nn.meta.unbox(task.init_extra_state(boxed, jax.random.key(2)))
    noise = jax.tree.map(lambda p: 0.05 * jax.random.normal(jax.random.key(3), p.shape), extra["ema_params"])
    extra["ema_params"] = jax.tree.map(jnp.add, extra["ema_params"], noise)   # a momentum model unlike the online
    return build, task, batch, params, extra


_COMPILED = {}


def _features(task, params, batch):
    """(image tokens, ITC image and text embeddings) through the module's own methods."""
    if id(task) not in _COMPILED:
        def features(params, images, text):
            apply = lambda method, *a: task.model.apply({"params": params}, *a, method=method)
            image_tokens = apply("encode_image_tokens", images)
            return image_tokens, apply("embed_image", image_tokens), apply("encode_text", text, text != 0)
        _COMPILED[id(task)] = (task, jax.jit(features))
    return _COMPILED[id(task)][1](params, batch["image"], batch["text"])


def _soft_ce(logits, targets):
    return float(-(np.asarray(jax.nn.log_softmax(logits, -1)) * targets).sum(-1).mean())


def test_retrieval_loss_equals_the_hand_assembled_losses(retrieval):
    _, task, batch, params, extra = retrieval
    rng = jax.random.key(4)
    loss, (metrics, new) = jax.jit(task.train_loss)(params, extra, batch, rng)

    ema = jax.tree.map(lambda m, p: 0.9 * m + 0.1 * p, extra["ema_params"], params)
    image_tokens, img, txt = _features(task, params, batch)
    _, img_m, txt_m = _features(task, ema, batch)
    scale = 1.0 / np.clip(float(params["temp"]), 0.001, 0.5)
    queue = extra["queue"]
    ids = np.asarray(batch["image_id"])
    positives = (ids[:, None] == np.concatenate([ids, np.asarray(queue["image_id"])[:, 0]])[None]).astype(float)
    hard = positives / positives.sum(1, keepdims=True)
    texts_all, images_all = np.concatenate([txt_m, queue["text"]]), np.concatenate([img_m, queue["image"]])
    targets = lambda teacher: 0.4 * np.asarray(jax.nn.softmax(scale * teacher, -1)) + 0.6 * hard
    itc = (_soft_ce(scale * img @ texts_all.T, targets(img_m @ texts_all.T))
           + _soft_ce(scale * txt @ images_all.T, targets(txt_m @ images_all.T))) / 2

    negatives = matching.sample_hard_negatives(jax.random.split(rng)[1], scale * img @ txt.T, scale * txt @ img.T,
                                               image_ids=batch["image_id"])
    assert (ids[np.asarray(negatives.text_for_image)] != ids).all() and (ids[np.asarray(negatives.image_for_text)]
                                                                          != ids).all()
    pair_images = np.concatenate([image_tokens, image_tokens[np.asarray(negatives.image_for_text)], image_tokens])
    pair_text = np.concatenate([batch["text"], batch["text"], batch["text"][np.asarray(negatives.text_for_image)]])
    itm_logits = task.model.apply({"params": params}, jnp.asarray(pair_text), jnp.asarray(pair_text != 0),
                                  jnp.asarray(pair_images), method="match")
    labels = np.array([1] * 4 + [0] * 8)
    itm = float(optax.softmax_cross_entropy_with_integer_labels(itm_logits, labels).mean())
    print(f"retrieval loss {float(loss):.6f}: ITC {itc:.6f} + ITM {itm:.6f} by hand")
    np.testing.assert_allclose([float(metrics["itc_loss"]), float(metrics["itm_loss"])], [itc, itm], rtol=1e-5)
    np.testing.assert_allclose(float(loss), itc + itm, rtol=1e-5)
    np.testing.assert_allclose(new["queue"]["image"][:4], img_m, atol=1e-6)
    np.testing.assert_array_equal(new["queue"]["image_id"][:, 0], [5, 5, 7, 9, -100, -100, -100, -100])


def test_retrieval_without_distillation_or_ids_is_plain_momentum_itc(retrieval):
    build, _, batch, params, extra = retrieval
    task = build(0.0)
    batch = {k: v for k, v in batch.items() if k != "image_id"}
    _, (metrics, _) = jax.jit(task.train_loss)(params, extra, batch, jax.random.key(4))
    ema = jax.tree.map(lambda m, p: 0.9 * m + 0.1 * p, extra["ema_params"], params)
    _, img, txt = _features(task, params, batch)
    _, img_m, txt_m = _features(task, ema, batch)
    scale = 1.0 / np.clip(float(params["temp"]), 0.001, 0.5)
    want, _ = contrastive_queue.itc_queue_loss(img, txt, img_m, txt_m, extra["queue"]["image"],
                                               extra["queue"]["text"], scale)
    np.testing.assert_allclose(float(metrics["itc_loss"]), float(want), rtol=1e-5)


def test_retrieval_queues_are_fifo_with_their_image_ids(retrieval):
    _, task, batch, params, extra = retrieval
    step = jax.jit(task.train_loss)
    momentum = []
    for s in range(3):      # a queue of two batches: after three steps it holds steps 3 and 2
        ids = jnp.arange(4) + 10 * s
        _, (_, extra) = step(params, extra, {**batch, "image_id": ids}, jax.random.key(s))
        momentum.append(_features(task, extra["ema_params"], batch)[1])
    assert int(extra["queue"]["pointer"]) == 3 * 4 % QUEUE
    np.testing.assert_array_equal(extra["queue"]["image_id"][:, 0], [20, 21, 22, 23, 10, 11, 12, 13])
    np.testing.assert_allclose(extra["queue"]["image"], np.concatenate([momentum[2], momentum[1]]), atol=1e-6)
    assert int(extra["distill_step"]) == 3


def test_retrieval_predict_functions(retrieval):
    _, task, batch, params, _ = retrieval
    image_tokens, img, txt = _features(task, params, batch)
    np.testing.assert_allclose(task.embed_images(params, batch["image"]), img, atol=1e-6)
    np.testing.assert_allclose(task.embed_texts(params, batch["text"]), txt, atol=1e-6)
    np.testing.assert_allclose(task.image_tokens(params, batch["image"]), image_tokens, atol=1e-6)
    want = task.model.apply({"params": params}, batch["image"], batch["text"], batch["text"] != 0)["itm_logits"][:, 1]
    np.testing.assert_allclose(task.match_tokens(params, image_tokens, batch["text"]), want, atol=1e-5)


# --- VQA ---------------------------------------------------------------------------------------

def test_vqa_loss_weights_each_answer_and_answer_generates_text():
    task = tasks.get_task(_config("blip_vqa", vqa=dict(bos_token_id=BOS, generation=dict(num_beams=1, max_length=6))))
    tok = task.tokenizer
    question = jnp.asarray(tok(["what colour is the shape?", "where is it?", "what shape is it?"]))
    answers = np.stack([tok(["red", "blue"]), tok(["top left", ""]), tok(["circle", "disk"])])   # (3, K=2, L)
    weights = jnp.array([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]])
    batch = {"image": _images(3), "text": question, "answer_tokens": jnp.asarray(answers),
             "answer_weights": weights}
    params = _init(task, batch)
    loss, _ = jax.jit(task.loss)(params, batch, jax.random.key(1))
    rows = answers.reshape(6, -1).copy()          # every (question, answer) pair through the full module
    rows[:, 0] = np.where(rows[:, 0] != 0, BOS, 0)
    logits = np.asarray(jax.jit(lambda p, i, q, a: task.model.apply({"params": p}, i, q, q != 0, a)["logits"])(
        params, jnp.repeat(batch["image"], 2, 0), jnp.repeat(question, 2, 0), jnp.asarray(rows)))
    total = 0.0
    for r, ids in enumerate(rows):
        n = int((ids != 0).sum())
        total += float(weights.reshape(-1)[r]) * sum(_smoothed_ce(logits[r, t], ids[t + 1]) for t in range(n - 1))
    print(f"vqa loss {float(loss):.6f}, hand-assembled {total / 3:.6f}")
    np.testing.assert_allclose(float(loss), total / 3, rtol=1e-5)
    out = task.answer(params, batch["image"], question)
    assert len(out) == 3 and all(isinstance(a, str) for a in out)
