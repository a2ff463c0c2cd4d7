"""MiniGPT-4 checkpoints (Vision-CAIR/MiniGPT-4) -> mmjax MiniGPT4, import only. Key names read from
its minigpt4/models/mini_gpt4.py, which builds on LAVIS's BLIP-2 (see mmjax.convert.blip2_lavis):

    visual_encoder.*, ln_vision.*       EVA ViT-g (39 blocks) and the norm after it
    Qformer.bert.*, query_tokens        the BLIP-2 Q-Former; MiniGPT-4 deletes its word / position
                                        embeddings, text feed-forward and `cls` head
    llama_proj.{weight,bias}            the one trained layer -> language_projection
    llama_model.*                       transformers' LlamaForCausalLM (Vicuna) -> language_model

The released MiniGPT-4 file holds `llama_proj` alone (the official code saves trained parameters
only): the rest comes from the files the official code loads, given together and merged by
`blip2_lavis.assemble` (EVA's eva_vit_g.pth, BLIP-2's blip2_pretrained_flant5xxl.pth, the Vicuna
folder). The BLIP-2 stage-1 parts MiniGPT-4 does not use (the Q-Former's text embeddings and
feed-forward, the ITG head, the ITC / ITM heads, the temperature) are dropped with a note. A file
has no config: sizes come from the shapes, head counts from the published Vicuna / LLaMA shapes
(mmjax.models.decoder_lm.VARIANTS) matched by width and depth unless given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mmjax.convert import blip2, blip2_lavis, decoder_lm
from mmjax.convert.engine import ConversionError, Plan, Table, linear
from mmjax.models import decoder_lm as decoder_lm_models
from mmjax.pretrained import input_spec

MODEL = "mmjax.models.minigpt4.MiniGPT4"
LM_PREFIX = "llama_model."
_LAYER = re.compile(r"llama_model\.model\.layers\.(\d+)\.")
# BLIP-2 stage-1 keys MiniGPT-4 deletes or never builds (mini_gpt4.py sets them to None)
UNUSED = (r"Qformer\.cls\..*", r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight",
          r"Qformer\.bert\.embeddings\.position_ids", r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
          r"(vision_proj|text_proj|itm_head)\.(weight|bias)", "temp")


def is_minigpt4(state: Mapping) -> bool:
    return "llama_proj.weight" in state


def llama_fields(state: Mapping, num_heads: int | None = None) -> dict:
    """DecoderLM fields of `llama_model` (LlamaForCausalLM) from its shapes; heads given or the
    published LLaMA / Vicuna's of the same width and depth."""
    vocab, width = blip2_lavis.shape_of(state, "llama_model.model.embed_tokens.weight")
    depth = blip2_lavis.count_layers(state, _LAYER)
    if num_heads is None:
        known = {(v[1], v[2]): (v[3], v[6]) for v in decoder_lm_models.VARIANTS.values() if v[0] == "llama"}
        if (width, depth) not in known:
            raise ConversionError(f"llama_model is {width} wide and {depth} deep, not a published LLaMA / Vicuna of "
                                  f"{sorted(known)}: pass its number of heads")
        num_heads, max_len = known[width, depth]
    else:
        max_len = 2048
    head_dim = width // num_heads
    kv_heads = blip2_lavis.shape_of(state, "llama_model.model.layers.0.self_attn.k_proj.weight")[0] // head_dim
    return {"kind": "llama", "width": width, "depth": depth, "num_heads": num_heads,
            "num_kv_heads": kv_heads if kv_heads != num_heads else None,
            "mlp_dim": blip2_lavis.shape_of(state, "llama_model.model.layers.0.mlp.up_proj.weight")[0],
            "vocab_size": vocab, "max_len": max_len, "tie_embeddings": "llama_model.lm_head.weight" not in state}


def from_official(state: Mapping, *, lm_config: dict | None = None, vision_head_dim: int = blip2_lavis.EVA_G_HEAD_DIM,
                  qformer_head_dim: int = blip2_lavis.BERT_HEAD_DIM, lm_num_heads: int | None = None) -> Plan:
    """The plan of a (merged) MiniGPT-4 state dict; see the module docstring. `lm_config`: the
    Vicuna folder's config.json (heads, rotary base, norm eps, BOS), else shapes and published sizes."""
    if not is_minigpt4(state):
        raise ConversionError("Not a MiniGPT-4 checkpoint: it has no llama_proj.weight")
    if not any(k.startswith(LM_PREFIX) for k in state):
        raise ConversionError("The MiniGPT-4 checkpoint has no llama_model.* keys: give the Vicuna folder as "
                              "another --checkpoint (the released file holds llama_proj alone)")
    vision = blip2_lavis.vision_fields(state, vision_head_dim)
    qformer = blip2_lavis.qformer_fields(state, qformer_head_dim)
    lm_table = blip2.prefixed(decoder_lm.llama_table(), LM_PREFIX, "language_model/")
    table = Table((*blip2_lavis.tower_rules(), *linear("llama_proj", "language_projection"), *lm_table.rules),
                  ignore=(*lm_table.ignore, *UNUSED))
    dropped = sorted(k for k in state if any(re.fullmatch(p, k) for p in UNUSED))
    notes = [f"Dropped {len(dropped)} BLIP-2 keys MiniGPT-4 does not use: {', '.join(dropped[:6])}"
             f"{' ...' if len(dropped) > 6 else ''}"] if dropped else []
    if lm_config is not None:
        arch = (lm_config.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch != "LlamaForCausalLM":
            raise ConversionError(f"MiniGPT-4's language model is a LlamaForCausalLM (Vicuna), the folder holds {arch}")
        lm = decoder_lm.fields_from_hf({**lm_config, "architectures": [arch]})
        bos = lm_config.get("bos_token_id", 1)
    else:
        lm, bos = llama_fields(state, lm_num_heads), 1
    fields = {"vision": vision, "qformer_fields": qformer, "lm": lm, "bos_token_id": bos}
    image = blip2_lavis.image_input(state, vision["patch_size"])
    return Plan(MODEL, fields, [image, input_spec((1, 8), "int32")], table,
                {"library": "minigpt4", "model": "minigpt4"}, notes)
