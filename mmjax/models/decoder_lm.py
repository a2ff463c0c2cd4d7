"""Decoder-only language models (the frozen LMs the vision bridges feed): LLaMA (LLaMA-1/2,
Vicuna), OPT and Qwen2, one module composed from `mmjax.layers`, the `kind` choosing the
structure:

    llama  RMSNorm pre-LN, rotary positions (base and linear / dynamic scaling), SwiGLU, grouped-
           query attention, no biases (attention_bias / mlp_bias switch them on), untied head
    qwen2  llama with q/k/v biases (no output-projection bias)
    opt    learned positions (table offset by 2, as OPT's), ReLU MLP, biases, LayerNorm pre-LN
           (post-LN with norm="post", as OPT-350m), head tied to the word embeddings, and
           project_in / project_out when the word embeddings (`embed_dim`) are narrower

`DecoderLM(variant="vicuna-7b")` expands to the published shapes (VARIANTS); any field can be
overridden. `param_dtype` names the dtype parameters are created (stored) in, all of them: "bfloat16"
for a frozen LM halves its memory (computation follows `dtype`; norms still compute in float32);
`mmjax.load(path, param_dtype="bfloat16")` loads a converted checkpoint that way.
`__call__(tokens, mask)` or `__call__(inputs_embeds=..., mask=...)` (soft prompts:
concatenate `embed(tokens)` after the prefix) returns a dict: "tokens" (final hidden states, after
OPT's project_out) and "logits". With decode=True it follows the `mmjax.layers.cache` convention,
so `generate.FlaxDecoder(model)` drives it; `prefix_decoder(model)` generates after a soft prompt
(`inputs={"prefix_embeds", "prefix_mask"}`, see `DecoderLM.after_prefix`), as BLIP-2 / MiniGPT-4.

Sharding (logical names, see mmjax.sharding): word embeddings and the head are (vocab, embed) /
(embed, vocab), heads/kv and mlp kernels carry "heads" / "mlp", so fsdp_tp splits vocab, heads
and MLP over `tensor` and every kernel's "embed" axis over `fsdp`; activations are named
(act_batch, act_len, act_emb) and the KV cache (act_batch, act_len, act_heads, act_kv).

Parameters (transformers names: mmjax/convert/decoder_lm.py): embed/embedding, position/embedding
(opt), project_in, project_out (opt), decoder/layer_{i}/{ln1,attn,ln2,mlp} (scanned:
decoder/layers), ln_final, lm_head (untied).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import generate, layers
from mmjax.layers import cache

KINDS = ("llama", "qwen2", "opt")
OPT_POSITION_OFFSET = 2     # OPT's position table has 2 rows before position 0
# name: kind, width, depth, num_heads, mlp_dim, vocab_size, max_len
VARIANTS = {
    "llama-2-7b": ("llama", 4096, 32, 32, 11008, 32000, 4096),
    "vicuna-7b": ("llama", 4096, 32, 32, 11008, 32000, 2048),
    "vicuna-13b": ("llama", 5120, 40, 40, 13824, 32000, 2048),
    "opt-2.7b": ("opt", 2560, 32, 32, 10240, 50272, 2048),
    "opt-6.7b": ("opt", 4096, 32, 32, 16384, 50272, 2048),
    "qwen-7b": ("qwen2", 4096, 32, 32, 11008, 151936, 8192),
}
ARCH_FIELDS = ("kind", "width", "depth", "num_heads", "mlp_dim", "vocab_size", "max_len")
_NORMAL = nn.initializers.normal(0.02)


def resolve_arch(variant: str | None, **explicit) -> dict:
    """The variant's architecture, overridden by the explicit (not None) values given."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"Unknown decoder LM variant {variant!r}; known: {list(VARIANTS)}")
    arch = dict(zip(ARCH_FIELDS, VARIANTS[variant])) if variant else {}
    arch.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in ARCH_FIELDS if k not in arch]
    if missing:
        raise ValueError(f"DecoderLM needs a variant or explicit {missing}")
    if arch["kind"] not in KINDS:
        raise ValueError(f"Unknown decoder LM kind {arch['kind']!r}; known: {KINDS}")
    return arch


