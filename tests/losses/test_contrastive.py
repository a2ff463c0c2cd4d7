"""mmjax.losses: CLIP / SigLIP losses against open_clip (values and autograd gradients), sharded
(8 CPU devices) == single-device losses and gradients, the memory-efficient forms (local CLIP,
chunked SigLIP) == the full-batch losses, and the classification losses against NumPy hand
computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding
from mmjax.losses import classification, contrastive


def _features(n, d, seed, correlated=True):
    """L2-normalised (image, text) features; matching rows are correlated so the loss is not flat."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d))
    txt = (img + rng.normal(size=(n, d))) if correlated else rng.normal(size=(n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


def _torch_value_and_grads(loss_fn, *arrays):
    ts = [torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True) for a in arrays]
    loss = loss_fn(*ts)
    loss.backward()
    return float(loss.detach()), [t.grad.numpy() for t in ts]


# ---------------------------------------------------------------------------------------------
# Against open_clip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_open_clip(scale):
    from open_clip.loss import ClipLoss
    img, txt = _features(16, 8, seed=0)
    loss, aux = contrastive.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale))
    want, want_grads = _torch_value_and_grads(lambda a, b, s: ClipLoss()(a, b, s), img, txt,
                                              np.float64(scale))
    print(f"clip_loss vs open_clip ClipLoss (scale {scale:.4g}): {abs(float(loss) - want):.3g}")
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)

    # The two directions and the in-batch accuracy, by hand.
    logits = scale * img.astype(np.float64) @ txt.T.astype(np.float64)
    i2t = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.arange(16)).item()
    t2i = torch.nn.functional.cross_entropy(torch.from_numpy(logits.T), torch.arange(16)).item()
    np.testing.assert_allclose(float(aux["i2t_loss"]), i2t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux["t2i_loss"]), t2i, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux["batch_i2t_top1"]), np.mean(logits.argmax(1) == np.arange(16)))

    grads = jax.grad(lambda a, b, s: contrastive.clip_loss(a, b, s)[0], argnums=(0, 1, 2))(
        jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale))
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (30.0, -3.0)])
def test_siglip_loss_matches_open_clip(scale, bias):
    """open_clip's SigLipLoss is -Σ log σ(label·logit) / N (N = batch size), the paper's
    normalisation, which is also what mmjax uses: compared without any rescaling."""
    from open_clip.loss import SigLipLoss
    img, txt = _features(16, 8, seed=1)
    loss, aux = contrastive.siglip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale),
                                        jnp.float32(bias))
    want, want_grads = _torch_value_and_grads(lambda a, b, s, c: SigLipLoss()(a, b, s, c),
                                              img, txt, np.float64(scale), np.float64(bias))
    print(f"siglip_loss vs open_clip SigLipLoss (scale {scale}, bias {bias}): "
          f"{abs(float(loss) - want):.3g} (loss {want:.4g})")
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)

    # And by hand: every pair is a binary problem, mean over images of the sum over texts.
    logits = scale * img.astype(np.float64) @ txt.T.astype(np.float64) + bias
    labels = 2 * np.eye(16) - 1
    by_hand = np.logaddexp(0.0, -labels * logits).sum() / 16
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux["batch_i2t_top1"]), np.mean(logits.argmax(1) == np.arange(16)))

    grads = jax.grad(lambda a, b, s, c: contrastive.siglip_loss(a, b, s, c)[0], argnums=(0, 1, 2, 3))(
        jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale), jnp.float32(bias))
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_clip_logits():
    img, txt = _features(4, 3, seed=2)
    got = contrastive.clip_logits(jnp.asarray(img), jnp.asarray(txt), 2.0, -1.0)
    np.testing.assert_allclose(np.asarray(got), 2.0 * img @ txt.T - 1.0, atol=1e-6)
    got = contrastive.clip_logits(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), 2.0)
    assert got.dtype == jnp.float32


@pytest.mark.parametrize("loss_name", ["clip_loss", "siglip_loss"])
@pytest.mark.parametrize("shapes", [((4, 8), (5, 8)), ((4, 8), (4, 6)), ((8,), (8,)), ((2, 4, 8), (2, 4, 8))])
def test_contrastive_bad_shapes(loss_name, shapes):
    fn = getattr(contrastive, loss_name)
    args = [jnp.zeros(shapes[0]), jnp.zeros(shapes[1]), 10.0]
    if loss_name == "siglip_loss":
        args.append(-10.0)
    with pytest.raises(ValueError, match="same \\(N, D\\) shape"):
        fn(*args)


# ---------------------------------------------------------------------------------------------
# Sharded over 8 devices == one device
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should force 8 CPU devices"
    return sharding.make_mesh([("data", 8)])


