"""BERT-family text encoder (Devlin et al. 2019) composed from `mmjax.layers`: word + learned
position + token-type embeddings, post-LN blocks, optional cross-attention (every layer, or from a
given layer on as ALBEF's fusion layers), a causal decoder mode with a decode cache (BLIP's text
decoder, transformers' BertLMHeadModel), [CLS] pooling or BERT's pooler, and the MLM / LM head
tied to the word embeddings.

`Bert(variant="base")` expands to width/depth/mlp_dim/num_heads; any field can be overridden.
`__call__` returns a dict (mmjax.models.outputs): "tokens" (the last hidden states), "pooled"
(unless pool="none") and "logits" (with lm_head).

Parameters (their transformers names: mmjax/convert/bert.py): embeddings/{word,position,
token_type}/embedding, embeddings/ln, encoder/layer_{i}/{attn,ln1,cross_attn,ln_cross,mlp,ln2}
(scanned: encoder/layers, see layers.Stack), ln_final (pre-LN blocks only), pooler,
lm_head/{dense,ln,bias}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers
from mmjax.layers import cache

# name: (width, depth, mlp_dim, num_heads); tiny..medium are Google's compact BERTs (Turc et al. 2019)
VARIANTS = {
    "tiny": (128, 2, 512, 2),
    "mini": (256, 4, 1024, 4),
    "small": (512, 4, 2048, 8),
    "medium": (512, 8, 2048, 8),
    "base": (768, 12, 3072, 12),
    "large": (1024, 24, 4096, 16),
}
ARCH_FIELDS = ("width", "depth", "mlp_dim", "num_heads")
POOLS = ("cls", "pooler", "none")
MODES = ("full", "text", "fusion")
_NORMAL = nn.initializers.normal(0.02)      # BERT's initializer_range


def resolve_arch(variant: str | None, **explicit: int | None) -> dict:
    """The variant's (width, depth, mlp_dim, num_heads), overridden by the explicit values given."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"Unknown BERT variant {variant!r}; known: {list(VARIANTS)}")
    arch = dict(zip(ARCH_FIELDS, VARIANTS[variant])) if variant else {}
    arch.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in ARCH_FIELDS if k not in arch]
    if missing:
        raise ValueError(f"Bert needs a variant or explicit {missing}")
    return arch


class TextEmbeddings(nn.Module):
    """BERT's input embeddings: word + learned position + token-type, then LayerNorm and dropout
    (ViLT's text side too). `attend` scores states against the word embeddings (a tied head)."""

    vocab_size: int
    width: int
    max_len: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        embed = lambda n, axes: nn.Embed(n, self.width, embedding_init=nn.with_logical_partitioning(_NORMAL, axes))
        self.word = embed(self.vocab_size, ("vocab", "embed"))
        self.position = embed(self.max_len, (None, "embed"))
        if self.type_vocab_size:
            self.token_type = embed(self.type_vocab_size, (None, "embed"))
        self.ln = layers.LayerNorm(self.ln_eps)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, tokens: jax.Array, token_types: jax.Array | None, positions: jax.Array, *,
                 deterministic: bool = True) -> jax.Array:
        """tokens, token_types (batch, length) ints; positions (batch or 1, length)."""
        x = self.word(tokens) + self.position(positions)
        if self.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + self.token_type(types)
        elif token_types is not None:
            raise ValueError("token_types given, but this model has no token-type embeddings (type_vocab_size=0)")
        x = self.ln(x).astype(self.dtype)
        return self.drop(layers.constrain(x, layers.TOKENS), deterministic=deterministic)

    def attend(self, x: jax.Array) -> jax.Array:
        """x (..., width) -> (..., vocab) scores x · word_embeddingᵀ."""
        return jnp.einsum("...d,vd->...v", x, self.word.embedding.astype(x.dtype))


class LMHead(nn.Module):
    """BERT's masked-LM (and, for a causal model, next-token) head: dense + activation +
    LayerNorm, then the tied word-embedding scores plus a per-token bias."""

    act: str = "gelu"
    ln_eps: float = 1e-12
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, embeddings: TextEmbeddings) -> jax.Array:
        x = nn.Dense(x.shape[-1], dtype=self.dtype, name="dense",
                     kernel_init=layers.dense_init(("embed", "mlp"), _NORMAL),
                     bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))(x)
        x = layers.LayerNorm(self.ln_eps, name="ln")(layers.activation(self.act)(x)).astype(self.dtype)
        bias = self.param("bias", layers.dense_init(("vocab",), nn.initializers.zeros), (embeddings.vocab_size,))
        logits = embeddings.attend(x) + bias.astype(self.dtype)
        return layers.constrain(logits, ("act_batch", "act_len", None))


