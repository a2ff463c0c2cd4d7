"""MiniGPT-4's task on a tiny model (experiments/minigpt4/stage2.py's smoke config): the loss of a
batch is the model's loss under the instruction drawn for it, the instructions' different lengths
sharing one padded compiled step without changing a number, and every instruction is drawn."""

import jax
import jax.numpy as jnp
import numpy as np
from test_blip2_task import _batch, _init

from mmjax import configs, generate, tasks
from mmjax.data import shapes
from mmjax.models import minigpt4

STAGE2 = "experiments/minigpt4/stage2.py:smoke=True"


def test_each_batch_is_scored_under_its_drawn_instruction():
    config = configs.load_config(STAGE2)
    with config.unlocked():
        config.prompt.instructions = ["<Img><ImageHere></Img> describe the shape", "<Img><ImageHere></Img> what"]
    task = tasks.get_task(config)
    assert task.prompts["after"].shape[0] == 2 and not task.prompts["after_mask"][1].all()   # padded
    batch = _batch(task, n=4)
    params = _init(task, batch)
    text, mask = batch["text"], task.mask(batch["text"])
    loss = jax.jit(task.loss)
    own = {}
    for i, instruction in enumerate(config.prompt.instructions):
        before, after = minigpt4.split_prompt(config.prompt.template.format(instruction))
        ids = lambda s: jnp.asarray([task.tokenizer.encode(s)], jnp.int32)     # noqa: E731 (unpadded)
        out = task.model.apply({"params": params}, batch["image"], text, mask, before=ids(before), after=ids(after))
        own[i] = float(minigpt4.lm_loss(out["logits"], text, mask)[0])
    assert abs(own[0] - own[1]) > 1e-3            # the instructions differ in what the model sees
    drawn = set()
    for seed in range(8):
        rng = jax.random.key(seed)
        index = int(jax.random.randint(jax.random.split(rng)[0], (), 0, 2))
        got = float(loss(params, batch, rng)[0])
        np.testing.assert_allclose(got, own[index], rtol=2e-6)
        drawn.add(index)
    assert drawn == {0, 1}


def test_caption_answers_the_first_instruction_as_if_unpadded():
    """The first of the recipe's four instructions is the shortest: left-padded in the task."""
    config = configs.load_config(STAGE2)
    task = tasks.get_task(config)
    assert not task.prompts["after_mask"][0].all()
    images = jnp.asarray(np.stack([shapes.generate_example(i, seed=0, image_size=32)["image"]
                                   for i in range(2)]).astype(np.float32) / 127.5 - 1.0)
    params = _init(task, {"image": images, "text": jnp.zeros((2, 16), jnp.int32)})
    got = task.caption(params, images, {"max_new_tokens": 5})
    before, after = minigpt4.split_prompt(config.prompt.template.format(config.prompt.instructions[0]))
    ids = lambda s: jnp.asarray([task.tokenizer.encode(s)] * 2, jnp.int32)     # noqa: E731
    settings = generate.GenerationConfig(max_new_tokens=5, eos_token_id=task.tokenizer.eot_token_id,
                                         pad_token_id=task.tokenizer.pad_token_id)
    want = minigpt4.chat(task.model, {"params": params}, images, ids(after), settings, before=ids(before))
    assert got.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.generated))


def test_answers_end_at_the_end_symbol_as_the_official_demo():
    """LLaMA spells "###" as one id at a word's start (835) and as "##" + "#" (2277, 29937) after
    other text: the first ends decoding, the second is cut from the answer; the shapes word
    tokenizer drops the symbol, so nothing is cut."""
    class LlamaLike:
        spelled = {"###": [835], "a": [9], "a###": [9, 2277, 29937]}

        def encode(self, text):
            return self.spelled[text]

    ends = minigpt4.end_sequences(LlamaLike())
    assert ends == [(835,), (2277, 29937)]
    ids = np.array([[5, 2277, 29937, 7], [5, 6, 7, 8], [835, 1, 2, 3]])
    np.testing.assert_array_equal(minigpt4.cut_at_end(ids, ends, pad=0), [[5, 0, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    task = tasks.get_task(configs.load_config("experiments/minigpt4/stage2.py:smoke=True"))
    assert minigpt4.end_sequences(task.tokenizer) == []
