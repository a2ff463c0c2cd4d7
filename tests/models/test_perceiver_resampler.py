"""The Perceiver resampler against its two published spellings (random weights, float32):
open_flamingo's PerceiverResampler (its real heads 8 x 64 and 64 latents, frame and media-time
embeddings, several media of several frames) and transformers' IdeficsPerceiverResampler (its
real heads 16 x 96 and 64 latents, with and without q/k LayerNorms, scanned or not), each
imported from the reference's state dict and exported back (strict load, same outputs); the
published sizes checked by shape; a fixed number of output tokens whatever the input size;
fsdp_tp equals one device; bad input and bad checkpoints get clear errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharded_equality
import torch
from jax.sharding import PartitionSpec as P
from references import require

from mmjax import param_paths, sharding
from mmjax.convert import engine, perceiver
from mmjax.models.perceiver_resampler import PerceiverResampler

WIDTH = 64                     # small width; heads, latents and FF ratio are the references' real ones
OF = dict(dim=WIDTH, depth=2, dim_head=64, heads=8, num_latents=64, max_num_media=4, max_num_frames=3)
IDEFICS_WIDTH = 48


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves the norms' 1 / 0 parameters away from their init, so a mis-mapped one cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _run_torch(model: torch.nn.Module, media: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(media)).numpy()


@functools.cache
def _apply(model: PerceiverResampler):
    return jax.jit(model.apply)


def _run(model: PerceiverResampler, params, media: np.ndarray) -> np.ndarray:
    return np.asarray(_apply(model)({"params": params}, media)["tokens"])


def _random_params(model: PerceiverResampler, seed: int) -> dict:
    """Random parameters of `model`'s shapes (norm scales near 1), without flax's init: jitting an
    initializer costs seconds of compilation on CPU, which these tests do not need."""
    rng = np.random.default_rng(seed)
    flat = {path: ((1.0 if path.endswith("scale") else 0.0) + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)
            for path, shape in perceiver.expected_params(model).items()}
    return engine.unflatten(flat)


def _media(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _open_flamingo(seed: int) -> torch.nn.Module:
    helpers = require("open_flamingo.src.helpers")
    torch.manual_seed(seed)
    return _randomize(helpers.PerceiverResampler(**OF), seed)


def _idefics(qk_norm: bool, seed: int) -> tuple[torch.nn.Module, dict]:
    transformers = require("transformers")
    resampler = require("transformers.models.idefics.perceiver")
    config = transformers.IdeficsConfig(
        use_resampler=True, vision_config=dict(embed_dim=IDEFICS_WIDTH),
        perceiver_config=dict(resampler_depth=2, resampler_n_heads=16, resampler_head_dim=96,
                              resampler_n_latents=64, qk_layer_norms_perceiver=qk_norm))
    p = config.perceiver_config
    torch.manual_seed(seed)
    model = resampler.IdeficsPerceiverResampler(config, IDEFICS_WIDTH, p.resampler_depth, p.resampler_n_heads,
                                                p.resampler_head_dim, p.resampler_n_latents)
    return _randomize(model, seed), config.to_dict()


@pytest.fixture(scope="module")
def open_flamingo():
    """(reference, mmjax model, imported params)."""
    ref = _open_flamingo(seed=0)
    model, params = perceiver.from_open_flamingo(ref.state_dict(), num_heads=OF["heads"], head_dim=OF["dim_head"])
    return ref, model, params


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "qk_norm"])
def idefics(request):
    """(reference, its IdeficsConfig dict, mmjax model, imported params); the q/k-norm case
    imports into a scanned model."""
    ref, config = _idefics(request.param, seed=1)
    model, params = perceiver.from_idefics(ref.state_dict(), config, scan=request.param)
    return ref, config, model, params


def test_open_flamingo_import_matches(open_flamingo):
    """Two media of three frames (both embeddings in use), 10 tokens per frame."""
    ref, model, params = open_flamingo
    assert (model.depth, model.num_latents, model.max_num_media, model.max_num_frames) == (2, 64, 4, 3)
    media = _media(2, 2, 3, 10, WIDTH)
    want, got = _run_torch(ref, media), _run(model, params, media)
    assert got.shape == want.shape == (2, 2, 64, WIDTH)
    np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)      # measured: 1e-6 (outputs up to ~4)


def test_open_flamingo_export_loads_strictly_and_matches():
    """mmjax's own init, exported: transformers-free strict load, the same outputs, and back again."""
    model = PerceiverResampler(WIDTH, depth=2, max_num_media=4, max_num_frames=3)
    media = _media(2, 3, 2, 5, WIDTH, seed=1)
    params = _random_params(model, seed=2)
    ref = _open_flamingo(seed=5)
    state = perceiver.to_open_flamingo(model, params)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    np.testing.assert_allclose(_run(model, params, media), _run_torch(ref, media), atol=1e-5, rtol=0)  # 3e-6
    _, back = perceiver.from_open_flamingo(state, prefix="")
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_idefics_import_matches(idefics):
    ref, _, model, params = idefics
    media = _media(3, 20, IDEFICS_WIDTH, seed=2)
    want, got = _run_torch(ref, media), _run(model, params, media)
    assert got.shape == want.shape == (3, 64, IDEFICS_WIDTH)
    np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)      # measured: 1e-6 (outputs up to ~4)
    back = perceiver.to_idefics(model, params)                     # scanned layers unstacked again
    assert back.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_idefics_export_loads_strictly_and_matches():
    """With q/k norms, so that every IDEFICS key is written; under IDEFICS' own module prefix."""
    ref, config = _idefics(qk_norm=True, seed=6)
    model = perceiver.idefics_model(config)
    params, media = _random_params(model, seed=3), _media(2, 7, IDEFICS_WIDTH, seed=3)
    outer = "model.perceiver_resampler."
    state = perceiver.to_idefics(model, params, prefix=outer)
    assert all(k.startswith(outer) for k in state)
    ref.load_state_dict({k[len(outer):]: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    np.testing.assert_allclose(_run(model, params, media), _run_torch(ref, media), atol=1e-5, rtol=0)  # 3e-6
    _, back = perceiver.from_idefics(state, config, prefix=outer)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def _written_shapes(model: PerceiverResampler, rules: list) -> dict:
    """torch key -> the shape each mmjax parameter is written as, by the table's transforms and
    shapes alone (fused tensors: their parts' first axes summed), as engine.to_torch writes them."""
    table, parts = engine.Table(tuple(rules)), {}
    scanned = perceiver.expected_params(model.clone(scan=True))          # one layer traced: fast
    depth = model.arch()["depth"]
    expected = {layer: s.shape[1:] if param_paths.is_stacked(p) else s.shape
                for p, s in scanned.items() for layer in param_paths.unstacked_paths(p, depth)}
    for path, shape in expected.items():
        found = [(r, j, m) for r, regexes in zip(table.rules, table._mmjax_res)
                 for j, regex in enumerate(regexes) if (m := regex.fullmatch(path))]
        assert len(found) == 1, f"{path}: {len(found)} rules write it"
        rl, j, match = found[0]
        parts.setdefault(rl.torch_key.format(**match.groupdict()), {})[j] = rl.transform.torch_shape(shape)
    return {key: p[0] if len(p) == 1 else (sum(s[0] for s in p.values()), *p[0][1:]) for key, p in parts.items()}


def test_published_sizes_by_shape():
    """The spellings' defaults at the published sizes (torch meta tensors, no weights): OpenFlamingo's
    resampler over CLIP ViT-L/14 (width 1024), IDEFICS-9B's over its ViT-H/14 (embed_dim 1280)."""
    helpers = require("open_flamingo.src.helpers")
    transformers = require("transformers")
    resampler = require("transformers.models.idefics.perceiver")
    config = transformers.IdeficsConfig(use_resampler=True, vision_config=dict(embed_dim=1280))
    p = config.perceiver_config
    with torch.device("meta"):
        flamingo = helpers.PerceiverResampler(dim=1024)
        idefics = resampler.IdeficsPerceiverResampler(config, 1280, p.resampler_depth, p.resampler_n_heads,
                                                      p.resampler_head_dim, p.resampler_n_latents)
    idefics_spelling = PerceiverResampler(1280, spelling="idefics")
    assert perceiver.idefics_model(config.to_dict()).arch() == idefics_spelling.arch()
    for ref, model, rules in [(flamingo, PerceiverResampler(1024), perceiver.open_flamingo_rules("", "")),
                              (idefics, idefics_spelling, perceiver.idefics_rules("", ""))]:
        assert _written_shapes(model, rules) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_output_count_is_fixed_whatever_the_input_size():
    model = PerceiverResampler(16, depth=1, num_heads=2, head_dim=8, num_latents=5, max_num_media=4, max_num_frames=3)
    params = _random_params(model, seed=8)
    assert _run(model, params, _media(2, 4, 3, 17, 16)).shape == (2, 4, 5, 16)    # 4 media of 3 x 17 tokens
    for tokens in (1, 50):
        assert _run(model, params, _media(2, tokens, 16)).shape == (2, 5, 16)


def test_sharded_equals_one_device():
    """fsdp_tp on the 8 simulated devices (data 2 x fsdp 2 x tensor 2): heads and FF split over
    `tensor`, width over `fsdp`; the same loss and gradients as on one device."""
    model = PerceiverResampler(WIDTH, spelling="idefics", depth=1, num_heads=4, head_dim=16, num_latents=8,
                               qk_norm=True, max_num_media=2, max_num_frames=2)
    media = _media(4, 2, 2, 5, WIDTH, seed=4)
    params = _random_params(model, seed=4)
    step = lambda p, x: jax.value_and_grad(  # noqa: E731
        lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x)["tokens"] - 1.0)))(p)
    want = jax.jit(step)(params, media)
    mesh, rules = sharding.make_mesh(sharded_equality.FSDP_TP, jax.devices()), sharding.get_rules("fsdp_tp")
    shardings = sharding.logical_shardings(jax.eval_shape(model.init, jax.random.key(0), media), mesh, rules)["params"]
    assert shardings["layer_0"]["attn"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
    assert shardings["layer_0"]["ff"]["fc2"]["kernel"].spec == P("tensor", "fsdp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(step)(jax.device_put(params, shardings), jax.device_put(media, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    sharded_equality.assert_trees_close(jax.device_get(got[1]), jax.device_get(want[1]), "gradients")


def test_bad_input_gets_clear_errors(open_flamingo):
    _, model, params = open_flamingo
    with pytest.raises(ValueError, match=r"\(B, N, D\) or \(B, T, F, v, D\); got rank 4"):
        _run(model, params, _media(2, 3, 5, WIDTH))
    with pytest.raises(ValueError, match=f"are 32 wide; this resampler's width is {WIDTH}"):
        _run(model, params, _media(2, 5, 32))
    with pytest.raises(ValueError, match="4 frames but the resampler's frame_embs cover 3"):
        _run(model, params, _media(1, 1, 4, 2, WIDTH))
    with pytest.raises(ValueError, match="5 media but the resampler's media_time_embs cover 4"):
        _run(model, params, _media(1, 5, 1, 2, WIDTH))


def test_bad_checkpoints_get_errors_that_list_every_problem(open_flamingo):
    ref, _, _ = open_flamingo
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    broken = {k: v for k, v in state.items() if k != "layers.1.0.to_out.weight"}
    broken["layers.0.0.extra.weight"] = np.zeros((2, 2), np.float32)
    broken["norm.bias"] = np.zeros(WIDTH + 1, np.float32)
    with pytest.raises(engine.ConversionError) as e:
        perceiver.from_open_flamingo(broken)
    message = str(e.value)
    for expected in ("layers.0.0.extra.weight (2, 2): no rule", "norm.bias: checkpoint has (65,), the model "
                     "needs (64,)", "layer_1/attn/out/kernel (8, 64, 64)"):
        assert expected in message, message
    with pytest.raises(engine.ConversionError, match="not num_heads x head_dim = 4 x 64"):
        perceiver.from_open_flamingo(state, num_heads=4)
    with pytest.raises(engine.ConversionError, match="has no 'perceiver.latents'"):
        perceiver.from_open_flamingo(state, prefix="perceiver.")

    _, config = _idefics(qk_norm=False, seed=7)
    model = perceiver.idefics_model(config)
    params = _random_params(model, seed=7)
    with pytest.raises(engine.ConversionError, match="missing model parameters"):
        perceiver.from_idefics({k: v for k, v in perceiver.to_idefics(model, params).items() if "blocks.1" not in k},
                               config)
    of_model = PerceiverResampler(WIDTH, depth=2, max_num_media=4, max_num_frames=3)
    with pytest.raises(engine.ConversionError, match=r"act='gelu' \(needs 'relu'\), max_num_media=4 \(needs None\)"):
        perceiver.to_idefics(of_model, {})
    with pytest.raises(engine.ConversionError, match=r"act='relu' \(needs 'gelu'\)"):
        perceiver.to_open_flamingo(model, params)
