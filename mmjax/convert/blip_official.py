"""BLIP tables for the official checkpoints (salesforce/BLIP `.pth` files, the state dict under their
"model" key), both ways: `mmjax-convert --source blip` / `--to blip`.

Official key names (models/vit.py, models/med.py, models/blip*.py):

    visual_encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1, attn.qkv, attn.proj,
        norm2, mlp.fc1, mlp.fc2}.*, norm.*}          timm-style ViT, LayerNorm eps 1e-6 -> vision_model/...
    text_encoder.{embeddings, encoder.layer.N.{attention, crossattention, intermediate, output}}.*
        med's BertModel (no `bert.` prefix, no pooler, no token types)              -> text_encoder/...
    text_decoder.bert.*, text_decoder.cls.predictions.*   med's BertLMHeadModel      -> text_decoder/...
    vision_proj, text_proj, itm_head, temp                                           -> the same names

Which file is which model (read from its keys):
    model_base_retrieval_*.pth, model_*_itm  (text_encoder + itm_head)   -> BlipRetrieval (temp if stored)
    model_*_caption*.pth                      (text_decoder only)         -> BlipCaptioner
    model_*_vqa*.pth                          (text_encoder + text_decoder) -> BlipQuestionAnswering
    model_base.pth / model_large.pth pretraining (all of them)            -> BlipPretrain
The pretraining decoder shares every weight but its self-attention with the text encoder
(blip_pretrain.py's tie_encoder_decoder_weights(..., '/attention')); the file stores both copies:
they are checked equal on import and written back on export. So are the tied LM decoder
(`cls.predictions.decoder.*` repeat the word embeddings / `cls.predictions.bias`) and the
`embeddings.position_ids` buffers, so an official state dict round-trips exactly.

The momentum model (`*_m.*`) and the queues (image_queue, text_queue, idx_queue, ptr_queue /
queue_ptr) of the retrieval and pretraining files are train state, not model parameters: skipped
on import with a note, not written on export (load the export with strict=False to fine-tune).

The architecture is read from the tensor shapes; the head counts are not stored, so they are taken
as width / 64 (ViT-B and BERT-base: 12, ViT-L: 16).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from mmjax.convert import albef
from mmjax.convert import bert as bert_rules
from mmjax.convert.blip import CAPTIONER, QUESTION_ANSWERING, RETRIEVAL, text_rules
from mmjax.convert.engine import ConversionError, Plan, Rule, Table, linear, require, rule
from mmjax.convert.export import Export
from mmjax.models import bert, blip, vit
from mmjax.pretrained import input_spec

PRETRAIN = "mmjax.models.blip_pretrain.BlipPretrain"
ENCODER, DECODER, HEAD = "text_encoder", "text_decoder.bert", "text_decoder.cls.predictions"
MOMENTUM = r"(visual_encoder|text_encoder|vision_proj|text_proj)_m\..*"
QUEUES = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
# The pretraining decoder's own keys (not shared with the encoder): self-attention and its norm.
DECODER_OWN = re.compile(re.escape(DECODER) + r"\.encoder\.layer\.\d+\.attention\..*")
SHARED_COPY = re.escape(DECODER) + r"\.(?!encoder\.layer\.\d+\.attention\.).*"
_IGNORE = (r".*\.position_ids", re.escape(HEAD) + r"\.decoder\.(weight|bias)")


def _vision() -> list[Rule]:
    return albef.vision_rules("visual_encoder", "vision_model")


def _decoder(own_only: bool) -> list[Rule]:
    """The decoder with its LM head; own_only: the pretraining decoder's self-attention alone."""
    if own_only:
        layer, to = f"{DECODER}.encoder.layer.{{i}}", "text_decoder/encoder/layer_{i}"
        text = [*bert_rules.attention_rules(f"{layer}.attention", f"{to}/attn"),
                *bert_rules.layer_norm(f"{layer}.attention.output.LayerNorm", f"{to}/ln1")]
    else:
        text = text_rules(DECODER, "text_decoder")
    return [*text, *bert_rules.lm_head_rules(HEAD, "text_decoder/lm_head")]


