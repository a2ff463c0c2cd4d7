"""LAVIS (salesforce/LAVIS) BLIP-2 checkpoints -> mmjax, import only: most BLIP-2 checkpoints and
fine-tunes are LAVIS files. The key names are read from LAVIS's source:

    eva_vit.py          visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1,
                        attn.qkv (no bias), attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}}
                        (EVA's ViT-g has no final norm: blip2.py's `ln_vision` follows it)
    Qformer.py          Qformer.bert.embeddings.{word_embeddings, position_embeddings, LayerNorm},
                        Qformer.bert.encoder.layer.{i}.{attention,crossattention}.{self.{query,key,
                        value}, output.{dense,LayerNorm}}, intermediate(_query), output(_query);
                        Qformer.cls.predictions.* (the ITG head of stage 1)
    blip2_qformer.py    stage 1 (`blip2`, `blip2_feature_extractor`): query_tokens, vision_proj,
                        text_proj, itm_head, temp  -> mmjax Blip2Retrieval
    blip2_opt.py        stage 2: query_tokens, opt_proj, opt_model.* (transformers' OPTForCausalLM
                        names; LAVIS drops the Q-Former's word / position embeddings, text
                        feed-forward and cls head)  -> mmjax Blip2LM
    blip2_t5.py         stage 2 with Flan-T5: query_tokens, t5_proj, t5_model.* (transformers'
                        T5ForConditionalGeneration names, modeling_t5.py)  -> mmjax Blip2T5
                        (mmjax.convert.blip2_t5)

A LAVIS file has no config: sizes come from the shapes. Head counts do not, so they are the
published ones unless given: EVA ViT-g's head width 88 (1408 / 16), BERT's 64, and OPT's from
mmjax.models.decoder_lm.VARIANTS matched by width and depth. The stage-1 ITG head (Qformer.cls.*)
and ITC temperature (temp) have no place in Blip2Retrieval: dropped with a note. LAVIS's
ln_vision uses torch's LayerNorm eps 1e-5, mmjax (as transformers) the ViT's 1e-6 for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from mmjax import paths
from mmjax.convert import blip2, blip2_t5, decoder_lm, io
from mmjax.convert.engine import (
    HEADS_BIAS,
    HEADS_IN,
    ConversionError,
    Plan,
    Rule,
    Table,
    conv,
    heads_out,
    linear,
    norm,
    rule,
)
from mmjax.models import decoder_lm as decoder_lm_models
from mmjax.pretrained import input_spec

EVA_G_HEAD_DIM = 88
EVA_G_BLIP2_DEPTH = 39    # BLIP-2 (and MiniGPT-4) build EVA ViT-g with 39 of its 40 blocks
BERT_HEAD_DIM = 64
_VISION_LAYER = re.compile(r"visual_encoder\.blocks\.(\d+)\.")
_QFORMER_LAYER = re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.")
_OPT_LAYER = re.compile(r"opt_model\.model\.decoder\.layers\.(\d+)\.")
_IGNORE = (r".*position_ids",)
_UNSUPPORTED = {"llm_model.": "InstructBLIP / blip2_vicuna_instruct",
                "llama_model.": "MiniGPT-4 (use --source minigpt4)"}


def vision_rules(dst: str = "vision_model") -> list[Rule]:
    """LAVIS's EVA ViT (`visual_encoder`) and `ln_vision` <-> mmjax Blip2Vision (under `dst`)."""
    layer, to = "visual_encoder.blocks.{i}", dst + "/encoder/layer_{i}"
    qkv = [f"{to}/attn/{n}/kernel" for n in ("query", "key", "value")]
    return [*conv("visual_encoder.patch_embed.proj", f"{dst}/embedding/conv"),
            rule("visual_encoder.cls_token", f"{dst}/cls"),
            rule("visual_encoder.pos_embed", f"{dst}/posemb/pos_embedding"),
            *norm(f"{layer}.norm1", f"{to}/ln1"),
            rule(f"{layer}.attn.qkv.weight", qkv, HEADS_IN),
            rule(f"{layer}.attn.q_bias", f"{to}/attn/query/bias", HEADS_BIAS),
            rule(f"{layer}.attn.v_bias", f"{to}/attn/value/bias", HEADS_BIAS),
            *heads_out(f"{layer}.attn.proj", f"{to}/attn/out"),
            *norm(f"{layer}.norm2", f"{to}/ln2"),
            *linear(f"{layer}.mlp.fc1", f"{to}/mlp/fc1"),
            *linear(f"{layer}.mlp.fc2", f"{to}/mlp/fc2"),
            *norm("ln_vision", f"{dst}/norm")]


def tower_rules() -> list[Rule]:
    return [*vision_rules(), rule("query_tokens", "query_tokens"),
            *blip2.qformer_rules("Qformer.bert", "qformer", inner="self", embeddings_norm="embeddings.LayerNorm")]


