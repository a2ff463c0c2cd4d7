"""mmjax.data.mixing against timm's `Mixup` (mode="batch"): mixed images and targets for fixed
λ and box, CutMix's clipped-box λ correction over every box centre, λ statistics, sharding,
config errors, and the classification task's use of it."""

import functools
import itertools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax import configs
from mmjax.data import mixing
from mmjax.losses import classification as cls_losses

B, H, W, C, CLASSES = 6, 10, 12, 3, 5
EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, H, W, C)).astype(np.float32), rng.integers(0, CLASSES, B)


def _timm_mix(monkeypatch, images, labels, lam, use_cutmix, center, smoothing):
    """timm's Mixup.__call__ with its random draws (λ, switch, box centre) replaced by ours."""
    from timm.data import mixup as timm_mixup
    mixer = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=CLASSES)
    monkeypatch.setattr(mixer, "_params_per_batch", lambda: (lam, use_cutmix))
    draws = iter(center)
    monkeypatch.setattr(timm_mixup.np.random, "randint", lambda lo, hi, size=None: next(draws))
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    x, target = mixer(x, torch.from_numpy(labels))
    return x.numpy().transpose(0, 2, 3, 1), target.numpy()


@pytest.mark.parametrize("lam,use_cutmix,center", [
    (0.37, False, (0, 0)),      # mixup
    (1.0, False, (0, 0)),       # not applied this batch
    (0.3, True, (8, 2)),        # CutMix box clipped at the bottom and left
    (0.55, True, (4, 6)),       # CutMix box inside the image
    (0.02, True, (0, 11)),      # CutMix box nearly the whole image, clipped
])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_timm_for_fixed_params(monkeypatch, lam, use_cutmix, center, smoothing):
    images, labels = _batch()
    want_x, want_y = _timm_mix(monkeypatch, images, labels, lam, use_cutmix, center, smoothing)
    got_x, got_y, _ = jax.jit(mixing.mix, static_argnums=2)(
        jnp.asarray(images), jnp.asarray(labels), CLASSES, jnp.float32(lam), jnp.asarray(use_cutmix),
        jnp.asarray(center), smoothing)
    dx, dy = np.abs(np.asarray(got_x) - want_x).max(), np.abs(np.asarray(got_y) - want_y).max()
    print(f"\nmixing vs timm Mixup (λ={lam}, cutmix={use_cutmix}, smoothing={smoothing}): "
          f"images max-abs-diff {dx:.1e}, targets {dy:.1e}")
    assert dx < 1e-6 and dy < 1e-6


def test_cutmix_box_and_lambda_correction_every_centre(monkeypatch):
    """The clipped box and corrected λ for every possible centre equal timm's cutmix_bbox_and_lam."""
    from timm.data import mixup as timm_mixup
    centres = list(itertools.product(range(H), range(W)))
    draws = iter(())
    monkeypatch.setattr(timm_mixup.np.random, "randint", lambda lo, hi, size=None: next(draws))
    for lam in (0.05, 0.3, 0.5, 0.81, 0.999):
        want = []
        for centre in centres:
            draws = iter(centre)
            box, corrected = timm_mixup.cutmix_bbox_and_lam((B, C, H, W), lam)
            want.append((*[int(v) for v in box], corrected))
        box_at = functools.partial(mixing.cutmix_box, jnp.float32(lam), size=(H, W))
        boxes = jax.vmap(box_at)(jnp.asarray(centres))
        want = np.asarray(want)
        np.testing.assert_array_equal(np.asarray(boxes), want[:, :4])
        area = (want[:, 1] - want[:, 0]) * (want[:, 3] - want[:, 2])
        np.testing.assert_allclose(1 - area / (H * W), want[:, 4], atol=1e-12)


def test_lambda_statistics():
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    lam, cut = jax.vmap(lambda k: mixing.sample_params(k, mixing.Mixup(0.8, 1.0, 0.5, 0.6)))(keys)
    lam, cut = np.asarray(lam), np.asarray(cut)
    mixed = lam < 1
    mix_lam, cut_lam = lam[mixed & ~cut], lam[cut]
    beta_var = lambda a: 1 / (4 * (2 * a + 1))   # noqa: E731  Var of Beta(a, a)
    print(f"\nmixed share {mixed.mean():.3f} (prob 0.6); cutmix share of those {cut[mixed].mean():.3f} (0.5); "
          f"mixup λ mean {mix_lam.mean():.3f} var {mix_lam.var():.4f} (Beta(.8,.8): .5, {beta_var(0.8):.4f}); "
          f"cutmix λ mean {cut_lam.mean():.3f} var {cut_lam.var():.4f} (U(0,1): .5, {1 / 12:.4f})")
    assert not (cut & ~mixed).any(), "CutMix only on mixed batches"
    assert abs(mixed.mean() - 0.6) < 5 * np.sqrt(0.24 / n)
    assert abs(cut[mixed].mean() - 0.5) < 5 * np.sqrt(0.25 / mixed.sum())
    assert abs(mix_lam.mean() - 0.5) < 0.03 and abs(mix_lam.var() - beta_var(0.8)) < 0.01
    assert abs(cut_lam.mean() - 0.5) < 0.03 and abs(cut_lam.var() - beta_var(1.0)) < 0.01


