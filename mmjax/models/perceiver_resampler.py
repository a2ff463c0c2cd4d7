"""Flamingo's Perceiver resampler (Alayrac et al. 2022, Sec. 2.1 and Fig. 3): a fixed set of learned
latents cross-attends to any number of media tokens, so a language model always receives the
same number of visual tokens per image or video.

Each of `depth` layers: keys and values = LayerNorm(media) concatenated with LayerNorm(latents),
queries from the latents only, latents += attention; latents += FF(LayerNorm(latents)); then a
final LayerNorm. Video frames get learned frame embeddings and each media its learned time
embedding (OpenFlamingo's `max_num_frames` / `max_num_media`; off when None).

The two published spellings (`spelling=`) fix the defaults; any field can still be overridden:
  "open_flamingo": open_flamingo.src.helpers.PerceiverResampler (8 heads of 64, GELU FF).
  "idefics":       transformers IdeficsPerceiverResampler (16 heads of 96, ReLU FF, optional
                   LayerNorms on the per-head queries and keys: `qk_norm`).
Both: no biases in the projections or the FF, FF hidden 4 x width, LayerNorm eps 1e-5.

Parameters (their PyTorch names: mmjax/convert/perceiver.py): latents, frame_embs,
media_time_embs, layer_{i}/attn/{norm_media,norm_latents,query,key,value,out,q_norm,k_norm},
layer_{i}/{ff_norm,ff/{fc1,fc2}}, norm; with `scan=True` the layers are one stack `layers/...`
(leading axis: the layer), as layers.Stack's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import layers
from mmjax.models import outputs

SPELLINGS = {
    "open_flamingo": dict(depth=6, num_heads=8, head_dim=64, num_latents=64, act="gelu", qk_norm=False),
    "idefics": dict(depth=6, num_heads=16, head_dim=96, num_latents=64, act="relu", qk_norm=False),
}
ARCH_FIELDS = ("depth", "num_heads", "head_dim", "num_latents", "act", "qk_norm")
LN_EPS = 1e-5          # torch.nn.LayerNorm's default, which both references use


def resolve(spelling: str, **explicit) -> dict:
    """The spelling's architecture fields, overridden by the explicit (not None) values."""
    if spelling not in SPELLINGS:
        raise ValueError(f"Unknown Perceiver resampler spelling {spelling!r}; known: {list(SPELLINGS)}")
    return {**SPELLINGS[spelling], **{k: v for k, v in explicit.items() if v is not None}}


def _head_norm(name: str) -> nn.LayerNorm:
    """A LayerNorm over one head's features (IDEFICS' q/k norms): its parameters are `kv`-shaped."""
    init = lambda base: nn.with_logical_partitioning(base, ("kv",))  # noqa: E731
    return nn.LayerNorm(LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
                        scale_init=init(nn.initializers.ones), bias_init=init(nn.initializers.zeros))


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to [media; latents] (keys and values), no projection biases."""

    num_heads: int
    head_dim: int
    qk_norm: bool = False
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, media: jax.Array, latents: jax.Array) -> jax.Array:
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; known: {layers.ATTENTION_IMPLS}")
        media = layers.LayerNorm(LN_EPS, name="norm_media")(media)
        latents = layers.LayerNorm(LN_EPS, name="norm_latents")(latents)
        context = jnp.concatenate([media, latents], axis=1)
        heads = lambda name: layers.HeadsDense(self.num_heads, self.head_dim, False, self.dtype, name=name)  # noqa: E731
        q, k, v = heads("query")(latents), heads("key")(context), heads("value")(context)
        if self.qk_norm:
            q, k = _head_norm("q_norm")(q).astype(self.dtype), _head_norm("k_norm")(k).astype(self.dtype)
        names = ("act_batch", "act_len", "act_heads", "act_kv")
        q, k, v = (layers.constrain(t, names) for t in (q, k, v))
        if self.attention_impl == "xla":
            x = layers.attention_heads_leading(q, k, v)
        else:
            x = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        out = layers.MergeHeadsDense(latents.shape[-1], False, self.dtype, name="out")(layers.constrain(x, names))
        return layers.constrain(out, layers.TOKENS)


class PerceiverLayer(nn.Module):
    """latents += attention(media, latents); latents += FF(LayerNorm(latents))."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    act: str
    qk_norm: bool = False
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scanned: bool = False                # inside nn.scan: return (carry, None)

    @nn.compact
    def __call__(self, latents: jax.Array, media: jax.Array):
        latents = latents + PerceiverAttention(self.num_heads, self.head_dim, self.qk_norm, self.dtype,
                                               self.attention_impl, name="attn")(media, latents)
        ff_in = layers.LayerNorm(LN_EPS, name="ff_norm")(latents).astype(self.dtype)
        latents = latents + layers.Mlp(self.mlp_dim, act=self.act, use_bias=False, dtype=self.dtype,
                                       name="ff")(ff_in)
        return (latents, None) if self.scanned else latents