class Bert(nn.Module):
    """BERT text encoder / decoder (see the module docstring).

    ln_eps 1e-12 and exact GELU are BERT's; `block` overrides BlockConfig fields (e.g.
    dict(norm="pre"), which adds `ln_final`). `dropout` is on the embeddings and the residual
    branches (BERT's hidden_dropout_prob; the shared attention has no attention-probability
    dropout). cross_attention: layers `cross_attention_from` on, every `cross_attention_every`-th,
    attend to a `context` (BLIP: all layers; ALBEF: from 6 on). pool: "cls" (the [CLS] state),
    "pooler" (BERT's dense + tanh on it) or "none". lm_head: the tied MLM / LM head.
    """

    variant: str | None = None
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    act: str = "gelu"
    dropout: float = 0.1
    causal: bool = False
    cross_attention: bool = False
    cross_attention_from: int = 0
    cross_attention_every: int = 1
    pool: str = "cls"
    lm_head: bool = False
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    block: dict | layers.BlockConfig | None = None   # BlockConfig overrides, e.g. dict(norm="pre")

    @nn.nowrap
    def arch(self) -> dict:
        return resolve_arch(self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                            num_heads=self.num_heads)

    @nn.nowrap
    def block_config(self) -> layers.BlockConfig:
        """The encoder's block: this model's fields, then the `block` overrides."""
        arch = self.arch()
        return layers.block_config(
            self.block, num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"], norm="post", norm_eps=self.ln_eps,
            mlp=self.act, causal=self.causal, cross_attention=self.cross_attention, dropout=self.dropout,
            dtype=self.dtype, attention_impl=self.attention_impl)

    @nn.nowrap
    def stack(self, block: layers.BlockConfig | None = None, name: str | None = None) -> layers.Stack:
        """The block stack (its `segments()` say where a scanned stack keeps which layers)."""
        return layers.Stack(block or self.block_config(), self.arch()["depth"], scan=self.scan,
                            remat_policy=self.remat_policy, cross_attention_every=self.cross_attention_every,
                            cross_attention_from=self.cross_attention_from, name=name)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, context: jax.Array | None = None,
                 context_mask: jax.Array | None = None, *, token_types: jax.Array | None = None,
                 positions: jax.Array | None = None, mode: str = "full", train: bool = False,
                 decode: bool = False) -> dict[str, jax.Array]:
        """tokens (batch, length) int ids; mask (batch, length) True/1 at real tokens (the
        tokenizer's padding mask); context (batch, n, context width) and its context_mask for
        cross-attention; token_types, positions (batch, length) default to 0 and 0.. .

        mode "full": every layer. "text": the text-only encoder of a cross-attention model, no
        LM head: the layers before `cross_attention_from` (ALBEF), or with cross_attention_from=0
        every layer with its cross-attention skipped (BLIP's unimodal encoder). "fusion": `tokens`
        are the (batch, length, width) states of mode "text", run through the remaining layers.

        decode=True (causal models): flax's cache convention (mmjax.layers.cache). Initialise with
        the full-length input (and the context) to size the cache; each later call with
        mutable=["cache"] feeds the next tokens, with `mask` covering the whole cache (batch,
        max length) and no context (its keys/values are cached). Positions continue from the cache.
        """
        arch = self.arch()
        self._check(mode, context, decode)
        block = self.block_config()
        first, stop = 0, arch["depth"]
        if mode == "text" and self.cross_attention:
            if self.cross_attention_from:
                stop = self.cross_attention_from
            elif self.scan and self.cross_attention_every > 1:
                raise ValueError("mode='text' of a scanned stack with cross_attention_every > 1 is not supported")
            else:
                block = block.replace(cross_attention=False)     # its cross_attn parameters stay unused
            context = context_mask = None
        elif mode == "fusion":
            first = self.cross_attention_from

        embeddings = TextEmbeddings(self.vocab_size, arch["width"], self.max_len, self.type_vocab_size, self.ln_eps,
                                    self.dropout, self.dtype, name="embeddings")
        if mode == "fusion":
            x = self._check_states(tokens, arch["width"])
        else:
            x = embeddings(tokens, token_types, self._positions(tokens, positions, decode), deterministic=not train)
        layer_range = None if (first, stop) == (0, arch["depth"]) else (first, stop)
        x = self.stack(block, name="encoder")(x, mask, context=context, context_mask=context_mask,
                                              deterministic=not train, decode=decode, layer_range=layer_range)
        if block.norm == "pre" and stop == arch["depth"]:
            x = layers.LayerNorm(self.ln_eps, name="ln_final")(x)
        out = {"tokens": x.astype(jnp.float32)}
        if self.pool == "cls":
            out["pooled"] = x[:, 0].astype(jnp.float32)
        elif self.pool == "pooler":
            pooler = nn.Dense(arch["width"], dtype=self.dtype, name="pooler",
                              kernel_init=layers.dense_init(("embed", "mlp"), _NORMAL),
                              bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))
            out["pooled"] = jnp.tanh(pooler(x[:, 0])).astype(jnp.float32)
        if self.lm_head and mode != "text":
            head = LMHead(self.act, self.ln_eps, self.dtype, name="lm_head")
            out["logits"] = head(x, embeddings).astype(jnp.float32)
        return out

    def _check(self, mode: str, context: jax.Array | None, decode: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; known: {MODES}")
        if self.pool not in POOLS:
            raise ValueError(f"Unknown pool {self.pool!r}; known: {POOLS}")
        if mode == "fusion" and not self.cross_attention:
            raise ValueError("mode='fusion' needs a model with cross_attention")
        if mode != "text" and self.cross_attention and context is None and not decode:
            raise ValueError(f"This Bert has cross-attention: mode {mode!r} needs the `context` to attend to "
                             "(mode='text' runs the text-only encoder)")
        if mode != "full" and self.cross_attention and self.is_initializing():
            raise ValueError("Initialise a cross-attention Bert with mode='full' and a context, so that every "
                             "parameter is created")
        if decode and (not self.causal or mode != "full"):
            raise ValueError("decode=True is for causal models (causal=True) in mode 'full'")

    def _check_states(self, states: jax.Array, width: int) -> jax.Array:
        if states.ndim != 3 or states.shape[-1] != width or not jnp.issubdtype(states.dtype, jnp.floating):
            raise ValueError(f"mode='fusion' expects the float (batch, length, {width}) states of mode='text', "
                             f"got {states.dtype} {states.shape}")
        return states.astype(self.dtype)

    def _positions(self, tokens: jax.Array, positions: jax.Array | None, decode: bool) -> jax.Array:
        """Explicit positions, else 0.. (continuing from the cache when decoding)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Bert expects integer token ids of shape (batch, length), got {tokens.dtype} "
                             f"{tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"{length} tokens exceed the {self.max_len} position embeddings (max_len)")
        if positions is not None:
            return positions
        start = 0
        if decode:   # the number of tokens fed so far; stays 0 while initialising, as the attention cache
            initialized = self.has_variable(cache.COLLECTION, "position")
            fed = self.variable(cache.COLLECTION, "position", lambda: jnp.zeros((), jnp.int32))
            if initialized:
                start, fed.value = fed.value, fed.value + length
        return (start + jnp.arange(length))[None]


def forward_flops(model: Bert, length: int, context_length: int = 0, context_width: int | None = None
                  ) -> dict[str, float]:
    """Analytic forward FLOPs per sequence (mmjax.flops), by part: the blocks, their
    cross-attention sub-layers (`context_length` keys of `context_width`), the pooler and LM head."""
    arch, width = model.arch(), model.arch()["width"]
    parts = flops.transformer_blocks(length, width, arch["depth"], arch["mlp_dim"])
    crossing = sum(model.stack().has_cross_attention(i) for i in range(arch["depth"])) if model.cross_attention else 0
    if crossing:
        linear = 2 * flops.dense(length, width, width) + 2 * flops.dense(context_length, context_width or width, width)
        parts["cross_blocks_linear"] = crossing * linear
        parts["cross_blocks_attention"] = crossing * flops.attention(length, context_length, width)
    if model.pool == "pooler":
        parts["pooler"] = flops.dense(1, width, width)
    if model.lm_head:
        parts["lm_head"] = flops.dense(length, width, width) + flops.dense(length, width, model.vocab_size)
    return parts
