"""Generation under an 8-device mesh gives the tokens of one device: the batch split over the
data axes (dp: greedy, beam search, sampling), and fsdp_tp with parameters sharded by their
logical axes and the cache split by rows and heads (beam search of a cross-attending decoder,
whose cache reordering must stay within each device's rows)."""

import re

import jax
import numpy as np
import pytest
from generation_models import CONTEXT_WIDTH, HEADS, WIDTH, TinyBertDecoder, params_from_reference, reference_model

from mmjax import generate, sharding

BATCH, MAX_LENGTH = 8, 12
CONFIGS = {
    "greedy": generate.GenerationConfig(max_new_tokens=6, eos_token_id=3),
    "beam3": generate.GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_id=3, length_penalty=1.5),
    "sample": generate.GenerationConfig(max_new_tokens=6, do_sample=True, top_k=10, temperature=1.3),
}


def _inputs(cross: bool):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, BATCH)
    mask = np.arange(6)[None] >= 6 - lengths[:, None]            # left-padded to width 6
    prompt = np.where(mask, rng.integers(1, 48, (BATCH, 6)), 0)
    inputs = None
    if cross:
        context_mask = np.arange(5)[None] < rng.integers(1, 6, BATCH)[:, None]
        inputs = {"context": rng.normal(size=(BATCH, 5, CONTEXT_WIDTH)).astype(np.float32),
                  "context_mask": context_mask}
    return prompt, mask, inputs


def _cache_shapes(generator, params, prompt, mask, inputs, config) -> set:
    """(rows, heads) of the key/value caches in the compiled per-device program."""
    text = generator.lower(params, prompt, config, prompt_mask=mask, inputs=inputs).compile().as_text()
    head_dim = WIDTH // HEADS
    return {(int(r), int(h)) for r, h in re.findall(rf"f32\[(\d+),{MAX_LENGTH},(\d+),{head_dim}\]", text)}


@pytest.mark.parametrize("preset,mesh_spec,cross,configs", [
    ("dp", [("data", -1)], False, ("greedy", "beam3", "sample")),
    ("fsdp_tp", [("data", 2), ("fsdp", 2), ("tensor", 2)], True, ("beam3",)),
])
def test_sharded_generation_equals_one_device(preset, mesh_spec, cross, configs):
    model = TinyBertDecoder(cross_attention=cross)
    params = params_from_reference(reference_model(cross))
    prompt, mask, inputs = _inputs(cross)
    mesh, rules = sharding.make_mesh(mesh_spec), sharding.get_rules(preset)
    example = {} if inputs is None else inputs
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), prompt, **example))
    sharded_params = jax.device_put(params, sharding.logical_shardings(abstract, mesh, rules)["params"])
    single = generate.Generator(generate.FlaxDecoder(model), max_length=MAX_LENGTH)
    split = generate.Generator(generate.FlaxDecoder(model), max_length=MAX_LENGTH, mesh=mesh, rules=preset)
    for name in configs:
        key = jax.random.key(5)
        want = single(params, prompt, CONFIGS[name], prompt_mask=mask, inputs=inputs, key=key)
        got = split(sharded_params, prompt, CONFIGS[name], prompt_mask=mask, inputs=inputs, key=key)
        np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences), err_msg=name)
        np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths), err_msg=name)
        assert not got.sequences.sharding.is_fully_replicated, name     # rows stay split over the data axes
    if preset == "fsdp_tp":
        assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded_params))
        shapes = _cache_shapes(split, sharded_params, prompt, mask, inputs, CONFIGS["beam3"])
        print(f"\nfsdp_tp per-device key/value caches (rows, heads): {sorted(shapes)}")
        assert (BATCH * 3 // 4, HEADS // 2) in shapes               # beams' rows over data x fsdp, heads over tensor
        assert all(rows < BATCH and heads < HEADS for rows, heads in shapes)   # never gathered whole
