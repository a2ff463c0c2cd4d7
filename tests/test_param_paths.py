"""mmjax.param_paths: path strings of pytrees (boxes whole), flat <-> nested, unrolled <-> scanned
block stacks, and the regex helpers the optimizer, converters and warm start share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import optim, param_paths
from mmjax.convert import engine

RNG = np.random.default_rng(0)


def test_paths_of_dicts_lists_and_boxes():
    tree = {"enc": {"layer_0": {"kernel": nn.LogicallyPartitioned(jnp.ones((2, 3)), ("a", "b"))}},
            "blocks": [{"w": jnp.ones(2)}], "scale": jnp.ones(())}
    paths = param_paths.tree_paths(tree)
    assert paths == {"enc": {"layer_0": {"kernel": "enc/layer_0/kernel"}}, "blocks": [{"w": "blocks/0/w"}],
                     "scale": "scale"}
    items, treedef = param_paths.paths_and_leaves(tree)
    assert [p for p, _ in items] == ["blocks/0/w", "enc/layer_0/kernel", "scale"]
    assert param_paths.shape(items[1][1]) == (2, 3) and param_paths.shape(1.0) == ()
    assert jax.tree_util.tree_unflatten(treedef, [p for p, _ in items]) == paths


def test_flatten_unflatten_round_trip():
    tree = {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
    assert param_paths.flatten(tree) == {"a/b/c": 1, "a/d": 2, "e": 3}
    assert param_paths.unflatten(param_paths.flatten(tree)) == tree


def test_block_stacks():
    assert param_paths.block_index("image/encoder/layer_11/attn/query/kernel") == 11
    assert param_paths.block_index("encoder/layers/attn/query/kernel") is None
    assert param_paths.block_index("player_1/w") is None                    # only whole path parts
    assert param_paths.is_stacked("encoder/layers/w") and not param_paths.is_stacked("encoder/layers_x/w")
    assert param_paths.stacked_path("visual/encoder/layer_3/ln1/scale") == "visual/encoder/layers/ln1/scale"
    assert param_paths.unstacked_paths("encoder/layers/w", 2) == ["encoder/layer_0/w", "encoder/layer_1/w"]
    assert param_paths.unstacked_paths("head/w", 5) == ["head/w"]

    flat = {"encoder/layer_0/w": RNG.normal(size=(2, 3)), "encoder/layer_1/w": RNG.normal(size=(2, 3)),
            "head/b": RNG.normal(size=4)}
    stacked = param_paths.stack_layers(flat)
    assert stacked["encoder/layers/w"].shape == (2, 2, 3)
    back = param_paths.unstack_layers(stacked)
    assert set(back) == set(flat) and all(np.array_equal(back[k], v) for k, v in flat.items())
    with pytest.raises(param_paths.LayerStackError, match="not 0..1"):
        param_paths.stack_layers({"encoder/layer_0/w": 1.0, "encoder/layer_2/w": 1.0})


def test_stack_depths():
    unrolled = {"encoder": {f"layer_{i}": {"w": jnp.ones(2)} for i in range(3)}, "head": jnp.ones(2)}
    scanned = {"encoder": {"layers": {"w": nn.LogicallyPartitioned(jnp.ones((4, 2)), ("layers", None))}}}
    assert param_paths.stack_depths(unrolled) == {3}
    assert param_paths.stack_depths(scanned) == {4}
    assert param_paths.stack_depths({"a": unrolled, "b": scanned}) == {3, 4}
    assert param_paths.stack_depths({"head": jnp.ones(2)}) == set()


def test_patterns_and_matching():
    assert param_paths.patterns(None, "x") == () and param_paths.patterns("a.*", "x") == ("a.*",)
    with pytest.raises(ValueError, match=r"optimizer.freeze: '\(' is not a regular expression"):
        param_paths.patterns(["ok", "("], "optimizer.freeze")
    assert param_paths.search_any(["norm"], "enc/ln/norm_1/scale")
    assert not param_paths.fullmatch_any(["norm"], "enc/ln/norm_1/scale")
    assert param_paths.fullmatch_any(["enc/.*/scale"], "enc/ln/norm_1/scale")


def test_one_implementation_serves_optimizer_converters_and_warm_start():
    """No second copy of the path logic: the optimizer and the conversion engine re-export these."""
    assert optim.path_strings is param_paths.tree_paths
    assert engine.flatten is param_paths.flatten and engine.unstack_layers is param_paths.unstack_layers