def _normal_as_float32(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """_NORMAL drawn in float32, then cast: the same seed gives the same model in any param_dtype."""
    return _NORMAL(key, shape, jnp.float32).astype(dtype)


def _created_in(target: type[nn.Module], param_dtype, initializing: bool) -> type[nn.Module]:
    """`target` (mmjax.layers, which create float32 parameters) whose fresh floating-point
    parameters are cast to `param_dtype`, so a bfloat16 model is the float32 one rounded.
    Applying existing parameters is unchanged, whatever their dtype."""
    if not initializing or jnp.dtype(param_dtype) == jnp.float32:
        return target
    cast = lambda tree: jax.tree.map(
        lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    return nn.map_variables(target, "params", trans_out_fn=cast, init=True)


def prefix_decoder(model: DecoderLM) -> generate.FlaxDecoder:
    """`model` as a generation Decoder that starts from a soft prompt (see DecoderLM.after_prefix):
    `Generator(prefix_decoder(model), max_length)(params, prompt, config, prompt_mask=...,
    inputs={"prefix_embeds": ..., "prefix_mask": ...})`; max_length counts the token prompt and
    the new tokens (the cache holds P slots more)."""
    return generate.FlaxDecoder(model, method="after_prefix", prefill_only=("prefix_embeds",))


class DecoderLM(nn.Module):
    """A decoder-only LM (see the module docstring). Fields left None take the kind's default:
    norm_eps (llama/qwen2 1e-6, opt 1e-5), tie_embeddings (opt only). `rope_*`: the rotary base
    and scaling (None, "linear" or "dynamic" with its factor and trained length). `block`
    overrides BlockConfig fields."""

    variant: str | None = None
    kind: str | None = None
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    vocab_size: int | None = None
    max_len: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    embed_dim: int | None = None          # opt's word_embed_proj_dim (None: width)
    norm: str = "pre"
    norm_eps: float | None = None
    attention_bias: bool | None = None    # q/k/v/out biases (llama False, opt True; qwen2: q/k/v always)
    mlp_bias: bool | None = None          # llama False, opt True
    tie_embeddings: bool | None = None
    rope_base: float = 10_000.0
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    param_dtype: str = "float32"          # a dtype name (saved with the model's fields)
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    block: dict | layers.BlockConfig | None = None

    @nn.nowrap
    def arch(self) -> dict:
        arch = resolve_arch(self.variant, **{k: getattr(self, k) for k in ARCH_FIELDS})
        opt = arch["kind"] == "opt"
        arch["norm_eps"] = self.norm_eps if self.norm_eps is not None else (1e-5 if opt else 1e-6)
        arch["tie_embeddings"] = opt if self.tie_embeddings is None else self.tie_embeddings
        arch["embed_dim"] = self.embed_dim or arch["width"]
        if arch["embed_dim"] != arch["width"] and not opt:
            raise ValueError("embed_dim != width (project_in / project_out) is OPT's only")
        if self.norm != "pre" and not opt:
            raise ValueError(f"norm={self.norm!r}: only OPT has a post-LN variant")
        return arch

    @nn.nowrap
    def block_config(self) -> layers.BlockConfig:
        arch = self.arch()
        kind = arch["kind"]
        common = dict(num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"], causal=True, norm=self.norm,
                      norm_eps=arch["norm_eps"], dropout=self.dropout, dtype=self.dtype,
                      attention_impl=self.attention_impl, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads)
        default = kind == "opt"
        attn_bias = default if self.attention_bias is None else self.attention_bias
        mlp_bias = default if self.mlp_bias is None else self.mlp_bias
        if kind == "opt":
            return layers.block_config(self.block, **common, norm_kind="layernorm", mlp="relu", mlp_bias=mlp_bias,
                                       q_bias=attn_bias, k_bias=attn_bias, v_bias=attn_bias, out_bias=attn_bias)
        qkv_bias = kind == "qwen2" or attn_bias
        rotary = layers.RotaryConfig(base=self.rope_base, scaling=self.rope_scaling, factor=self.rope_factor,
                                     max_positions=arch["max_len"] if self.rope_scaling == "dynamic" else None)
        return layers.block_config(self.block, **common, norm_kind="rmsnorm", mlp="swiglu",
                                   mlp_bias=mlp_bias, q_bias=qkv_bias, k_bias=qkv_bias, v_bias=qkv_bias,
                                   out_bias=attn_bias, rotary=rotary)

    def setup(self):
        arch = self.arch()
        param_dtype = jnp.dtype(self.param_dtype)
        embed = lambda n, d, axes: nn.Embed(n, d, param_dtype=param_dtype,
                                            embedding_init=nn.with_logical_partitioning(_normal_as_float32, axes))
        self.embed = embed(arch["vocab_size"], arch["embed_dim"], ("vocab", "embed"))
        dense = lambda features, axes: nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=param_dtype,
                                                kernel_init=layers.dense_init(axes, _normal_as_float32))
        if arch["kind"] == "opt":
            self.position = embed(arch["max_len"] + OPT_POSITION_OFFSET, arch["width"], (None, "embed"))
            if arch["embed_dim"] != arch["width"]:
                self.project_in = dense(arch["width"], (None, "embed"))
                self.project_out = dense(arch["embed_dim"], ("embed", None))
        self.slots = cache.SlotCounter()
        self.drop = nn.Dropout(self.dropout)
        stack = _created_in(layers.Stack, param_dtype, self.is_initializing())
        self.decoder = stack(self.block_config(), arch["depth"], scan=self.scan, remat_policy=self.remat_policy)
        if self.norm == "pre":
            norm = layers.make_norm("layernorm" if arch["kind"] == "opt" else "rmsnorm", arch["norm_eps"])
            self.ln_final = norm.clone(param_dtype=param_dtype)        # ones: exact in any dtype
        if not arch["tie_embeddings"]:
            self.lm_head = dense(arch["vocab_size"], ("embed", "vocab"))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token ids (batch, length) -> the word embeddings `inputs_embeds` takes (batch, length,
        embed_dim), to concatenate with soft prompts."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"DecoderLM expects integer token ids (batch, length), got {tokens.dtype} {tokens.shape}")
        return self.embed(tokens).astype(self.dtype)

    def __call__(self, tokens: jax.Array | None = None, mask: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None,
                 train: bool = False, decode: bool = False) -> dict[str, jax.Array]:
        """tokens (batch, length) ids, or `inputs_embeds` (batch, length, embed_dim); mask (batch,
        keys) True at real tokens (when decoding: over the whole cache). positions (batch or 1,
        length): default as transformers' forward, i.e. 0.. for the rotary kinds (continuing from
        the cache when decoding) and the count of earlier real tokens for OPT's learned table."""
        arch = self.arch()
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of tokens and inputs_embeds")
        if inputs_embeds is None:
            x = self.embed_tokens(tokens)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != arch["embed_dim"]:
                raise ValueError(f"inputs_embeds must be (batch, length, {arch['embed_dim']}), got "
                                 f"{inputs_embeds.shape}")
            x = inputs_embeds.astype(self.dtype)
        positions = self._positions(x.shape[:2], mask, positions, decode)
        if arch["kind"] == "opt":
            if arch["embed_dim"] != arch["width"]:
                x = self.project_in(x)
            x = x + self.position(positions + OPT_POSITION_OFFSET).astype(self.dtype)
        x = self.drop(layers.constrain(x, layers.TOKENS), deterministic=not train)
        x = self.decoder(x, mask, positions=positions, deterministic=not train, decode=decode)
        if self.norm == "pre":
            x = self.ln_final(x).astype(self.dtype)
        if arch["kind"] == "opt" and arch["embed_dim"] != arch["width"]:
            x = self.project_out(x)
        logits = self.embed.attend(x) if arch["tie_embeddings"] else self.lm_head(x)
        logits = layers.constrain(logits, ("act_batch", "act_len", None))
        return {"tokens": x.astype(jnp.float32), "logits": logits.astype(jnp.float32)}

    def after_prefix(self, tokens: jax.Array, *, prefix_mask: jax.Array, prefix_embeds: jax.Array | None = None,
                     positions: jax.Array | None = None, mask: jax.Array | None = None, train: bool = False,
                     decode: bool = False) -> dict[str, jax.Array]:
        """The LM on `tokens` placed after P soft-prompt slots (BLIP-2's projected queries): what
        transformers computes for `inputs_embeds=cat(prefix_embeds, embed(tokens))` with the mask
        `cat(prefix_mask, mask)`. Generation drives it through `prefix_decoder(model)` with
        `inputs={"prefix_embeds": (batch, P, embed_dim), "prefix_mask": (batch, P)}`: the prefill
        call writes the prefix and the prompt into the cache (P slots more than the Generator's
        max_length), steps pass the prefix_mask only, so P is known and every key mask / position
        is shifted by it. `mask` / `positions` are the token part's (the Generator's); positions
        then count the real prefix slots as well, as transformers' cumsum of the attention mask."""
        if prefix_mask.ndim != 2 or prefix_mask.shape[0] != tokens.shape[0]:
            raise ValueError(f"prefix_mask must be (batch {tokens.shape[0]}, prefix length), got {prefix_mask.shape}")
        prefix_mask = prefix_mask.astype(bool)
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
        full_mask = jnp.concatenate([prefix_mask, mask], axis=1)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask[:, -tokens.shape[1]:], axis=1) - 1, 0)
        positions = positions + prefix_mask.sum(axis=1, keepdims=True)
        if prefix_embeds is None:        # a decoding step: the prefix is in the cache already
            return self(tokens, full_mask, positions=positions, train=train, decode=decode)
        if prefix_embeds.shape[:2] != prefix_mask.shape:
            raise ValueError(f"prefix_embeds {prefix_embeds.shape} and prefix_mask {prefix_mask.shape} disagree")
        prefix_positions = jnp.maximum(jnp.cumsum(prefix_mask, axis=1) - 1, 0)
        embeds = jnp.concatenate([prefix_embeds.astype(self.dtype), self.embed_tokens(tokens)], axis=1)
        positions = jnp.concatenate([prefix_positions, jnp.broadcast_to(positions, tokens.shape)], axis=1)
        out = self(None, full_mask, inputs_embeds=embeds, positions=positions, train=train, decode=decode)
        return {k: v[:, prefix_mask.shape[1]:] for k, v in out.items()}      # the token part's

    def _positions(self, shape: tuple[int, int], mask: jax.Array | None, positions: jax.Array | None,
                   decode: bool) -> jax.Array:
        batch, length = shape
        arch = self.arch()
        if positions is not None:
            return jnp.asarray(positions)
        if arch["kind"] == "opt" and not decode and mask is not None and mask.shape == (batch, length):
            return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
        if arch["kind"] == "opt" and length > arch["max_len"]:
            raise ValueError(f"{length} tokens exceed OPT's {arch['max_len']} learned positions (max_len)")
        start = self.slots(length) if decode else 0     # tokens fed so far (0 while initialising)
        return (start + jnp.arange(length))[None]