def shape_of(state: Mapping, key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"Not a LAVIS BLIP-2 / MiniGPT-4 checkpoint: it has no {key}")
    return tuple(np.shape(state[key]))


def count_layers(state: Mapping, pattern: re.Pattern) -> int:
    return 1 + max((int(m[1]) for k in state if (m := pattern.match(k))), default=-1)


def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise ConversionError(f"{what} width {width} is not a multiple of the head width {head_dim}; pass the "
                              f"head width")
    return width // head_dim


def _bare_eva(state: Mapping) -> bool:
    return "blocks.0.attn.qkv.weight" in state and not any(k.startswith("visual_encoder.") for k in state)


def lm_prefix(lm_config: dict) -> str:
    """Where LAVIS keeps the LM whose transformers config.json this is: t5_model. (blip2_t5) or opt_model."""
    return blip2_t5.LAVIS_PREFIX if lm_config.get("model_type") == "t5" else "opt_model."


def assemble(files: list[str], lm_prefix: str | Callable[[dict], str]
             ) -> tuple[dict[str, np.ndarray], list[str], dict | None]:
    """One state dict from the files a LAVIS-style model is loaded from (the released checkpoints
    keep trained parameters only): LAVIS / MiniGPT-4 files as they are, a transformers folder (the
    LM) under `lm_prefix` ("opt_model.", "llama_model."; or a function of its config.json), and
    EVA's own ViT file (eva_vit_g.pth: `blocks.*`, no prefix) under `visual_encoder.`, its 40th block
    left out as BLIP-2's create_eva_vit_g builds 39. Returns (state, notes, the LM folder's config.json or None); a key
    two files give differently is an error."""
    state: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    notes, lm_config = [], None
    for path in files:
        if paths.isdir(path):
            lm_config, part = io.read_hf_folder(path)
            prefix = lm_prefix(lm_config) if callable(lm_prefix) else lm_prefix
            part = {prefix + k: v for k, v in part.items()}
        else:
            part = io.read_state_dict(path)
            if _bare_eva(part):
                kept = {k: v for k, v in part.items()
                        if not (m := re.match(r"blocks\.(\d+)\.", k)) or int(m[1]) < EVA_G_BLIP2_DEPTH}
                if len(kept) < len(part):
                    notes.append(f"{path}: EVA blocks from {EVA_G_BLIP2_DEPTH} on left out (BLIP-2 uses "
                                 f"{EVA_G_BLIP2_DEPTH})")
                part = {"visual_encoder." + k: v for k, v in kept.items()}
        for key, value in part.items():
            if key in state and (np.shape(state[key]) != np.shape(value) or not np.array_equal(state[key], value)):
                raise ConversionError(f"{key} differs between {origin[key]} and {path}")
            state[key], origin[key] = value, path
    return state, notes, lm_config


def vision_fields(state: Mapping, head_dim: int = EVA_G_HEAD_DIM) -> dict:
    width = shape_of(state, "visual_encoder.cls_token")[-1]
    patch = shape_of(state, "visual_encoder.patch_embed.proj.weight")[-1]
    return {"variant": None, "width": width, "depth": count_layers(state, _VISION_LAYER),
            "num_heads": _heads(width, head_dim, "The vision encoder's"),
            "mlp_dim": shape_of(state, "visual_encoder.blocks.0.mlp.fc1.weight")[0], "patch_size": patch,
            "ln_eps": 1e-6, "act": "gelu", "qkv_bias": "visual_encoder.blocks.0.attn.q_bias" in state}


def image_input(state: Mapping, patch: int) -> dict:
    grid = round((shape_of(state, "visual_encoder.pos_embed")[1] - 1) ** 0.5)
    return input_spec((1, grid * patch, grid * patch, 3))


