"""BLIP-2's Querying Transformer (Li et al. 2023) as transformers' `Blip2QFormerModel` computes it.

A BERT-style post-LN encoder over [learned queries ; optional text tokens]: self-attention is
shared by queries and text, but cross-attention to the image (every `cross_attention_frequency`
layers, from layer 0) and the feed-forward weights are the queries' own: text tokens never see
the image directly and go through a separate feed-forward (`mlp_text`). The input embeddings are
layer-normed once (`ln`, transformers' `qformer.layernorm`) before the first layer.

`QFormer` takes the embedded sequence (queries first) and how many of its tokens are queries, so
the three ways BLIP-2 runs it are one module: queries only (image features, stage 2), queries +
text (ITM, ITG: the mask says who sees whom) and text only (`num_queries=0`: ITC's text side).

Parameters (transformers names: mmjax/convert/blip2.py): ln, layer_{i}/{attn,ln1,cross_attn,
ln_cross,mlp_query,ln2_query,mlp_text,ln2_text}; `TextEmbeddings`: word/embedding,
position/embedding. Layers are unrolled (they alternate with and without cross-attention).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import layers

_NORMAL = nn.initializers.normal(0.02)      # BERT's initializer_range


class QFormerLayer(nn.Module):
    """One Q-Former layer (transformers' Blip2QFormerLayer): post-LN self-attention over all
    tokens; for the first `num_queries` tokens cross-attention to `context` (when the layer has
    it) and the query feed-forward; for the rest the text feed-forward."""

    num_heads: int
    mlp_dim: int
    cross_attention: bool
    text_ffn: bool = True
    act: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, num_queries: int, mask: jax.Array | None = None,
                 context: jax.Array | None = None, context_mask: jax.Array | None = None) -> jax.Array:
        def attention(name: str, cross: bool) -> layers.Attention:
            return layers.Attention(self.num_heads, cross=cross, dtype=self.dtype,
                                    attention_impl=self.attention_impl, name=name)

        def add_norm(name: str, x: jax.Array, y: jax.Array) -> jax.Array:     # BERT's post-LN residual
            y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
            return layers.LayerNorm(self.ln_eps, name=name)(x + y.astype(x.dtype)).astype(x.dtype)

        def feed_forward(kind: str, x: jax.Array) -> jax.Array:
            mlp = layers.Mlp(self.mlp_dim, act=self.act, dropout=0.0, dtype=self.dtype, name=f"mlp_{kind}")
            return add_norm(f"ln2_{kind}", x, mlp(x.astype(self.dtype)))

        x = add_norm("ln1", x, attention("attn", cross=False)(x.astype(self.dtype), mask=mask))
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attention:
                y = attention("cross_attn", cross=True)(queries.astype(self.dtype), context, mask=context_mask)
                queries = add_norm("ln_cross", queries, y)
            parts.append(feed_forward("query", queries))
        if text.shape[1]:
            parts.append(feed_forward("text", text))
        return layers.constrain(jnp.concatenate(parts, axis=1), layers.TOKENS)


class QFormer(nn.Module):
    """transformers' Blip2QFormerModel (see the module docstring); BLIP-2's Q-Former is BERT-base
    sized: width 768, 12 layers and heads, mlp 3072, cross-attention every 2nd layer.

    `__call__(embeds, mask, context, context_mask, num_queries=None)`: embeds (B, L, width) with
    the queries first; `num_queries` (a Python int; default: the field) of them are queries and
    the rest text; mask (B, L) valid tokens or a 4-D (B or 1, 1, L, L) mask (True = may attend),
    e.g. ITG's multimodal causal mask; context (B, N, context width) the image tokens. Returns
    {"tokens": (B, L, width)} (float32).
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_queries: int = 32
    cross_attention_frequency: int = 2
    text_ffn: bool = False          # the text feed-forward (transformers' use_qformer_text_input)
    act: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @nn.compact
    def __call__(self, embeds: jax.Array, mask: jax.Array | None = None, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None, num_queries: int | None = None, *,
                 train: bool = False) -> dict[str, jax.Array]:
        num_queries = self.num_queries if num_queries is None else num_queries
        self._check(embeds, num_queries, context)
        x = layers.LayerNorm(self.ln_eps, name="ln")(embeds)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = layers.constrain(x, layers.TOKENS)
        mask, context_mask = layers.as_attention_mask(mask), layers.as_attention_mask(context_mask)
        for i in range(self.depth):
            x = QFormerLayer(self.num_heads, self.mlp_dim, self.has_cross_attention(i), self.text_ffn, self.act,
                             self.ln_eps, self.dropout, self.dtype, self.attention_impl, deterministic=not train,
                             name=f"layer_{i}")(x, num_queries, mask, context, context_mask)
        return {"tokens": x.astype(jnp.float32)}

    def _check(self, embeds: jax.Array, num_queries: int, context: jax.Array | None) -> None:
        if embeds.ndim != 3 or embeds.shape[-1] != self.width:
            raise ValueError(f"QFormer expects embeddings (batch, length, {self.width}), got shape {embeds.shape}")
        if not 0 <= num_queries <= embeds.shape[1]:
            raise ValueError(f"num_queries {num_queries} does not fit a sequence of {embeds.shape[1]} tokens")
        if embeds.shape[1] > num_queries and not self.text_ffn:
            raise ValueError(f"This Q-Former has no text feed-forward (text_ffn=False, transformers' "
                             f"use_qformer_text_input): it reads queries only, got {embeds.shape[1] - num_queries} "
                             "text tokens")
        if num_queries and context is None and self.depth:
            raise ValueError("The queries cross-attend to the image: pass `context` (the vision tokens)")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")


class TextEmbeddings(nn.Module):
    """transformers' Blip2TextEmbeddings: word + learned position embeddings of the text, the
    queries prepended; no norm of its own (the Q-Former's `ln` norms the whole sequence)."""

    vocab_size: int = 30522
    width: int = 768
    max_len: int = 512

    def setup(self):
        embed = lambda n, axes: nn.Embed(  # noqa: E731
            n, self.width, embedding_init=nn.with_logical_partitioning(_NORMAL, axes))
        self.word = embed(self.vocab_size, ("vocab", "embed"))
        self.position = embed(self.max_len, (None, "embed"))

    def __call__(self, tokens: jax.Array | None, queries: jax.Array | None = None) -> jax.Array:
        """tokens (B, L) ids or None; queries (B, Q, width) or None -> (B, Q + L, width)."""
        parts = [] if queries is None else [queries.astype(jnp.float32)]
        if tokens is not None:
            if tokens.shape[1] > self.max_len:
                raise ValueError(f"{tokens.shape[1]} text tokens exceed max_len {self.max_len}")
            parts.append(self.word(tokens) + self.position(jnp.arange(tokens.shape[1])[None]))
        if not parts:
            raise ValueError("TextEmbeddings needs tokens, queries or both")
        return jnp.concatenate(parts, axis=1)

    def attend(self, x: jax.Array) -> jax.Array:
        """(..., vocab) logits against the word embeddings: the stage-1 ITG head's decoder, tied to
        them as LAVIS's BertLMHeadModel (from_pretrained ties `cls.predictions.decoder`)."""
        return self.word.attend(x)
