"""Text transformer (CLIP's text tower): token + learned position embeddings, causal blocks.

Returns a dict (mmjax.models.outputs): "tokens" after the final LayerNorm and, unless
`pool="none"`, "pooled", one vector per sequence. `pool="argmax"` takes the
position of the largest token id, which is the end-of-text token for CLIP's BPE and for the
mmjax word tokenizers (open_clip's convention); `"last"` takes the final position.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import flops, layers

POOLS = ("argmax", "last", "first", "none")


class TextTransformer(nn.Module):
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int | None = None      # default 4 * width
    causal: bool = True
    pool: str = "argmax"
    act: str = "gelu"
    ln_eps: float = 1e-5
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    block: dict | layers.BlockConfig | None = None   # BlockConfig overrides, e.g. dict(norm="post")

    def block_config(self) -> layers.BlockConfig:
        """The tower's block: this model's fields, then the `block` overrides."""
        return layers.block_config(
            self.block, num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width, mlp=self.act,
            norm_eps=self.ln_eps, causal=self.causal, dropout=self.dropout, dtype=self.dtype,
            attention_impl=self.attention_impl)

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        if self.pool not in POOLS:
            raise ValueError(f"Unknown text pool {self.pool!r}; known: {POOLS}")
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Text tower expects integer token ids of shape (batch, length), "
                             f"got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"Token sequences of length {tokens.shape[1]} exceed the context length "
                             f"{self.context_length}")
        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embedding",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")))
        x = embed(tokens)
        pos = self.param("pos_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")), (self.context_length, self.width))
        x = x + pos[None, :tokens.shape[1]].astype(x.dtype)
        x = layers.constrain(x, ("act_batch", "act_len", "act_emb"))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = layers.Stack(self.block_config(), self.depth, scan=self.scan, remat_policy=self.remat_policy,
                         name="encoder")(x, deterministic=not train)
        x = layers.LayerNorm(self.ln_eps, name="ln_final")(x)
        out = {"tokens": x.astype(jnp.float32)}
        if self.pool == "none":
            return out
        if self.pool == "argmax":
            index = jnp.argmax(tokens, axis=-1)
        elif self.pool == "last":
            index = jnp.full((tokens.shape[0],), tokens.shape[1] - 1)
        else:
            index = jnp.zeros((tokens.shape[0],), jnp.int32)
        out["pooled"] = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return out


def forward_flops(model: TextTransformer, length: int) -> dict[str, float]:
    """Analytic forward FLOPs per sequence (mmjax.flops), by part."""
    return flops.transformer_blocks(length, model.width, model.depth, model.mlp_dim or 4 * model.width)