_HEADS = (*linear("vision_proj", "vision_proj"), *linear("text_proj", "text_proj"), *linear("itm_head", "itm_head"))
TABLES = {
    RETRIEVAL: Table((*_vision(), *text_rules(ENCODER, ENCODER), *_HEADS, rule("temp", "temp")), ignore=_IGNORE),
    CAPTIONER: Table((*_vision(), *_decoder(False)), ignore=_IGNORE),
    QUESTION_ANSWERING: Table((*_vision(), *text_rules(ENCODER, ENCODER), *_decoder(False)), ignore=_IGNORE),
    PRETRAIN: Table((*_vision(), *text_rules(ENCODER, ENCODER), *_decoder(True), *_HEADS, rule("temp", "temp")),
                    ignore=(*_IGNORE, SHARED_COPY)),   # the decoder's copies of encoder weights: checked equal
}


def model_class(state: Mapping[str, np.ndarray]) -> str:
    """The mmjax class an official state dict holds, from its top-level modules."""
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    if not has("visual_encoder."):
        raise ConversionError("Not a BLIP checkpoint: no visual_encoder.* keys")
    encoder, decoder, itm = has(f"{ENCODER}."), has("text_decoder."), has("itm_head.")
    if encoder and itm:
        return PRETRAIN if decoder else RETRIEVAL
    if encoder and decoder:
        return QUESTION_ANSWERING
    if decoder:
        return CAPTIONER
    raise ConversionError("Unsupported BLIP checkpoint: a vision and text encoder without ITM head or decoder "
                          "(BLIP_Base, a feature extractor) has no mmjax model; supported: retrieval / ITM, "
                          "captioning, VQA and pretraining checkpoints")


def _check_tied(state: Mapping[str, np.ndarray], pairs: dict[str, str], what: str) -> None:
    for key, source in pairs.items():
        if key in state and (source not in state or not np.array_equal(state[key], state[source])):
            raise ConversionError(f"{key} differs from {source}: {what}")


def _tied_head(word: str) -> dict[str, str]:
    return {f"{HEAD}.decoder.weight": word, f"{HEAD}.decoder.bias": f"{HEAD}.bias"}


def _shared(key: str) -> str | None:
    """The text-encoder key a pretraining decoder key repeats (None: the decoder's own)."""
    if not key.startswith(DECODER + ".") or DECODER_OWN.fullmatch(key) or key.endswith(".position_ids"):
        return None
    return ENCODER + key[len(DECODER):]


