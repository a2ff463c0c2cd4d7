"""One check that a model trains the same sharded as on one device, for the model tests."""

import flax.linen as nn
import jax
import numpy as np

from mmjax import sharding


def assert_fsdp_tp_matches_one_device(init, loss, vocab_embedding) -> None:
    """`init(key)` -> variables and `loss(params)` -> scalar: parameters born sharded under fsdp_tp
    on the 8 simulated devices (data 2 × fsdp 2 × tensor 2) give the one-device loss (rtol 1e-6)
    and gradients (atol 1e-6). `vocab_embedding(params)` is the word embedding, which must be
    split over `tensor` along the vocabulary."""
    params = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))["params"]
    want = jax.jit(jax.value_and_grad(loss))(params)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)], jax.devices())
    rules = sharding.get_rules("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables, _ = sharding.init_sharded(init, mesh, rules, jax.random.key(0))
        sharded = variables["params"]
        assert vocab_embedding(sharded).sharding.spec[0] == "tensor"
        got = jax.jit(jax.value_and_grad(loss))(sharded)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), jax.device_get(got[1]), want[1])
