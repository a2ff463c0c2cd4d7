"""T5 v1.1 / Flan-T5 (BLIP-2's FlanT5-XL/XXL language models): an encoder-decoder from
`mmjax.layers`.

Structure (as transformers' T5ForConditionalGeneration): pre-LN with T5's RMS LayerNorm (no mean,
no bias), attention and feed-forward without biases, gated-GELU (tanh) feed-forward ("geglu";
"geglu_exact" with the exact GELU, as BLIP-2's Flan-T5 configs set dense_act_fn "gelu"; T5 v1.0's
"relu"), relative position buckets (bidirectional in the encoder, causal in the
decoder) whose per-head bias table is the first layer's and is added in every layer, no
position embeddings, a final norm after each stack, an untied head (v1.1 / Flan) or the word
embeddings as head after scaling by width**-0.5 (`tie_embeddings=True`, T5 v1.0).

T5 does not divide q·k by sqrt(head_dim) (it folds that into its init); mmjax's attention does,
so the query kernels hold T5's q weights times sqrt(head_dim) (mmjax/convert/t5.py converts;
exact for head_dim 64, where the factor is 8).

    model = T5(variant="flan-t5-xl")
    enc = model.apply(v, tokens, mask, method="encode")         # or inputs_embeds=... (BLIP-2)
    gen = generate.Generator(generate.FlaxDecoder(model, method="decode"), max_length=32)
    out = gen(params, start, config, inputs={"context": enc["tokens"], "context_mask": mask})

`decode` follows the `mmjax.layers` cache convention (self-attention cache, cross-attention keys
projected once at prefill); its relative positions are cache slots, as transformers'.
Parameters: shared/embedding, {encoder,decoder}_rel_bias/embedding (buckets, heads),
{encoder,decoder}/layer_{i}/{ln1,attn,[ln_cross,cross_attn],ln2,mlp} (scanned: .../layers),
encoder_norm, decoder_norm, lm_head (untied).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import layers
from mmjax.layers import cache

# name: width, encoder_depth, decoder_depth, num_heads, head_dim, mlp_dim, vocab_size
VARIANTS = {
    "flan-t5-base": (768, 12, 12, 12, 64, 2048, 32128),
    "flan-t5-large": (1024, 24, 24, 16, 64, 2816, 32128),
    "flan-t5-xl": (2048, 24, 24, 32, 64, 5120, 32128),
    "flan-t5-xxl": (4096, 24, 24, 64, 64, 10240, 32128),
}
ARCH_FIELDS = ("width", "encoder_depth", "decoder_depth", "num_heads", "head_dim", "mlp_dim", "vocab_size")
MLP_KINDS = ("geglu", "geglu_exact", "relu")
_NORMAL = nn.initializers.normal(1.0)


def relative_position_buckets(relative: jax.Array, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> jax.Array:
    """T5's bucket of each relative position (key - query): exact below num_buckets / 4 (/ 2 when
    causal), log-spaced up to max_distance, one bucket beyond; bidirectional buckets split by sign,
    causal ones map every later key to bucket 0. Same float32 rounding as transformers'."""
    relative = jnp.asarray(relative, jnp.int32)
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(jnp.int32) * num_buckets
        relative = jnp.abs(relative)
    else:
        relative = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    scaled = (jnp.log(jnp.maximum(relative, 1).astype(jnp.float32) / max_exact)
              / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(relative < max_exact, relative, large)


class RelativeBias(nn.Module):
    """The (1, heads, queries, keys) attention bias of T5's bucketed relative positions."""

    num_heads: int
    bidirectional: bool
    num_buckets: int = 32
    max_distance: int = 128

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.with_logical_partitioning(_NORMAL, (None, "heads")),
                           (self.num_buckets, self.num_heads))
        buckets = relative_position_buckets(key_positions[None, :] - query_positions[:, None], self.bidirectional,
                                            self.num_buckets, self.max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]


