"""mmjax.losses.contrastive_queue: ALBEF's ITC against momentum features and queues, against a
NumPy loop written from the paper (values) and torch autograd (gradients); the queue's
enqueue/dequeue against a plain ring buffer; sharded (8 CPU devices) == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding
from mmjax.losses import contrastive_queue


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _inputs(n=8, q=16, d=12, seed=0):
    rng = np.random.default_rng(seed)
    zimg = _unit(rng, n, d)
    ztxt = _unit(rng, n, d) + zimg          # matching pairs correlated: the loss is not flat
    ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
    zimg_m = zimg + 0.1 * _unit(rng, n, d)  # the momentum model: near the online one
    zimg_m /= np.linalg.norm(zimg_m, axis=1, keepdims=True)
    ztxt_m = ztxt + 0.1 * _unit(rng, n, d)
    ztxt_m /= np.linalg.norm(ztxt_m, axis=1, keepdims=True)
    return zimg, ztxt, zimg_m, ztxt_m, _unit(rng, q, d), _unit(rng, q, d)


def _numpy_itc(zimg, ztxt, zimg_m, ztxt_m, image_queue, text_queue, scale, alpha):
    """One example at a time, as ALBEF's model_pretrain.py states it (float64)."""
    def direction(online, momentum, keys):
        total = 0.0
        for i in range(len(online)):
            logits = scale * keys @ online[i]
            log_p = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
            target = np.zeros(len(keys))
            target[i] = 1.0
            if alpha:
                teacher = scale * keys @ momentum[i]
                teacher = np.exp(teacher - teacher.max())
                target = alpha * teacher / teacher.sum() + (1 - alpha) * target
            total -= np.sum(target * log_p)
        return total / len(online)

    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    zimg, ztxt, zimg_m, ztxt_m = map(f64, (zimg, ztxt, zimg_m, ztxt_m))
    image_queue, text_queue = f64(image_queue), f64(text_queue)
    i2t = direction(zimg, zimg_m, np.concatenate([ztxt_m, text_queue]))
    t2i = direction(ztxt, ztxt_m, np.concatenate([zimg_m, image_queue]))
    return (i2t + t2i) / 2, i2t, t2i


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
def test_itc_queue_loss_matches_numpy(alpha, scale):
    args = _inputs()
    loss, metrics = contrastive_queue.itc_queue_loss(*args, jnp.float32(scale), distill=alpha)
    want, i2t, t2i = _numpy_itc(*args, scale, alpha)
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    np.testing.assert_allclose(metrics["i2t_loss"], i2t, rtol=2e-5)
    np.testing.assert_allclose(metrics["t2i_loss"], t2i, rtol=2e-5)
    keys = np.concatenate([args[3], args[5]])
    np.testing.assert_allclose(metrics["batch_i2t_top1"], np.mean(np.argmax(args[0] @ keys.T, 1) == np.arange(8)))


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_gradients_flow_only_into_online_features_and_scale(alpha):
    """torch autograd of ALBEF's formula (momentum side under no_grad) == jax.grad."""
    args = _inputs(seed=1)
    scale = 5.0

    def torch_loss(zimg, ztxt, s):
        zimg_m, ztxt_m, iq, tq = (torch.tensor(np.asarray(a), dtype=torch.float64) for a in args[2:])
        texts_all, images_all = torch.cat([ztxt_m, tq]), torch.cat([zimg_m, iq])
        targets = torch.eye(8, 8 + 16, dtype=torch.float64)
        loss = 0
        for online, momentum, keys in ((zimg, zimg_m, texts_all), (ztxt, ztxt_m, images_all)):
            with torch.no_grad():
                soft = torch.softmax(s * momentum @ keys.T, 1)
                target = alpha * soft + (1 - alpha) * targets
            loss = loss - (torch.log_softmax(s * online @ keys.T, 1) * target).sum(1).mean() / 2
        return loss

    ts = [torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True) for a in (args[0], args[1], scale)]
    torch_loss(*ts).backward()

    def jax_loss(zimg, ztxt, zimg_m, ztxt_m, iq, tq, s):
        return contrastive_queue.itc_queue_loss(zimg, ztxt, zimg_m, ztxt_m, iq, tq, s, distill=alpha)[0]

    grads = jax.grad(jax_loss, argnums=tuple(range(7)))(*args, jnp.float32(scale))
    np.testing.assert_allclose(grads[0], ts[0].grad.numpy(), atol=2e-6)
    np.testing.assert_allclose(grads[1], ts[1].grad.numpy(), atol=2e-6)
    np.testing.assert_allclose(grads[6], ts[2].grad.numpy(), rtol=1e-4)
    for g in grads[2:6]:   # the momentum features and queues are constants
        assert not np.any(g)


def test_enqueue_is_a_ring_buffer():
    queue, pointer = jnp.zeros((6, 2)), jnp.int32(0)
    reference, position = np.zeros((6, 2)), 0
    for step in range(5):
        batch = np.full((2, 2), step + 1.0, np.float32)
        queue, pointer = jax.jit(contrastive_queue.enqueue)(queue, batch, pointer)
        reference[position:position + 2] = batch
        position = (position + 2) % 6
        np.testing.assert_array_equal(queue, reference)
        assert int(pointer) == position
    np.testing.assert_array_equal(queue[:, 0], [4, 4, 5, 5, 3, 3])   # oldest overwritten first


def test_bad_shapes_are_named():
    args = _inputs()
    with pytest.raises(ValueError, match="not a multiple of the batch of 8"):
        contrastive_queue.enqueue(jnp.zeros((12, 12)), args[0], jnp.int32(0))
    with pytest.raises(ValueError, match=r"queue must be \(Q, D=12\)"):
        contrastive_queue.itc_queue_loss(*args[:4], jnp.zeros((16, 5)), args[5], 1.0)


def test_sharded_loss_and_gradients_equal_one_device():
    args = _inputs(n=16, q=32)
    fn = jax.jit(jax.value_and_grad(
        lambda a, b, *rest: contrastive_queue.itc_queue_loss(a, b, *rest, distill=0.4)[0], argnums=(0, 1, 6)))
    want = fn(*args, jnp.float32(3.0))
    mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    placed = [jax.device_put(a, batch) for a in args[:4]] + [jax.device_put(a, replicated) for a in args[4:]]
    with jax.set_mesh(mesh):
        got = fn(*placed, jnp.float32(3.0))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=1e-7)