@pytest.mark.parametrize("loss_name", ["clip_loss", "siglip_loss"])
def test_sharded_loss_and_grads_equal_single_device(mesh, loss_name):
    n, d = 32, 16
    img, txt = _features(n, d, seed=3)
    scalars = (np.float32(12.0),) if loss_name == "clip_loss" else (np.float32(12.0), np.float32(-4.0))
    fn = getattr(contrastive, loss_name)
    argnums = tuple(range(2 + len(scalars)))
    step = jax.value_and_grad(lambda *a: fn(*a)[0], argnums=argnums)

    one = jax.devices()[:1][0]
    single = jax.jit(step)(*(jax.device_put(x, one) for x in (img, txt, *scalars)))

    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    zimg, ztxt = jax.device_put(img, batch), jax.device_put(txt, batch)
    assert len(zimg.addressable_shards) == 8
    assert {s.data.shape for s in zimg.addressable_shards} == {(n // 8, d)}
    assert not zimg.sharding.is_fully_replicated
    sharded = jax.jit(step)(zimg, ztxt, *(jax.device_put(s, replicated) for s in scalars))

    (loss1, grads1), (loss8, grads8) = single, sharded
    assert loss1.devices() == {one}
    assert len(grads8[0].devices()) == 8
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6, atol=1e-6)
    for g8, g1 in zip(grads8, grads1):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-7)
    # Not a degenerate comparison.
    assert np.abs(np.asarray(grads1[0])).max() > 1e-3 and float(loss1) > 0.1


# ---------------------------------------------------------------------------------------------
# Memory-efficient forms == full-batch losses (values, metrics, gradients), on the 8-device mesh
# ---------------------------------------------------------------------------------------------

EFFICIENT = [("clip_loss", "clip_loss_local", ()), ("siglip_loss", "siglip_loss_chunked", (-4.0,))]


def _value_grads_metrics(fn, args, mesh=None):
    step = jax.value_and_grad(lambda *a: fn(*a)[0], argnums=tuple(range(len(args))))
    metrics = lambda *a: fn(*a)[1]
    if mesh is None:
        return jax.jit(step)(*args), jax.jit(metrics)(*args)
    with jax.set_mesh(mesh):
        return jax.jit(step)(*args), jax.jit(metrics)(*args)


@pytest.mark.parametrize("spec", [[("data", 8)], [("data", 2), ("fsdp", 2), ("tensor", 2)]],
                         ids=["data8", "data2_fsdp2_tensor2"])
@pytest.mark.parametrize("full_name,efficient_name,extra", EFFICIENT, ids=["clip_local", "siglip_chunked"])
def test_memory_efficient_loss_equals_full_batch_loss(spec, full_name, efficient_name, extra):
    mesh = sharding.make_mesh(spec)
    img, txt = _features(64, 16, seed=6)
    batch = sharding.batch_sharding(mesh)
    args = (jax.device_put(img, batch), jax.device_put(txt, batch), np.float32(12.0),
            *(np.float32(x) for x in extra))
    (want, want_grads), want_metrics = _value_grads_metrics(getattr(contrastive, full_name), args, mesh)
    (got, got_grads), got_metrics = _value_grads_metrics(getattr(contrastive, efficient_name), args, mesh)
    grad_diff = max(float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(got_grads, want_grads))
    print(f"{efficient_name} vs {full_name} on {dict(mesh.shape)}: loss diff "
          f"{abs(float(got) - float(want)):.3g}, max grad diff {grad_diff:.3g}")
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
    assert set(want_metrics) <= set(got_metrics)
    for key in want_metrics:
        np.testing.assert_allclose(float(got_metrics[key]), float(want_metrics[key]), rtol=1e-5, atol=1e-6)
    assert 0.2 < float(want_metrics["batch_i2t_top1"]) < 1.0   # a metric that can disagree
    assert np.abs(np.asarray(want_grads[1])).max() > 1e-3


@pytest.mark.parametrize("num_chunks", [1, 4, 16])
def test_siglip_chunked_without_mesh_equals_full(num_chunks):
    img, txt = _features(16, 8, seed=7)
    args = (jnp.asarray(img), jnp.asarray(txt), jnp.float32(10.0), jnp.float32(-3.0))
    fn = lambda *a: contrastive.siglip_loss_chunked(*a, num_chunks=num_chunks)
    (got, got_grads), got_metrics = _value_grads_metrics(fn, args)
    (want, want_grads), want_metrics = _value_grads_metrics(contrastive.siglip_loss, args)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
    assert float(got_metrics["batch_i2t_top1"]) == float(want_metrics["batch_i2t_top1"])