def resolve_arch(variant: str | None, **explicit) -> dict:
    """The variant's architecture, overridden by the explicit (not None) values given."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"Unknown T5 variant {variant!r}; known: {list(VARIANTS)}")
    arch = dict(zip(ARCH_FIELDS, VARIANTS[variant])) if variant else {}
    arch.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in ARCH_FIELDS if k not in arch]
    if missing:
        raise ValueError(f"T5 needs a variant or explicit {missing}")
    return arch


class T5(nn.Module):
    """T5 v1.1 / Flan-T5 encoder-decoder LM (see the module docstring)."""

    variant: str | None = None
    width: int | None = None
    encoder_depth: int | None = None
    decoder_depth: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    vocab_size: int | None = None
    num_buckets: int = 32
    max_distance: int = 128
    mlp: str = "geglu"
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"

    @nn.nowrap
    def arch(self) -> dict:
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"Unknown T5 feed-forward {self.mlp!r}; known: {MLP_KINDS}")
        return resolve_arch(self.variant, **{k: getattr(self, k) for k in ARCH_FIELDS})

    @nn.nowrap
    def block_config(self, decoder: bool) -> layers.BlockConfig:
        arch = self.arch()
        return layers.BlockConfig(
            num_heads=arch["num_heads"], head_dim=arch["head_dim"], mlp_dim=arch["mlp_dim"], norm="pre",
            norm_kind="rmsnorm", norm_eps=self.norm_eps, mlp=self.mlp, mlp_bias=False, q_bias=False, k_bias=False,
            v_bias=False, out_bias=False, causal=decoder, cross_attention=decoder, dropout=self.dropout,
            dtype=self.dtype, attention_impl=self.attention_impl)

    def setup(self):
        arch = self.arch()
        self.shared = nn.Embed(arch["vocab_size"], arch["width"],
                               embedding_init=nn.with_logical_partitioning(_NORMAL, ("vocab", "embed")))
        bias = lambda bidirectional: RelativeBias(arch["num_heads"], bidirectional, self.num_buckets, self.max_distance)
        self.encoder_rel_bias, self.decoder_rel_bias = bias(True), bias(False)
        stack = lambda decoder, depth: layers.Stack(self.block_config(decoder), depth, scan=self.scan,
                                                    remat_policy=self.remat_policy)
        self.encoder = stack(False, arch["encoder_depth"])
        self.decoder = stack(True, arch["decoder_depth"])
        self.encoder_norm = layers.RMSNorm(self.norm_eps)
        self.decoder_norm = layers.RMSNorm(self.norm_eps)
        self.decoder_slots = cache.SlotCounter()
        self.drop = nn.Dropout(self.dropout)
        if not self.tie_embeddings:
            self.lm_head = nn.Dense(arch["vocab_size"], use_bias=False, dtype=self.dtype,
                                    kernel_init=layers.dense_init(("embed", "vocab"), nn.initializers.normal(0.05)))

    def _embed(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"T5 expects integer token ids (batch, length), got {tokens.dtype} {tokens.shape}")
        return self.shared(tokens).astype(self.dtype)

    def encode(self, tokens: jax.Array | None = None, mask: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None, train: bool = False) -> dict[str, jax.Array]:
        """tokens (batch, length) ids or `inputs_embeds` (batch, length, width) (BLIP-2: the projected
        queries, then the prompt's embeddings); mask (batch, length) True at real tokens. Returns
        {"tokens": the encoder states after the final norm}, the decoder's `context`."""
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of tokens and inputs_embeds")
        width = self.arch()["width"]
        if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != width):
            raise ValueError(f"inputs_embeds must be (batch, length, {width}), got {inputs_embeds.shape}")
        x = self._embed(tokens) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        positions = jnp.arange(x.shape[1])
        x = self.drop(layers.constrain(x, layers.TOKENS), deterministic=not train)
        x = self.encoder(x, mask, bias=self.encoder_rel_bias(positions, positions), deterministic=not train)
        x = self.drop(self.encoder_norm(x).astype(self.dtype), deterministic=not train)
        return {"tokens": x}

    def decode(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None, *,
               context: jax.Array | None = None, context_mask: jax.Array | None = None, train: bool = False,
               decode: bool = False) -> dict[str, jax.Array]:
        """Decoder tokens (batch, length) attending to `context` (the encoder states; when decoding,
        given at prefill only) under `context_mask`. `mask` (batch, keys) True at real tokens (when
        decoding: over the whole cache). `positions` is accepted for the Decoder protocol and unused:
        T5's relative positions are the cache slots. Returns {"tokens", "logits"}."""
        del positions
        length = tokens.shape[1]
        start, keys = 0, length
        if decode:       # the queries sit after the slots written so far; the keys are the whole cache
            if mask is None:
                raise ValueError("Decoding T5 needs the key mask over the whole cache (mask=...)")
            start, keys = self.decoder_slots(length), mask.shape[-1]
        bias = self.decoder_rel_bias(start + jnp.arange(length), jnp.arange(keys))
        x = self.drop(layers.constrain(self._embed(tokens), layers.TOKENS), deterministic=not train)
        x = self.decoder(x, mask, bias=bias, context=context, context_mask=context_mask, deterministic=not train,
                         decode=decode)
        x = self.drop(self.decoder_norm(x).astype(self.dtype), deterministic=not train)
        if self.tie_embeddings:
            logits = self.shared.attend(x * jnp.asarray(self.arch()["width"] ** -0.5, x.dtype))
        else:
            logits = self.lm_head(x)
        logits = layers.constrain(logits, ("act_batch", "act_len", None))
        return {"tokens": x.astype(jnp.float32), "logits": logits.astype(jnp.float32)}

    def __call__(self, tokens: jax.Array | None, decoder_tokens: jax.Array, mask: jax.Array | None = None,
                 decoder_mask: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 train: bool = False) -> dict[str, jax.Array]:
        """Teacher-forced logits: encode `tokens` (or `inputs_embeds`) under `mask`, decode
        `decoder_tokens` (transformers' decoder_input_ids: the decoder start token, 0, then the
        targets shifted right). Returns the decoder's dict plus "encoder" (the encoder states)."""
        context = self.encode(tokens, mask, inputs_embeds=inputs_embeds, train=train)["tokens"]
        out = self.decode(decoder_tokens, mask=decoder_mask, context=context, context_mask=mask, train=train)
        return {**out, "encoder": context}
