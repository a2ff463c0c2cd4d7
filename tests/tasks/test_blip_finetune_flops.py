"""The BLIP fine-tunes' analytic training FLOPs (what the trainer logs as TFLOP/s and MFU) against
XLA's count of the gradient of their training loss, on tiny unrolled models wide enough that
matmuls dominate, as tests/test_flops.py checks the other tasks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mmjax import tasks
from mmjax.models import blip, vit

VISION = {"variant": None, "width": 256, "depth": 1, "num_heads": 4, "mlp_dim": 1024, "patch_size": 8}
TEXT = {"variant": None, "width": 256, "depth": 1, "num_heads": 4, "mlp_dim": 1024, "vocab_size": 200,
        "max_len": 64}
BOS = 198     # one id past the shapes WordPiece vocabulary
BATCH, IMAGE, TEXT_LENGTH, ANSWERS, ANSWER_LENGTH = 4, 64, 24, 3, 8


def _config(name: str) -> ml_collections.ConfigDict:
    config = {"task": name, "model": {"vision": VISION, "text": TEXT}, "optimizer": {},
              "input": {"batch_size": BATCH, "tokenizer": {"name": "shapes_wordpiece", "context_length": TEXT_LENGTH}}}
    if name == "blip_caption":
        config["caption"] = {"bos_token_id": BOS, "prompt": "a picture of "}
    elif name == "blip_vqa":
        config["vqa"] = {"bos_token_id": BOS}
    else:
        config["model"]["embed_dim"] = 128
        config["momentum"] = {"queue_size": 8 * BATCH}
    return ml_collections.ConfigDict(config)


def _batch(name: str, answer_slots: int) -> dict:
    text = jnp.ones((BATCH, TEXT_LENGTH), jnp.int32)
    batch = {"image": jnp.zeros((BATCH, IMAGE, IMAGE, 3)), "text": text.at[:, 0].set(2)}
    if name == "blip_vqa":
        shape = (BATCH, answer_slots, ANSWER_LENGTH) if answer_slots else (BATCH, ANSWER_LENGTH)
        batch["answer_tokens"] = jnp.ones(shape, jnp.int32)
    return batch


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("name,answer_slots", [("blip_caption", 0), ("blip_vqa", ANSWERS),
                                               ("blip_retrieval", 0)])
def test_training_flops_match_xla(name, answer_slots):
    task = tasks.get_task(_config(name))
    batch = _batch(name, answer_slots)
    per_example = task.train_flops_per_example({k: tuple(v.shape) for k, v in batch.items()})
    assert per_example and per_example > 0

    def params_and_extra():
        params = task.init_variables(jax.random.key(0), batch)["params"]
        return params, task.init_extra_state(params, jax.random.key(2)) or {}

    params, extra = jax.eval_shape(lambda: nn.meta.unbox(params_and_extra()))
    grad = jax.grad(lambda p, e, b: task.train_loss(p, e, b, jax.random.key(1))[0])    # the trainer's step
    xla = _xla_flops(grad, params, extra, batch)
    vision = blip.vision_tower(VISION, jnp.float32)
    analytic = BATCH * (per_example - vit.patch_embed_flops(vision, (IMAGE, IMAGE)))   # XLA skips the images' grad
    print(f"{name} ({answer_slots} answer slots): XLA / analytic = {xla / analytic:.4f}")
    assert 1.0 <= xla / analytic < 1.06


def test_vqa_flops_grow_with_answer_slots():
    task = tasks.get_task(_config("blip_vqa"))
    shapes = {"image": (BATCH, IMAGE, IMAGE, 3), "text": (BATCH, TEXT_LENGTH)}
    one = task.train_flops_per_example({**shapes, "answer_tokens": (BATCH, ANSWER_LENGTH)})
    assert one == task.train_flops_per_example({**shapes, "answer_tokens": (BATCH, 1, ANSWER_LENGTH)})
    three = task.train_flops_per_example({**shapes, "answer_tokens": (BATCH, 3, ANSWER_LENGTH)})
    five = task.train_flops_per_example({**shapes, "answer_tokens": (BATCH, 5, ANSWER_LENGTH)})
    assert three > one and five - three == pytest.approx(three - one)   # linear in the slots