def _fields(state: Mapping[str, np.ndarray], text: str) -> dict:
    need = ["visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
            "visual_encoder.blocks.0.mlp.fc1.weight", f"{text}.embeddings.word_embeddings.weight",
            f"{text}.embeddings.position_embeddings.weight", f"{text}.encoder.layer.0.intermediate.dense.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"Not a BLIP checkpoint: missing {missing}")
    shape = lambda k: np.shape(state[k])  # noqa: E731
    count = lambda p: len({m.group(1) for k in state if (m := re.fullmatch(p, k))})  # noqa: E731
    v_width, patch = shape("visual_encoder.cls_token")[-1], shape("visual_encoder.patch_embed.proj.weight")[-1]
    vocab, t_width = shape(f"{text}.embeddings.word_embeddings.weight")
    vision = {"variant": None, "width": v_width, "depth": count(r"visual_encoder\.blocks\.(\d+)\..*"),
              "num_heads": v_width // 64, "patch_size": patch, "ln_eps": 1e-6, "act": "gelu",
              "mlp_dim": shape("visual_encoder.blocks.0.mlp.fc1.weight")[0]}
    text_fields = {"variant": None, "width": t_width, "depth": count(re.escape(text) + r"\.encoder\.layer\.(\d+)\..*"),
                   "num_heads": t_width // 64, "mlp_dim": shape(f"{text}.encoder.layer.0.intermediate.dense.weight")[0],
                   "vocab_size": vocab, "max_len": shape(f"{text}.embeddings.position_embeddings.weight")[0],
                   "ln_eps": 1e-12, "act": "gelu", "dropout": 0.0}
    grid = int(round((shape("visual_encoder.pos_embed")[1] - 1) ** 0.5))
    return {"vision": vision, "text": text_fields, "image_size": grid * patch}


def from_official(state: Mapping[str, np.ndarray]) -> Plan:
    """`mmjax-convert --source blip`: the model of an official checkpoint (momentum model and queues skipped)."""
    cls = model_class(state)
    _check_tied(state, _tied_head(f"{DECODER}.embeddings.word_embeddings.weight"),
                "an untied LM decoder is not supported (mmjax's LM head scores against the word embeddings)")
    if cls == PRETRAIN:
        _check_tied(state, {k: s for k in state if (s := _shared(k))},
                    "BLIP pretraining shares every decoder weight but its self-attention with the text encoder")
    fields = _fields(state, DECODER if cls == CAPTIONER else ENCODER)
    size, length = fields.pop("image_size"), fields["text"]["max_len"]
    inputs = [input_spec((1, size, size, 3)), input_spec((1, length), "int32"), input_spec((1, length), "bool")]
    if cls in (RETRIEVAL, PRETRAIN):
        fields["embed_dim"] = np.shape(state["vision_proj.weight"])[0] if "vision_proj.weight" in state else 256
        fields["learn_temperature"] = "temp" in state or cls == PRETRAIN
    if cls == QUESTION_ANSWERING:
        inputs += [input_spec((1, length), "int32"), input_spec((1, length), "bool")]
    momentum = sorted(k for k in state if re.fullmatch(MOMENTUM, k))
    queues = [k for k in QUEUES if k in state]
    notes, ignore = [], list(TABLES[cls].ignore)
    if momentum or queues:
        notes.append(f"Skipped BLIP's training state: {len(momentum)} momentum-model keys (*_m.*) and the queues "
                     f"{queues}")
        ignore += [MOMENTUM, *(re.escape(k) for k in queues)]
    return Plan(cls, fields, inputs, Table(TABLES[cls].rules, ignore=tuple(ignore)), {"library": "blip"}, notes)


@dataclasses.dataclass(frozen=True)
class OfficialExport(Export):
    """Also writes what the official files repeat: position_ids buffers, the tied LM decoder and
    (`shared_decoder`: pretraining) the decoder's copies of the encoder weights it shares."""

    shared_decoder: bool = False

    def state_dict(self, params, what):
        state = super().state_dict(params, what)
        if self.shared_decoder:
            for key in [k for k in state if k.startswith(ENCODER + ".")]:
                copy = DECODER + key[len(ENCODER):]
                if not DECODER_OWN.fullmatch(copy):
                    state[copy] = state[key].copy()
        for prefix in (ENCODER, DECODER):
            positions = f"{prefix}.embeddings.position_embeddings.weight"
            if positions in state:
                state[f"{prefix}.embeddings.position_ids"] = np.arange(state[positions].shape[0], dtype=np.int64)[None]
        if f"{HEAD}.bias" in state:
            for key, source in _tied_head(f"{DECODER}.embeddings.word_embeddings.weight").items():
                state[key] = state[source].copy()
        return state


def _check_expressible(fields: dict) -> None:
    """Raises unless the official code computes what the model does (its towers are fixed: timm ViT
    with LayerNorm eps 1e-6, med BERT without token types, GELU, 64-wide heads as the import assumes)."""
    vision = {**blip.VISION_DEFAULTS, **(fields.get("vision") or {})}
    text = {**blip.TEXT_DEFAULTS, **(fields.get("text") or {})}
    require(vision, "salesforce/BLIP vision tower", ln_eps=1e-6, act="gelu", posemb="learn", pre_norm=False,
            fc_norm=False, patch_bias=True, qkv_bias=True, layer_scale=None, conv_stem=[], in_channels=3,
            class_token=True, num_classes=None, representation_size=None)
    require(text, "salesforce/BLIP text tower", block=None, type_vocab_size=0, ln_eps=1e-12, act="gelu")
    v = vit.resolve_arch(vit.ViT(**{k: vision.get(k) for k in ("variant", *vit.ARCH_FIELDS)}))
    t = bert.resolve_arch(text.get("variant"), **{k: text.get(k) for k in bert.ARCH_FIELDS})
    for name, arch in (("vision", v), ("text", t)):
        if arch["num_heads"] * 64 != arch["width"]:
            raise ConversionError(f"This model cannot be written as an official BLIP checkpoint: its {name} tower has "
                                  f"{arch['num_heads']} heads of width {arch['width']}, BLIP's are 64 wide (the "
                                  "import reads the head count as width / 64)")


def official_export(config: dict) -> Export:
    """`mmjax-convert --to blip`: the model under the official key names (the momentum model and
    the queues are not written: load into BLIP with load_state_dict(..., strict=False))."""
    cls = config["class"]
    _check_expressible(config["fields"])
    notes = ()
    if cls in (RETRIEVAL, PRETRAIN):
        notes = ("Wrote the model only: BLIP's momentum copies and queues are training state",)
    return OfficialExport(TABLES[cls], None, notes=notes, shared_decoder=cls == PRETRAIN)
