"""FLIP patch dropping in mmjax.models.vit: which tokens survive, training only, and the CLIP path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import clip, vit

SMALL = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8}
IMAGES = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)   # 16 patches


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_drop_patches_keeps_prefix_and_a_random_subset_per_example(num_prefix):
    b, patches, d = 6, 16, 4
    tokens = np.arange(b * (num_prefix + patches) * d, dtype=np.float32).reshape(b, num_prefix + patches, d)
    out = np.asarray(vit.drop_patches(jax.random.key(0), jnp.asarray(tokens), num_prefix, 0.5))
    assert out.shape == (b, num_prefix + 8, d)
    np.testing.assert_array_equal(out[:, :num_prefix], tokens[:, :num_prefix])
    subsets = []
    for i in range(b):
        rows = {tuple(r) for r in tokens[i, num_prefix:]}
        kept = [tuple(r) for r in out[i, num_prefix:]]
        assert set(kept) <= rows and len(set(kept)) == len(kept), "kept tokens are distinct originals"
        subsets.append(frozenset(np.flatnonzero([tuple(r) in set(kept) for r in tokens[i, num_prefix:]])))
    assert len(set(subsets)) > 1, "each example draws its own subset"


@pytest.mark.parametrize("ratio,kept", [(0.5, 98), (0.75, 49), (0.9, 19), (0.999, 1)])
def test_kept_patches(ratio, kept):
    assert vit.kept_patches(196, ratio) == kept


def _apply(model, train):
    """Jitted apply returning (output dict, encoded image tokens); `train` draws from the given rng."""
    def run(variables, *inputs, rng):
        out, state = model.apply(variables, *inputs, train=train, rngs={"dropout": rng},
                                 mutable=["intermediates"])
        if "tokens" in out:         # a ViT
            return out, out["tokens"]
        # CLIP: what the image tower's blocks saw (each block sows its output)
        return out, jax.tree.leaves(state["intermediates"]["visual"]["encoder"])[-1]
    return jax.jit(run)


def test_training_drops_patches_and_evaluation_sees_all():
    model = vit.ViT(**SMALL, patch_drop_ratio=0.5)
    variables = jax.jit(model.init)(jax.random.key(0), IMAGES)
    train, evaluate = _apply(model, True), _apply(model, False)
    a, encoded = train(variables, IMAGES, rng=jax.random.key(1))
    assert encoded.shape == (4, 1 + 8, 32)
    out, encoded = evaluate(variables, IMAGES, rng=jax.random.key(1))
    assert encoded.shape == (4, 1 + 16, 32)
    # Evaluation is the plain model: same outputs as the same parameters without dropping.
    plain, _ = _apply(vit.ViT(**SMALL), False)(variables, IMAGES, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out["pooled"]), np.asarray(plain["pooled"]))
    # Different rngs drop different patches.
    b, _ = train(variables, IMAGES, rng=jax.random.key(2))
    assert not np.allclose(np.asarray(a["pooled"]), np.asarray(b["pooled"]))


def test_clip_image_tower_drops_patches_in_training_only():
    """Shapes only (traced with eval_shape, nothing compiled): CLIP passes `train` to its tower."""
    model = clip.CLIP(embed_dim=16, image=dict(SMALL, patch_drop_ratio=0.75),
                      text={"vocab_size": 50, "context_length": 8, "width": 32, "depth": 1, "num_heads": 2})
    tokens = np.tile(np.arange(1, 9, dtype=np.int32), (4, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES, tokens)
    for train, tokens_seen in ((True, 1 + 4), (False, 1 + 16)):
        _, encoded = jax.eval_shape(_apply(model, train), variables, IMAGES, tokens, rng=jax.random.key(1))
        assert encoded.shape == (4, tokens_seen, 32)


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match="patch_drop_ratio"):
        vit.ViT(**SMALL, patch_drop_ratio=ratio).init(jax.random.key(0), IMAGES)