class PerceiverResampler(nn.Module):
    """media (B, N, D) -> {"tokens": (B, num_latents, D)}; or media (B, T, F, v, D): T media of F
    frames of v tokens each -> {"tokens": (B, T, num_latents, D)}, each media resampled on its
    own (its frames together). D must equal `width`."""

    width: int
    spelling: str = "open_flamingo"
    depth: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    num_latents: int | None = None
    mlp_dim: int | None = None           # default 4 x width
    act: str | None = None
    qk_norm: bool | None = None
    max_num_media: int | None = None     # learned media-time embeddings for up to this many media
    max_num_frames: int | None = None    # learned frame embeddings for up to this many frames
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False                   # one scanned `layers` stack instead of layer_{i}
    remat_policy: str = "none"           # a key of layers.REMAT_POLICIES

    def arch(self) -> dict:
        return resolve(self.spelling, **{k: getattr(self, k) for k in ARCH_FIELDS})

    def _embedding(self, name: str, rows: int, what: str, used: int) -> jax.Array:
        if used > rows:
            raise ValueError(f"The input has {used} {what} but the resampler's {name} cover {rows}")
        table = self.param(name, nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                           (rows, self.width))
        return table[:used].astype(self.dtype)

    def _layers(self, arch: dict, latents: jax.Array, media: jax.Array) -> jax.Array:
        """The `depth` layers, unrolled (`layer_{i}`) or scanned (`layers`), rematerialised if asked."""
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; known: {sorted(layers.REMAT_POLICIES)}")
        layer = PerceiverLayer
        if self.remat_policy != "none":
            layer = nn.remat(layer, policy=layers.REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
        fields = (arch["num_heads"], arch["head_dim"], self.mlp_dim or 4 * self.width, arch["act"], arch["qk_norm"],
                  self.dtype, self.attention_impl)
        if not self.scan:
            for i in range(arch["depth"]):
                latents = layer(*fields, name=f"layer_{i}")(latents, media)
            return latents
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,),
                        length=arch["depth"], metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(*fields, scanned=True, name="layers")(latents, media)[0]

    @nn.compact
    def __call__(self, media: jax.Array) -> dict:
        if media.ndim not in (3, 5):
            raise ValueError(f"The Perceiver resampler takes media of shape (B, N, D) or (B, T, F, v, D); "
                             f"got rank {media.ndim}, shape {media.shape}")
        if media.shape[-1] != self.width:
            raise ValueError(f"The media features are {media.shape[-1]} wide; this resampler's width is {self.width}")
        arch = self.arch()
        x = media[:, None, None] if media.ndim == 3 else media
        b, t, f, v, d = x.shape
        x = x.astype(self.dtype)
        if self.max_num_frames is not None:
            x = x + self._embedding("frame_embs", self.max_num_frames, "frames", f)[None, None, :, None]
        if self.max_num_media is not None:
            x = x + self._embedding("media_time_embs", self.max_num_media, "media", t)[None, :, None, None]
        x = layers.constrain(x.reshape(b * t, f * v, d), layers.TOKENS)
        latents = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                             (arch["num_latents"], self.width))
        h = jnp.broadcast_to(latents.astype(self.dtype), (b * t, *latents.shape))
        h = self._layers(arch, h, x)
        h = layers.LayerNorm(LN_EPS, name="norm")(h)
        shape = (b, arch["num_latents"], d) if media.ndim == 3 else (b, t, arch["num_latents"], d)
        return outputs.check({"tokens": h.reshape(shape)})