def qformer_fields(state: Mapping, head_dim: int = BERT_HEAD_DIM) -> dict:
    _, num_queries, width = shape_of(state, "query_tokens")
    depth = count_layers(state, _QFORMER_LAYER)
    crossing = [i for i in range(depth) if f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight" in state]
    frequency = crossing[1] - crossing[0] if len(crossing) > 1 else depth
    if not crossing or crossing != list(range(0, depth, frequency)):
        raise ConversionError(f"Q-Former cross-attention in layers {crossing}: expected every n-th layer from 0")
    return {"width": width, "depth": depth, "num_heads": _heads(width, head_dim, "The Q-Former's"),
            "mlp_dim": shape_of(state, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")[0],
            "num_queries": num_queries, "cross_attention_frequency": frequency, "act": "gelu", "ln_eps": 1e-12}


def opt_fields(state: Mapping, num_heads: int | None = None) -> dict:
    """DecoderLM fields of LAVIS's `opt_model` (OPTForCausalLM); heads: given or the published OPT's."""
    vocab, width = shape_of(state, "opt_model.model.decoder.embed_tokens.weight")
    depth = count_layers(state, _OPT_LAYER)
    if "opt_model.model.decoder.project_in.weight" in state:
        raise ConversionError("opt_model has project_in / project_out (word_embed_proj_dim < hidden_size): opt_proj "
                              "cannot feed its narrower word embeddings")
    if num_heads is None:
        known = {(v[1], v[2]): v[3] for v in decoder_lm_models.VARIANTS.values() if v[0] == "opt"}
        if (width, depth) not in known:
            raise ConversionError(f"opt_model is {width} wide and {depth} deep, not a published OPT of "
                                  f"{sorted(known)}: pass its number of heads")
        num_heads = known[width, depth]
    return {"kind": "opt", "width": width, "depth": depth, "num_heads": num_heads,
            "mlp_dim": shape_of(state, "opt_model.model.decoder.layers.0.fc1.weight")[0], "vocab_size": vocab,
            "max_len": shape_of(state, "opt_model.model.decoder.embed_positions.weight")[0]
            - decoder_lm_models.OPT_POSITION_OFFSET, "embed_dim": width, "norm": "pre", "attention_bias": True,
            "mlp_bias": True, "tie_embeddings": True}


def _tied_head(state: Mapping) -> tuple[str, ...]:
    head, embed = "opt_model.lm_head.weight", "opt_model.model.decoder.embed_tokens.weight"
    if head not in state:
        return ()
    if np.shape(state[head]) != np.shape(state[embed]) or not np.array_equal(state[head], state[embed]):
        raise ConversionError(f"{head} differs from {embed}: mmjax's OPT ties them")
    return (re.escape(head),)


def from_lavis(state: Mapping[str, np.ndarray], *, vision_head_dim: int = EVA_G_HEAD_DIM,
               qformer_head_dim: int = BERT_HEAD_DIM, lm_num_heads: int | None = None,
               lm_config: dict | None = None) -> Plan:
    """The plan of a LAVIS BLIP-2 state dict: `blip2_opt` -> Blip2LM, `blip2_t5` -> Blip2T5 (T5's
    sizes from `lm_config`, its transformers config.json, or the shapes), `blip2` /
    `blip2_feature_extractor` (stage 1) -> Blip2Retrieval (see the module docstring)."""
    for prefix, name in _UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in state):
            raise ConversionError(f"{prefix}* keys: {name} checkpoints are not supported; supported: blip2_opt, "
                                  f"blip2_t5, blip2 / blip2_feature_extractor")
    vision, qformer = vision_fields(state, vision_head_dim), qformer_fields(state, qformer_head_dim)
    image = image_input(state, vision["patch_size"])
    if "t5_proj.weight" in state:
        return blip2_t5.lavis_plan(state, tower_rules(), vision, qformer, image, lm_config)
    if "opt_proj.weight" in state:
        lm_table = blip2.prefixed(decoder_lm.opt_table(), "opt_model.", "language_model/")
        table = Table((*tower_rules(), *linear("opt_proj", "language_projection"), *lm_table.rules),
                      ignore=(*_IGNORE, *_tied_head(state)))
        fields = {"vision": vision, "qformer_fields": qformer, "lm": opt_fields(state, lm_num_heads)}
        return Plan(blip2.LM, fields, [image, input_spec((1, 8), "int32")], table,
                    {"library": "lavis", "model": "blip2_opt"})
    if "itm_head.weight" not in state:
        raise ConversionError("Not a supported LAVIS BLIP-2 checkpoint: neither opt_proj (blip2_opt), t5_proj "
                              "(blip2_t5) nor itm_head (blip2 / blip2_feature_extractor)")
    dropped = sorted(k for k in state if k.startswith("Qformer.cls.") or k == "temp")
    notes = [f"Dropped {dropped}: the ITG head and the ITC temperature have no place in Blip2Retrieval"
             ] if dropped else []
    table = Table((*tower_rules(),
                   rule("Qformer.bert.embeddings.word_embeddings.weight", "embeddings/word/embedding"),
                   rule("Qformer.bert.embeddings.position_embeddings.weight", "embeddings/position/embedding"),
                   *linear("vision_proj", "vision_projection"), *linear("text_proj", "text_projection"),
                   *linear("itm_head", "itm_head")), ignore=(*_IGNORE, r"Qformer\.cls\..*", "temp"))
    max_len = shape_of(state, "Qformer.bert.embeddings.position_embeddings.weight")[0]
    fields = {"vision": vision, "qformer_fields": qformer,
              "vocab_size": shape_of(state, "Qformer.bert.embeddings.word_embeddings.weight")[0], "max_len": max_len,
              "embed_dim": shape_of(state, "vision_proj.weight")[0]}
    inputs = [image, input_spec((1, max_len), "int32"), input_spec((1, max_len), "bool")]
    return Plan(blip2.RETRIEVAL, fields, inputs, table, {"library": "lavis", "model": "blip2"}, notes)
