"""BLIP-2's two training tasks on tiny models: each stage-1 loss against a hand-assembled reference
(numpy cross-entropies on the model's own embeddings / logits, the ITM pairs built by indexing), ITG's
mask checked by causality, stage 2's frozen towers through the trainer's step, and the analytic
training FLOPs of both tasks against XLA's count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs, faults, generate, optim, tasks, train
from mmjax.data import shapes
from mmjax.losses import matching
from mmjax.models import blip2

STAGE1 = "experiments/blip2/stage1.py:smoke=True"
STAGE2 = "experiments/blip2/stage2_opt.py:smoke=True"
BATCH = 6


def _batch(task, n=BATCH, seed=0):
    examples = [shapes.generate_example(i, seed=seed, image_size=32) for i in range(n)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    return {"image": jnp.asarray(images), "text": jnp.asarray(task.tokenizer([e["caption"] for e in examples]))}


def _init(task, batch, seed=1, std=0.05):
    """Random parameters of the task's shapes without compiling its init: kernels, embeddings and
    biases N(0, std²) (away from their 0 / 1 init), norm scales 1 + N(0, 0.05²), the temperature
    0.07."""
    shapes = jax.eval_shape(lambda b: nn.meta.unbox(task.init_variables(jax.random.key(0), b)), batch)["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(flat))

    def leaf(path, x, key):
        name = jax.tree_util.keystr(path)
        if name == "['temp']":
            return jnp.full(x.shape, 0.07, x.dtype)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return 1.0 + 0.05 * noise if name.endswith("['scale']") else std * noise

    return treedef.unflatten([leaf(path, x, k) for (path, x), k in zip(flat, keys)])


PREFIXES = (0, 3, 7)


def _pieces(task, params, batch):
    """What the hand-assembled references read, from the model's own methods (one compile)."""
    def run(method, *args):
        return task.model.apply({"params": params}, *args, method=method)

    text, mask = batch["text"], task.mask(batch["text"])
    image_tokens = run("encode_image", batch["image"])
    queries, texts = run("embed_image", image_tokens), run("embed_text", text, mask)
    sim = blip2.itc_scores(queries, texts) / jnp.clip(params["temp"], 0.001, 0.5)
    _, negatives_key = jax.random.split(jax.random.key(3))     # as the task splits its rng
    neg = matching.sample_hard_negatives(negatives_key, sim, sim.T)
    images_idx = jnp.concatenate([jnp.arange(BATCH), neg.image_for_text, jnp.arange(BATCH)])
    texts_idx = jnp.concatenate([jnp.arange(BATCH), jnp.arange(BATCH), neg.text_for_image])
    dec = text.at[:, 0].set(task.dec_token_id)
    return {"queries": queries, "texts": texts, "image_for_text": neg.image_for_text,
            "text_for_image": neg.text_for_image, "images_idx": images_idx, "texts_idx": texts_idx,
            "itm_logits": run("match", text[texts_idx], mask[texts_idx], image_tokens[images_idx]),
            "itg_logits": run("generate_logits", dec, mask, image_tokens),
            "itg_other_image": run("generate_logits", dec, mask, image_tokens[::-1]),
            **{f"itg_prefix_{t}": run("generate_logits", dec[:, :t + 1], mask[:, :t + 1], image_tokens)
               for t in PREFIXES}}


@pytest.fixture(scope="module")
def stage1():
    task = tasks.get_task(configs.load_config(STAGE1))
    batch = _batch(task)
    params = _init(task, batch)
    (loss, metrics), pieces = jax.jit(lambda p, b: (task.loss(p, b, jax.random.key(3)), _pieces(task, p, b)))(
        params, batch)
    pieces = jax.tree.map(np.asarray, pieces)
    return task, batch, params, float(loss), {k: float(v) for k, v in metrics.items()}, pieces


