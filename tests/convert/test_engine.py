"""mmjax.convert.engine: transforms (meaning and inverses), complete error reports, fused
tensors, ignored keys, and scanned <-> unscanned layouts."""

import jax
import numpy as np
import pytest

from mmjax.convert import engine
from mmjax.convert.engine import ConversionError, Table, rule

RNG = np.random.default_rng(0)


def _rand(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def test_transforms_match_torch_semantics():
    """Each transform turns a torch tensor into the mmjax parameter computing the same thing."""
    x = _rand(5, 8)                                    # (tokens, embed)
    w, b = _rand(6, 8), _rand(6)                       # torch Linear 8 -> 6 = 2 heads x 3
    kernel = engine.HEADS_IN.to_mmjax(w, (8, 2, 3))
    bias = engine.HEADS_BIAS.to_mmjax(b, (2, 3))
    np.testing.assert_allclose(np.einsum("td,dhk->thk", x, kernel) + bias,
                               (x @ w.T + b).reshape(5, 2, 3), rtol=1e-5, atol=1e-6)
    wo = _rand(8, 6)                                   # torch Linear 6 -> 8 out of the heads
    heads = (x @ w.T).reshape(5, 2, 3)
    out = engine.HEADS_OUT.to_mmjax(wo, (2, 3, 8))
    np.testing.assert_allclose(np.einsum("thk,hkd->td", heads, out), heads.reshape(5, 6) @ wo.T, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(x @ engine.LINEAR.to_mmjax(w, (8, 6)), x @ w.T, rtol=1e-6)
    # Conv OIHW -> HWIO: a patch-embedding conv as a matmul over flattened patches.
    conv_w = _rand(4, 3, 2, 2)
    patch = _rand(2, 2, 3)                             # HWC
    hwio = engine.CONV.to_mmjax(conv_w, (2, 2, 3, 4))
    np.testing.assert_allclose(np.einsum("hwc,hwco->o", patch, hwio),
                               np.einsum("chw,ochw->o", patch.transpose(2, 0, 1), conv_w), rtol=1e-5)


@pytest.mark.parametrize("transform,mmjax_shape", [
    (engine.COPY, (3, 4)), (engine.LINEAR, (8, 6)), (engine.CONV, (2, 2, 3, 4)),
    (engine.HEADS_IN, (8, 2, 3)), (engine.HEADS_BIAS, (2, 3)), (engine.HEADS_OUT, (2, 3, 8)),
    (engine.drop_leading(2), (1, 1, 5)),
])
def test_transforms_invert_exactly(transform, mmjax_shape):
    y = _rand(*mmjax_shape)
    x = transform.to_torch(y)
    assert x.shape == transform.torch_shape(mmjax_shape)
    np.testing.assert_array_equal(transform.to_mmjax(x, mmjax_shape), y)


TABLE = Table((
    *engine.linear("blocks.{i}.fc", "encoder/layer_{i}/fc"),
    *engine.fused_qkv("blocks.{i}.qkv.weight", "blocks.{i}.qkv.bias", "encoder/layer_{i}/attn"),
    rule("cls_token", "cls", engine.drop_leading(1)),
    rule("logit_scale", "logit_scale"),
), ignore=(r".*\.position_ids",))
EXPECTED = {
    "cls": (1, 4),
    "logit_scale": (),
    **{f"encoder/layer_{i}/{name}": shape for i in range(2) for name, shape in [
        ("fc/kernel", (4, 6)), ("fc/bias", (6,)),
        *((f"attn/{n}/kernel", (4, 2, 2)) for n in ("query", "key", "value")),
        *((f"attn/{n}/bias", (2, 2)) for n in ("query", "key", "value"))]},
}
EXPECTED = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in EXPECTED.items()}


def _state():
    state = {"cls_token": _rand(4), "logit_scale": np.array(2.5, np.float32), "text.position_ids": np.arange(7)}
    for i in range(2):
        state |= {f"blocks.{i}.fc.weight": _rand(6, 4), f"blocks.{i}.fc.bias": _rand(6),
                  f"blocks.{i}.qkv.weight": _rand(12, 4), f"blocks.{i}.qkv.bias": _rand(12)}
    return state


def test_round_trip_with_fused_qkv_and_ignored_buffers():
    state = _state()
    params = engine.to_mmjax(state, TABLE, EXPECTED)
    assert set(params) == set(EXPECTED)
    assert all(params[p].shape == EXPECTED[p].shape and params[p].dtype == np.float32 for p in params)
    # q/k/v are the three row blocks of the fused weight.
    np.testing.assert_array_equal(params["encoder/layer_1/attn/key/bias"].reshape(-1), state["blocks.1.qkv.bias"][4:8])
    back = engine.to_torch(params, TABLE)
    assert set(back) == set(state) - {"text.position_ids"}
    for key, value in back.items():
        assert value.shape == state[key].shape, key          # scalars stay 0-d
        np.testing.assert_array_equal(value, state[key])


def test_every_problem_is_reported_at_once():
    state = _state()
    del state["blocks.0.fc.bias"]                                   # missing
    state["blocks.1.fc.weight"] = _rand(6, 5)                       # mis-shaped
    state["blocks.2.fc.bias"] = _rand(6)                            # a third layer: no place
    state["head.weight"] = _rand(3, 4)                              # no rule
    with pytest.raises(ConversionError) as info:
        engine.to_mmjax(state, TABLE, EXPECTED, what="test checkpoint")
    message = str(info.value)
    print(message)
    assert "test checkpoint does not fit" in message
    assert "encoder/layer_0/fc/bias (6,)" in message and "missing" in message
    assert "blocks.1.fc.weight: checkpoint has (6, 5), the model needs (6, 4)" in message
    assert "blocks.2.fc.bias (6,): the model has no encoder/layer_2/fc/bias" in message
    assert "head.weight (3, 4): no rule" in message
    # Each problem once: the mis-shaped weight's kernel is not listed as missing as well.
    assert "1 missing model parameters" in message and "encoder/layer_1/fc/kernel (4, 6)" not in message


def test_to_torch_reports_parameters_without_a_rule():
    params = engine.to_mmjax(_state(), TABLE, EXPECTED)
    params["pre_logits/kernel"] = _rand(4, 4)
    del params["encoder/layer_0/attn/value/kernel"]
    with pytest.raises(ConversionError) as info:
        engine.to_torch(params, TABLE, what="timm state dict")
    message = str(info.value)
    assert "no place in the timm state dict" in message
    assert "pre_logits/kernel (4, 4)" in message
    assert "blocks.0.qkv.weight: has [0, 1] of the 3 fused parts" in message


def test_duplicate_sources_are_an_error():
    table = Table((rule("a", "x"), rule("b", "x", export=False)))
    with pytest.raises(ConversionError, match="b and a both map to x"):
        engine.to_mmjax({"a": _rand(2), "b": _rand(2)}, table, {"x": jax.ShapeDtypeStruct((2,), np.float32)})


def test_stack_and_unstack_layers():
    flat = {"encoder/layer_0/w": _rand(2, 3), "encoder/layer_1/w": _rand(2, 3), "head/b": _rand(4),
            "visual/encoder/layer_0/ln/scale": _rand(3), "visual/encoder/layer_1/ln/scale": _rand(3)}
    stacked = engine.stack_layers(flat)
    assert set(stacked) == {"encoder/layers/w", "head/b", "visual/encoder/layers/ln/scale"}
    assert stacked["encoder/layers/w"].shape == (2, 2, 3)
    np.testing.assert_array_equal(stacked["encoder/layers/w"][1], flat["encoder/layer_1/w"])
    back = engine.unstack_layers(stacked)
    assert set(back) == set(flat)
    for k, value in flat.items():
        np.testing.assert_array_equal(back[k], value)
    with pytest.raises(ConversionError, match="not 0..1"):
        engine.stack_layers({"encoder/layer_0/w": _rand(1), "encoder/layer_2/w": _rand(1)})


def test_flatten_unflatten():
    tree = {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
    assert engine.flatten(tree) == {"a/b/c": 1, "a/d": 2, "e": 3}
    assert engine.unflatten(engine.flatten(tree)) == tree