def test_sharded_batch_matches_unsharded():
    """Mixing a batch split over 8 devices (the partner of an example lives on another device)
    gives the unsharded result, for mixup and for CutMix."""
    images, labels = _batch()
    images, labels = np.concatenate([images] * 3)[:16], np.concatenate([labels] * 3)[:16]
    mix = jax.jit(mixing.mix, static_argnums=2)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    spec = NamedSharding(mesh, PartitionSpec("data"))
    for lam, use_cutmix in ((0.3, False), (0.6, True)):
        params = (jnp.float32(lam), jnp.asarray(use_cutmix), jnp.asarray((4, 5)), 0.1)
        want = mix(jnp.asarray(images), jnp.asarray(labels), CLASSES, *params)
        got = mix(jax.device_put(images, spec), jax.device_put(labels, spec), CLASSES, *params)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[1]).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("block,match", [
    (dict(mixup_alpha=0.8, cutmx_alpha=1.0), r"Unknown mixup key\(s\) \['cutmx_alpha'\]"),
    (dict(mixup_alpha=0.0, cutmix_alpha=0.0), "mixup_alpha > 0 or cutmix_alpha > 0"),
    (dict(prob=1.5), "probability"),
    (dict(mixup_alpha=-1.0), "non-negative"),
])
def test_config_errors(block, match):
    with pytest.raises(ValueError, match=match):
        mixing.Mixup.from_config(block)


def _smoke(name, arg=""):
    return configs.load_config(f"{EXPERIMENTS / name}:smoke=True{arg}")


def test_config_block_and_overrides():
    config = _smoke("mae/in1k_finetune.py")
    assert mixing.Mixup.from_config(config.mixup) == mixing.Mixup(0.8, 1.0, 0.5, 1.0)
    config = configs.apply_overrides(config, ["--config.mixup.cutmix_alpha=0", "--config.model.drop_path=0.2"])
    assert config.mixup.cutmix_alpha == 0.0 and config.model.drop_path == 0.2
    with pytest.raises(configs.ConfigKeyError, match="mixup.alpha"):
        configs.apply_overrides(config, ["--config.mixup.alpha=1"])
    assert "mixup" not in _smoke("vit/augreg_i21k.py", ",variant=Ti/16")
    assert _smoke("vit/augreg_i21k.py", ",variant=L/16").mixup.mixup_alpha == 0.5
    assert _smoke("beit/in1k_finetune.py").model.drop_path == 0.1


class _Linear(nn.Module):
    """A stand-in classifier: the task's mixing and loss wiring do not depend on the model."""

    num_classes: int

    @nn.compact
    def __call__(self, images, *, train=False):
        return {"logits": nn.Dense(self.num_classes)(images.reshape(images.shape[0], -1))}


@pytest.mark.parametrize("lam,use_cutmix", [(0.3, False), (0.6, True)])
def test_task_loss_uses_mixed_soft_targets(monkeypatch, lam, use_cutmix):
    """The classification task mixes with the step rng, folds smoothing 0.1 into the targets
    once, and scores batch_top1 against their argmax. (λ is fixed here, which also spares
    compiling the Beta sampler; the box centre still comes from the rng.)"""
    from mmjax.tasks import classification
    monkeypatch.setattr(mixing, "sample_params", lambda rng, mixup: (jnp.float32(lam), jnp.asarray(use_cutmix)))

    class Task(classification.ClassificationTask):
        model_class = _Linear

    config = ml_collections.ConfigDict(dict(
        model=dict(num_classes=CLASSES), loss=dict(name="softmax_xent", label_smoothing=0.1),
        mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)))
    task = Task(config)
    images, labels = _batch()
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    params = task.init_variables(jax.random.key(0), batch)["params"]

    @jax.jit
    def task_and_by_hand(rng):
        loss, metrics = task.loss(params, batch, rng)
        _, mix_rng = jax.random.split(rng)     # the task's split: (dropout, mixing)
        mixed, soft = mixing.mix_batch(mix_rng, batch["image"], batch["label"], CLASSES, task.mixup, 0.1)
        logits = task.model.apply({"params": params}, mixed)["logits"]
        return loss, metrics["batch_top1"], cls_losses.softmax_xent(logits, soft), \
            (logits.argmax(-1) == soft.argmax(-1)).mean()

    loss, top1, want_loss, want_top1 = task_and_by_hand(jax.random.key(0))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(top1, want_top1)
    config.mixup.prob = 2.0
    with pytest.raises(ValueError, match="probability"):
        Task(config)