def test_clip_local_without_mesh_is_the_full_loss():
    img, txt = _features(8, 4, seed=8)
    got = contrastive.clip_loss_local(jnp.asarray(img), jnp.asarray(txt), 5.0)[0]
    want = contrastive.clip_loss(jnp.asarray(img), jnp.asarray(txt), 5.0)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_memory_efficient_losses_never_hold_the_full_logits(mesh):
    """Compiled per-device temporaries of the value-and-grad, batch 4096 on 8 devices: the
    (N, N) float32 logits would take 64 MiB. The local CLIP loss holds a few (N/8, N) blocks;
    chunked SigLIP holds (N/8, N/8) blocks and needs much less than the full SigLIP loss."""
    n, d = 4096, 32
    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    full_logits = n * n * 4

    def temp_bytes(fn, num_scalars):
        args = [jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=batch)] * 2
        args += [jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)] * num_scalars
        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    local = temp_bytes(contrastive.clip_loss_local, 1)
    chunked, full = temp_bytes(contrastive.siglip_loss_chunked, 2), temp_bytes(contrastive.siglip_loss, 2)
    print(f"per-device temporaries (MiB): clip local {local / 2**20:.1f}, siglip chunked "
          f"{chunked / 2**20:.1f}, siglip full {full / 2**20:.1f}; full logits {full_logits / 2**20:.0f}")
    assert local < full_logits / 2
    assert chunked < full / 2 and chunked < full_logits / 8


def test_memory_efficient_losses_reject_uneven_batches(mesh):
    img, txt = _features(12, 4, seed=9)
    with pytest.raises(ValueError, match="does not split into 5 text chunks"):
        contrastive.siglip_loss_chunked(jnp.asarray(img), jnp.asarray(txt), 1.0, 0.0, num_chunks=5)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="does not split into 8 batch shards"):
        contrastive.clip_loss_local(jnp.asarray(img), jnp.asarray(txt), 1.0)


def test_batch_axes_match_the_batch_sharding(mesh):
    assert tuple(sharding.batch_sharding(mesh).spec[0]) == contrastive.BATCH_AXES


# ---------------------------------------------------------------------------------------------
# Classification losses
# ---------------------------------------------------------------------------------------------

def _log_softmax(x):
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_softmax_xent_by_hand(smoothing):
    rng = np.random.default_rng(4)
    logits = (3 * rng.normal(size=(6, 5))).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    got = float(classification.softmax_xent(jnp.asarray(logits), jnp.asarray(labels), smoothing))
    targets = np.full((6, 5), smoothing / 5)
    targets[np.arange(6), labels] += 1 - smoothing
    want = -(targets * _log_softmax(logits)).sum(-1).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if smoothing == 0.0:
        ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
        np.testing.assert_allclose(got, ref.item(), rtol=1e-5)
    else:   # torch's label_smoothing uses the same convention (ε/C everywhere, 1-ε on the label)
        ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                                label_smoothing=smoothing)
        np.testing.assert_allclose(got, ref.item(), rtol=1e-5)


def test_sigmoid_xent_by_hand():
    rng = np.random.default_rng(5)
    logits = (3 * rng.normal(size=(6, 5))).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    got = float(classification.sigmoid_xent(jnp.asarray(logits), jnp.asarray(labels)))
    y = np.eye(5)[labels]
    x = logits.astype(np.float64)
    per_class = np.logaddexp(0.0, x) - y * x        # -[y log σ(x) + (1-y) log(1-σ(x))]
    want = per_class.sum(-1).mean()                 # sum over classes, mean over the batch
    np.testing.assert_allclose(got, want, rtol=1e-5)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(y.astype(np.float32)), reduction="sum") / 6
    np.testing.assert_allclose(got, ref.item(), rtol=1e-5)
    assert classification.LOSSES["sigmoid_xent"] is classification.sigmoid_xent
    assert classification.LOSSES["softmax_xent"] is classification.softmax_xent


@pytest.mark.parametrize("loss_name", ["softmax_xent", "sigmoid_xent"])
@pytest.mark.parametrize("logits_shape,labels_shape", [((4, 5), (4, 1)), ((5,), (4,))])
def test_classification_bad_shapes_raise(loss_name, logits_shape, labels_shape):
    fn = classification.LOSSES[loss_name]
    with pytest.raises(ValueError):
        fn(jnp.zeros(logits_shape), jnp.zeros(labels_shape, jnp.int32))


@pytest.mark.parametrize("loss_name", ["softmax_xent", "sigmoid_xent"])
def test_classification_batch_mismatch_raises(loss_name):
    # Today this is jnp's broadcasting TypeError; a ValueError with a message would be nicer.
    with pytest.raises((ValueError, TypeError)):
        classification.LOSSES[loss_name](jnp.zeros((4, 5)), jnp.zeros((3,), jnp.int32))
