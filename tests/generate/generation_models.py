"""A tiny BERT-shaped causal decoder built directly from mmjax.layers (word + position +
token-type embeddings, post-LN causal blocks with optional cross-attention, BERT's LM head with
tied embeddings), its weights copied from a random transformers `BertLMHeadModel`, and a
cache-free greedy reference. Test-only: the model family's own module and conversion table
live in mmjax/models/bert.py and mmjax/convert/bert.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch_weights
from transformers import BertConfig, BertLMHeadModel

from mmjax import layers

VOCAB, WIDTH, DEPTH, HEADS, MLP, POSITIONS, CONTEXT_WIDTH = 48, 32, 2, 4, 48, 40, 32
EPS = 1e-12


class TinyBertDecoder(nn.Module):
    """BertLMHeadModel's computation on mmjax.layers, following the decode cache convention."""

    cross_attention: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, tokens, *, positions=None, mask=None, context=None, context_mask=None, decode=False):
        if positions is None:
            positions = jnp.arange(tokens.shape[1])[None]
        word = nn.Embed(VOCAB, WIDTH, name="word")
        x = word(tokens) + nn.Embed(POSITIONS, WIDTH, name="position")(positions)
        x = x + self.param("token_type", nn.initializers.normal(0.02), (WIDTH,))
        x = layers.LayerNorm(EPS, name="ln_embed")(x)
        block = layers.BlockConfig(num_heads=HEADS, mlp_dim=MLP, norm="post", norm_eps=EPS, causal=True,
                                   cross_attention=self.cross_attention)
        x = layers.Stack(block, DEPTH, scan=self.scan, name="encoder")(
            x, mask, context=context, context_mask=context_mask, decode=decode)
        h = layers.activation("gelu")(nn.Dense(WIDTH, name="transform")(x))
        h = layers.LayerNorm(EPS, name="ln_head")(h)
        return word.attend(h) + self.param("head_bias", nn.initializers.zeros, (VOCAB,))


def reference_model(cross_attention: bool, seed: int = 0) -> BertLMHeadModel:
    """A random BertLMHeadModel decoder whose greedy continuations vary with the prompt (larger
    weights make every prompt collapse onto one repeated token)."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=MLP, max_position_embeddings=POSITIONS, is_decoder=True,
                        add_cross_attention=cross_attention, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, layer_norm_eps=EPS, pad_token_id=0,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = BertLMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "LayerNorm.weight" in name else (0.3 if "embeddings" in name else 0.1) * noise)
    return model.eval()


def params_from_reference(model: BertLMHeadModel, scan: bool = False) -> dict:
    """The reference's weights in TinyBertDecoder's tree."""
    e, head = model.bert.embeddings, model.cls.predictions
    encoder = {f"layer_{i}": torch_weights.bert_layer(layer, HEADS)
               for i, layer in enumerate(model.bert.encoder.layer)}
    if scan:
        encoder = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *encoder.values())}
    to_numpy, norm = torch_weights.to_numpy, torch_weights.norm
    return {"word": {"embedding": to_numpy(e.word_embeddings.weight)},
            "position": {"embedding": to_numpy(e.position_embeddings.weight)},
            "token_type": to_numpy(e.token_type_embeddings.weight)[0], "ln_embed": norm(e.LayerNorm),
            "encoder": encoder, "transform": torch_weights.dense(head.transform.dense),
            "ln_head": norm(head.transform.LayerNorm),
            "head_bias": to_numpy(head.bias)}


def greedy_without_cache(model: TinyBertDecoder, params, prompt: np.ndarray, steps: int, context=None) -> np.ndarray:
    """Greedy continuation of one unpadded prompt by full causal forwards over the sequence so
    far (written into a fixed buffer: later slots cannot affect earlier positions)."""
    length = len(prompt) + steps
    inputs = {} if context is None else {"context": jnp.asarray(context)[None]}
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens, **inputs)[0])
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(prompt)] = prompt
    for t in range(len(prompt), length):
        tokens[0, t] = int(jnp.argmax(forward(tokens)[t - 1]))
    return tokens[0, len(prompt):]