def _xent(logits, labels, smoothing=0.0):
    """torch.nn.functional.cross_entropy(label_smoothing=...) per row, in float64."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(labels)[:, None], -1)[:, 0]
    return (1 - smoothing) * nll - smoothing * logp.mean(-1)


def test_itc_is_the_best_query_against_the_text_cls(stage1):
    task, batch, params, _, metrics, pieces = stage1
    queries, texts = pieces["queries"].astype(np.float64), pieces["texts"].astype(np.float64)   # (B, Q, E), (B, E)
    temp = float(np.clip(params["temp"], 0.001, 0.5))
    sim = np.stack([[max(q @ t for q in queries[i]) for t in texts] for i in range(BATCH)]) / temp
    labels = np.arange(BATCH)
    i2t, t2i = _xent(sim, labels, 0.1).mean(), _xent(sim.T, labels, 0.1).mean()
    print(f"ITC |diff| i2t {abs(metrics['i2t_loss'] - i2t):.2e} t2i {abs(metrics['t2i_loss'] - t2i):.2e}")
    assert metrics["itc_loss"] == pytest.approx((i2t + t2i) / 2, abs=2e-5)
    assert metrics["i2t_loss"] == pytest.approx(i2t, abs=2e-5) and metrics["t2i_loss"] == pytest.approx(t2i, abs=2e-5)


def test_retrieval_predict_functions_give_the_training_itc(stage1):
    """`embed_images` (one embedding per query) and `embed_texts` are what ITC trains on: the
    retrieval evaluators' similarities (best query) equal the loss's, before the temperature."""
    from mmjax.evaluate import retrieval

    task, batch, params, _, _, pieces = stage1
    images = np.asarray(task.embed_images(params, batch["image"]))
    texts = np.asarray(task.embed_texts(params, batch["text"]))
    assert images.shape == pieces["queries"].shape and texts.shape == pieces["texts"].shape
    want = np.einsum("iqe,te->itq", pieces["queries"].astype(np.float64), pieces["texts"].astype(np.float64)).max(-1)
    np.testing.assert_allclose(retrieval.similarities(images, texts), want, atol=1e-5)


def test_itm_scores_positives_and_hard_negatives_of_the_global_batch(stage1):
    *_, metrics, pieces = stage1
    own = np.arange(BATCH)
    assert (pieces["image_for_text"] != own).all() and (pieces["text_for_image"] != own).all()
    # rows: (image i, text i) 1, (negative image of text i, text i) 0, (image i, its negative text) 0
    assert (pieces["images_idx"] == np.concatenate([own, pieces["image_for_text"], own])).all()
    assert (pieces["texts_idx"] == np.concatenate([own, own, pieces["text_for_image"]])).all()
    labels = np.array([1] * BATCH + [0] * 2 * BATCH)
    expected = _xent(pieces["itm_logits"], labels).mean()
    print(f"ITM |diff| {abs(metrics['itm_loss'] - expected):.2e}")
    assert metrics["itm_loss"] == pytest.approx(expected, abs=2e-5)


def test_itg_mask_is_the_multimodal_causal_mask(stage1):
    task, batch, _, _, metrics, pieces = stage1
    full = pieces["itg_logits"]
    # a prefix of the text alone gives the same logits: neither the text nor the queries see later text
    worst = max(np.abs(pieces[f"itg_prefix_{t}"][:, t] - full[:, t]).max() for t in PREFIXES)
    print(f"ITG prefix vs full |diff| {worst:.2e}")
    assert worst < 1e-4
    seen = np.abs(pieces["itg_other_image"][:, 0] - full[:, 0]).max()
    assert seen > 1e-4 and seen > 100 * worst, "the text sees the queries (and through them the image)"
    # the loss: [DEC] predicts the first word, ..., smoothed 0.1, padding not scored
    mask = np.asarray(task.mask(batch["text"]))
    labels, valid = np.asarray(batch["text"])[:, 1:], mask[:, 1:]
    per_token = _xent(full[:, :-1].reshape(-1, full.shape[-1]), labels.reshape(-1), 0.1).reshape(labels.shape)
    expected = (per_token * valid).sum() / valid.sum()
    print(f"ITG loss |diff| {abs(metrics['itg_loss'] - expected):.2e}")
    assert metrics["itg_loss"] == pytest.approx(expected, abs=2e-5)


def test_stage1_loss_is_the_sum(stage1):
    _, _, _, loss, metrics, _ = stage1
    assert loss == pytest.approx(metrics["itc_loss"] + metrics["itm_loss"] + metrics["itg_loss"], rel=1e-6)


def test_stage1_config_errors():
    config = configs.load_config(STAGE1)
    config.model.vocab_size = 198
    with pytest.raises(ValueError, match=r"\+ 1 \(LAVIS's \[DEC\]\)"):
        tasks.get_task(config)
    config = configs.load_config(STAGE1)
    with config.unlocked():
        config.loss.temperature = 0.1
    with pytest.raises(ValueError, match="Unknown loss key"):
        tasks.get_task(config)


def test_stage2_trains_only_bridge_and_loss_is_text_lm_loss():
    config = configs.load_config(STAGE2)
    task = tasks.get_task(config)
    batch = _batch(task)
    params = _init(task, batch)
    out = jax.jit(task.model.apply)({"params": params}, batch["image"], batch["text"], task.mask(batch["text"]))
    logits, text, mask = np.asarray(out["logits"]), np.asarray(batch["text"]), np.asarray(task.mask(batch["text"]))
    labels, valid = text[:, 1:], mask[:, 1:]     # LAVIS: the BOS (predicted by the last query) is not scored
    per_token = _xent(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1)).reshape(labels.shape)
    expected = (per_token * valid).sum() / valid.sum()
    trainable = optim.trainable_mask(config.optimizer, params)
    tx, schedule = optim.build_optimizer(config.optimizer, config.schedule, 10, params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "nonfinite": faults.init_counters()}
    sizes = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    live = optim.split_frozen(params, trainable)[0]
    assert sizes(state["opt_state"]) <= 2 * sizes(live) + 16, "frozen leaves keep no optimizer state"
    step = jax.jit(train.make_train_step(task, tx, schedule, jax.random.key(0), trainable))
    state, metrics = step(state, batch)       # the loss at `params`: the warmup starts at lr 0
    print(f"stage-2 LM loss |diff| {abs(float(metrics['loss']) - expected):.2e}")
    assert float(metrics["loss"]) == pytest.approx(expected, abs=2e-5)
    new_params = step(state, batch)[0]["params"]
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    moved = {path for path, a, b, keep in zip(paths, jax.tree.leaves(params), jax.tree.leaves(new_params),
                                              jax.tree.leaves(trainable)) if not np.array_equal(a, b)}
    frozen = {path for path, keep in zip(paths, jax.tree.leaves(trainable)) if not keep}
    assert moved and not moved & frozen
    assert {p.split("'")[1] for p in moved} == {"query_tokens", "qformer", "language_projection", "vision_model"}
    assert all(p.startswith("['vision_model']['norm']") for p in moved if p.startswith("['vision_model']")), \
        "of the ViT only its final norm (LAVIS's ln_vision) trains"
    assert all(p.startswith(("['vision_model']", "['language_model']")) for p in frozen)


WIDE_VISION = dict(variant=None, width=128, depth=1, num_heads=4, mlp_dim=512, patch_size=8)
WIDE_QFORMER = dict(width=128, depth=2, num_heads=4, mlp_dim=512, num_queries=8)


@pytest.mark.parametrize("name,spec", [("blip2_stage1", STAGE1), ("blip2_stage2", STAGE2),
                                       ("minigpt4", "experiments/minigpt4/stage2.py:smoke=True")])
def test_training_flops_match_xla(name, spec):
    """Wide enough that matmuls dominate; frozen towers are differentiated as the trainer does
    (weights not at all, the LM's activations back to the soft prompt; MiniGPT-4's frozen
    Q-Former not at all)."""
    config = configs.load_config(spec)
    config.model.vision, config.model.qformer = WIDE_VISION, WIDE_QFORMER
    if name == "blip2_stage2":
        config.model.lm = dict(kind="opt", width=128, depth=2, num_heads=4, mlp_dim=512, vocab_size=78, max_len=32)
    if name == "minigpt4":
        config.model.lm = dict(kind="llama", width=128, depth=2, num_heads=4, mlp_dim=512, vocab_size=78, max_len=64)
    task = tasks.get_task(config)
    assert config.task == name
    batch = _batch(task, n=4)
    params = jax.eval_shape(lambda b: nn.meta.unbox(task.init_variables(jax.random.key(0), b)), batch)["params"]
    trainable = optim.trainable_mask(config.optimizer, params)
    live, frozen = optim.split_frozen(params, trainable)
    grad = jax.grad(lambda p, f, b: task.loss(optim.merge_frozen(p, f, trainable), b, jax.random.key(0))[0])
    cost = jax.jit(grad).lower(live, frozen, batch).cost_analysis()    # before XLA optimises: no compile
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = 4 * task.train_flops_per_example({k: v.shape for k, v in batch.items()})
    print(f"{name}: XLA / analytic = {xla / analytic:.4f}")
    assert 1.0 <= xla / analytic < 1.05


def test_zero_shot_answers_follow_the_left_padded_prompt():
    """`answer` (the vqa evaluator's predict function) generates after each right-padded prompt
    moved to the left, as transformers' generate needs: the same text as generating from the
    prompt written left-padded by hand, and the same whatever padding the batch carries."""
    task = tasks.get_task(configs.load_config(STAGE2))
    batch = _batch(task, n=2)
    params = _init(task, batch)
    prompts = ["question : what colour is the shape ? answer :", "question : where ? answer :"]
    tokens = np.asarray(task.tokenizer(prompts))
    got = task.answer(params, batch["image"], tokens)
    wider = np.concatenate([tokens, np.full((2, 3), task.tokenizer.pad_token_id, tokens.dtype)], 1)
    assert task.answer(params, batch["image"], wider) == got
    # the word tokenizer closes every text with its end-of-text id: the prompt ends before it
    mask = (tokens != task.tokenizer.pad_token_id) & (tokens != task.tokenizer.eot_token_id)
    left = np.full_like(tokens, task.tokenizer.pad_token_id)
    for row, (ids, real) in enumerate(zip(tokens, mask)):
        left[row, tokens.shape[1] - real.sum():] = ids[real]
    config = generate.GenerationConfig(max_new_tokens=10, eos_token_id=task.tokenizer.eot_token_id,
                                       pad_token_id=task.tokenizer.pad_token_id)
    out = blip2.generate_text(task.model, {"params": params}, batch["image"], jnp.asarray(left), config,
                              prompt_mask=jnp.asarray(left != task.tokenizer.pad_token_id))
    want = [task.tokenizer.decode(row).strip() for row in np.asarray(out.generated)]
    assert got == want and len(got) == 2 and all(isinstance(t, str) for t in got)


def test_caption_prompt_is_read_before_the_caption_and_left_out_of_it():
    """`caption.prompt` (LAVIS's "a photo of"): the caption is what the LM writes after the soft
    prompt, the BOS and the prompt's words, without those words."""
    config = configs.load_config(STAGE2)
    with config.unlocked():
        config.caption = {"prompt": "a picture of"}
    task = tasks.get_task(config)
    batch = _batch(task, n=2)
    params = _init(task, batch)
    got = np.asarray(task.caption(params, batch["image"], {"max_new_tokens": 6}))
    words = task.tokenizer.encode("a picture of")
    prompt = jnp.asarray([[task.bos_token_id, *words]] * 2, jnp.int32)
    config = generate.GenerationConfig(max_new_tokens=6, eos_token_id=task.tokenizer.eot_token_id,
                                       pad_token_id=task.tokenizer.pad_token_id)
    want = blip2.generate_text(task.model, {"params": params}, batch["image"], prompt, config).generated
    np.testing.assert_array_equal(got, np.asarray(want))
    no_prompt = tasks.get_task(configs.load_config(STAGE2))
    plain = np.asarray(no_prompt.caption(params, batch["image"], {"max_new_tokens": 6}))
    assert len(words) == 3 and not np.array_equal(plain, got)
    with pytest.raises(ValueError, match="Unknown caption key"):
        bad = configs.load_config(STAGE2)
        with bad.unlocked():
            bad.caption = {"promt": "a"}
        tasks.get_task(bad)
