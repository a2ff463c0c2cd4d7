"""Transformer building blocks shared by every model family (`mmjax.models` composes them).

    common             activations, logical-axis constraints, initialisers
    norms              LayerNorm / RMSNorm
    masks              causal / padding masks and how they combine
    attention          Attention (self / cross, GQA, rotary, KV cache), heads projections
    attention_core     the attention softmax with a hand-written backward ("xla" backend)
    cache              the "cache" collection for decoding
    mlp                feed-forward kinds (GELU family, ReLU, SwiGLU, GeGLU)
    rotary             rotary position embedding
    embeddings         patch embedding, learned and sine-cosine position embeddings
    relative_position  BEiT's relative position bias
    block              BlockConfig (one block described once) and Block
    stack              Stack: depth x Block, scan / remat / drop path / rescaled init

`from mmjax import layers` gives the public names below, e.g. `layers.Stack(layers.BlockConfig(
num_heads=12, mlp_dim=3072), depth=12)`.
"""

from mmjax.layers.attention import (
    ATTENTION_IMPLS,
    Attention,
    HeadsDense,
    MergeHeadsDense,
    attention_heads_leading,
)
from mmjax.layers.block import Block, BlockConfig, block_config, drop_branch
from mmjax.layers.common import TOKENS, Dtype, activation, constrain, dense_init
from mmjax.layers.embeddings import LearnedPosEmb, PatchEmbed, resample_posemb, sincos_2d
from mmjax.layers.masks import as_attention_mask, causal_mask, combine_masks, padding_mask
from mmjax.layers.mlp import GATED, Mlp
from mmjax.layers.norms import LayerNorm, RMSNorm, make_norm
from mmjax.layers.relative_position import (
    RelativePositionBias,
    relative_position_index,
    resize_relative_position_table,
)
from mmjax.layers.rotary import RotaryConfig, apply_rotary
from mmjax.layers.stack import (
    REMAT_POLICIES,
    RESIDUAL_OUT_KERNELS,
    BlockGroup,
    Stack,
    drop_path_rates,
    rescale_residual_init,
    to_scanned,
    to_unrolled,
)

__all__ = [
    "ATTENTION_IMPLS", "Attention", "HeadsDense", "MergeHeadsDense", "attention_heads_leading",
    "Block", "BlockConfig", "block_config", "drop_branch",
    "TOKENS", "Dtype", "activation", "constrain", "dense_init",
    "LearnedPosEmb", "PatchEmbed", "resample_posemb", "sincos_2d",
    "as_attention_mask", "causal_mask", "combine_masks", "padding_mask",
    "GATED", "Mlp", "LayerNorm", "RMSNorm", "make_norm",
    "RelativePositionBias", "relative_position_index", "resize_relative_position_table",
    "RotaryConfig", "apply_rotary",
    "REMAT_POLICIES", "RESIDUAL_OUT_KERNELS", "BlockGroup", "Stack", "drop_path_rates",
    "rescale_residual_init", "to_scanned", "to_unrolled",
]
