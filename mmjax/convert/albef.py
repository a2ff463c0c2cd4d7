"""ALBEF tables for the official checkpoints (salesforce/ALBEF: ALBEF_4M.pth, ALBEF.pth; the
state dict under their "model" key), both ways.

Official key names (models/model_pretrain.py, models/vit.py, models/xbert.py):

    visual_encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1, attn.qkv, attn.proj,
        norm2, mlp.fc1, mlp.fc2}.*, norm.*}                      -> visual_encoder/...  (mmjax ViT)
    text_encoder.bert.embeddings.*, text_encoder.bert.encoder.layer.N.{attention, crossattention
        (fusion layers only), intermediate, output}.*           -> text_encoder/...    (mmjax Bert)
    text_encoder.cls.predictions.{transform.*, bias}             -> text_encoder/lm_head/...
    vision_proj.*, text_proj.*, itm_head.*, temp                 -> the same names
    visual_encoder_m.*, text_encoder_m.*, vision_proj_m.*, text_proj_m.*   the momentum model
    image_queue, text_queue (embed_dim, Q), queue_ptr (1,)      the queues

The MLM decoder is tied to the word embeddings (`cls.predictions.decoder.weight` / `.bias` repeat
`word_embeddings.weight` / `cls.predictions.bias`): checked equal on import, written back on export,
as is the `embeddings.position_ids` buffer, so an official state dict round-trips exactly.

Decision on the momentum model and the queues: they are train state, not model parameters.
`mmjax-convert --source albef` imports the online model and skips them, saying so in its notes;
`to_train_state` / `from_train_state` convert the whole pretraining state (parameters, momentum
copies as "ema_params", queues as "queue") for mmjax.tasks.albef, every key accounted for. ALBEF
keeps no momentum copy of itm_head and temp: `to_train_state` copies the online ones (as the
task's EMA starts), `from_train_state` leaves them out.

The architecture is read from the tensor shapes; the head counts are not stored, so they are
taken as width / 64 (ViT-B/16 and BERT-base: 12), or given explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mmjax.convert import bert as bert_rules
from mmjax.convert.engine import (
    ConversionError,
    Plan,
    Rule,
    Table,
    Transform,
    conv,
    flatten,
    fused_qkv,
    heads_out,
    linear,
    norm,
    rule,
    to_mmjax,
    to_torch,
    unflatten,
)
from mmjax.convert.export import Export
from mmjax.pretrained import input_spec

ALBEF = "mmjax.models.albef.Albef"
HEAD = "text_encoder.cls.predictions"
POSITION_IDS = "text_encoder.bert.embeddings.position_ids"
MOMENTUM_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")
NOT_IN_MOMENTUM = ("itm_head", "temp")      # ALBEF has no momentum copy of these
# queue_ptr: a (1,) int64 buffer <-> the task's () int32 pointer.
POINTER = Transform("pointer", lambda s: (1,), lambda x, s: x.reshape(s),
                    lambda y: np.asarray(y).reshape(1).astype(np.int64))
# image_queue / text_queue (embed_dim, Q) <-> the task's (Q, embed_dim) rows.
TRANSPOSE = Transform("transpose", lambda s: s[::-1], lambda x, s: x.T, lambda y: y.T)


def vision_rules(src: str, dst: str) -> list[Rule]:
    """ALBEF's VisionTransformer (timm-style DeiT, no head) <-> mmjax ViT with pool="none"."""
    block, to = f"{src}.blocks.{{i}}", f"{dst}/encoder/layer_{{i}}"
    return [*conv(f"{src}.patch_embed.proj", f"{dst}/embedding/conv"),
            rule(f"{src}.cls_token", f"{dst}/cls"),
            rule(f"{src}.pos_embed", f"{dst}/posemb/pos_embedding"),
            *norm(f"{block}.norm1", f"{to}/ln1"),
            *fused_qkv(f"{block}.attn.qkv.weight", f"{block}.attn.qkv.bias", f"{to}/attn"),
            *heads_out(f"{block}.attn.proj", f"{to}/attn/out"),
            *norm(f"{block}.norm2", f"{to}/ln2"),
            *linear(f"{block}.mlp.fc1", f"{to}/mlp/fc1"),
            *linear(f"{block}.mlp.fc2", f"{to}/mlp/fc2"),
            *norm(f"{src}.norm", f"{dst}/norm")]


def text_rules(src: str, dst: str) -> list[Rule]:
    """ALBEF's xbert BertForMaskedLM (`src`.bert.*, `src`.cls.predictions.*) <-> mmjax Bert with lm_head."""
    return [*bert_rules.embeddings_rules(f"{src}.bert.embeddings", f"{dst}/embeddings"),
            *bert_rules.layer_rules(f"{src}.bert.encoder.layer.{{i}}", f"{dst}/encoder/layer_{{i}}"),
            *bert_rules.lm_head_rules(f"{src}.cls.predictions", f"{dst}/lm_head")]


def _towers(suffix: str, prefix: str) -> list[Rule]:
    """The four modules ALBEF keeps a momentum copy of (`suffix` "_m"), under mmjax `prefix`."""
    return [*vision_rules(f"visual_encoder{suffix}", f"{prefix}visual_encoder"),
            *text_rules(f"text_encoder{suffix}", f"{prefix}text_encoder"),
            *linear(f"vision_proj{suffix}", f"{prefix}vision_proj"),
            *linear(f"text_proj{suffix}", f"{prefix}text_proj")]


def _heads(prefix: str) -> list[Rule]:
    return [*linear("itm_head", f"{prefix}itm_head"), rule("temp", f"{prefix}temp")]


_IGNORE = (r".*\.position_ids", r".*\.cls\.predictions\.decoder\.(weight|bias)")
MODEL_TABLE = Table((*_towers("", ""), *_heads("")), ignore=_IGNORE)
TRAIN_STATE_TABLE = Table((
    *_towers("", "params/"), *_heads("params/"), *_towers("_m", "ema_params/"),
    rule("image_queue", "queue/image", TRANSPOSE),
    rule("text_queue", "queue/text", TRANSPOSE),
    rule("queue_ptr", "queue/pointer", POINTER),
), ignore=_IGNORE)


def check_tied(state: Mapping[str, np.ndarray], prefixes: tuple[str, ...] = ("text_encoder", "text_encoder_m")) -> None:
    """Raises unless every written-out MLM decoder equals the parameters it is tied to."""
    for prefix in prefixes:
        head = f"{prefix}.cls.predictions"
        for key, source in ((f"{head}.decoder.weight", f"{prefix}.bert.embeddings.word_embeddings.weight"),
                            (f"{head}.decoder.bias", f"{head}.bias")):
            if key in state and (source not in state or not np.array_equal(state[key], state[source])):
                raise ConversionError(f"{key} differs from {source}: an untied MLM decoder is not supported "
                                      "(mmjax's MLM head scores against the word embeddings)")


def _count(state: Mapping[str, np.ndarray], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.fullmatch(k))})


def fields_from_state(state: Mapping[str, np.ndarray], vision_heads: int | None = None,
                      text_heads: int | None = None) -> dict:
    """The Albef fields an official state dict was made with (head counts: width / 64 unless given)."""
    need = ["visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
            "visual_encoder.blocks.0.mlp.fc1.weight", "text_encoder.bert.embeddings.word_embeddings.weight",
            "text_encoder.bert.embeddings.position_embeddings.weight",
            "text_encoder.bert.embeddings.token_type_embeddings.weight",
            "text_encoder.bert.encoder.layer.0.intermediate.dense.weight", "vision_proj.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"Not an ALBEF checkpoint: missing {missing}")
    shape = lambda k: np.shape(state[k])  # noqa: E731
    v_width, patch = shape("visual_encoder.cls_token")[-1], shape("visual_encoder.patch_embed.proj.weight")[-1]
    grid = int(round((shape("visual_encoder.pos_embed")[1] - 1) ** 0.5))
    vocab, t_width = shape("text_encoder.bert.embeddings.word_embeddings.weight")
    depth = _count(state, r"text_encoder\.bert\.encoder\.layer\.(\d+)\..*")
    fusion = [int(m.group(1)) for k in state
              if (m := re.fullmatch(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.crossattention\..*", k))]
    if not fusion:
        raise ConversionError("Not an ALBEF checkpoint: its text encoder has no cross-attention (fusion) layers")
    vision = {"variant": None, "width": v_width, "depth": _count(state, r"visual_encoder\.blocks\.(\d+)\..*"),
              "num_heads": vision_heads or v_width // 64, "patch_size": patch,
              "mlp_dim": shape("visual_encoder.blocks.0.mlp.fc1.weight")[0]}
    text = {"variant": None, "width": t_width, "depth": depth, "num_heads": text_heads or t_width // 64,
            "mlp_dim": shape("text_encoder.bert.encoder.layer.0.intermediate.dense.weight")[0], "vocab_size": vocab,
            "max_len": shape("text_encoder.bert.embeddings.position_embeddings.weight")[0],
            "type_vocab_size": shape("text_encoder.bert.embeddings.token_type_embeddings.weight")[0],
            "cross_attention_from": min(fusion)}
    return {"vision": vision, "text": text, "embed_dim": shape("vision_proj.weight")[0], "image_size": grid * patch}


def from_official(state: Mapping[str, np.ndarray]) -> Plan:
    """`mmjax-convert --source albef`: the online model of an official checkpoint; the momentum
    model and the queues are skipped (listed in the notes; `to_train_state` reads them)."""
    check_tied(state, ("text_encoder",))
    fields = fields_from_state(state)
    size = fields.pop("image_size")
    inputs = [input_spec((1, size, size, 3)), input_spec((1, fields["text"]["max_len"]), "int32")]
    momentum = sorted(k for k in state if k.startswith(MOMENTUM_PREFIXES))
    queues = [k for k in QUEUE_KEYS if k in state]
    notes, ignore = [], list(MODEL_TABLE.ignore)
    if momentum or queues:
        notes.append(f"Skipped ALBEF's pretraining state ({len(momentum)} momentum-model keys *_m.*, queues "
                     f"{queues}): mmjax.convert.albef.to_train_state converts them for the albef task")
        ignore += [r"(visual_encoder|text_encoder|vision_proj|text_proj)_m\..*", *(re.escape(k) for k in queues)]
    table = Table(MODEL_TABLE.rules, ignore=tuple(ignore))
    return Plan(ALBEF, fields, inputs, table, {"library": "albef"}, notes)


def _tied_copies(state: dict[str, np.ndarray], prefixes: tuple[str, ...], max_len: int) -> dict[str, np.ndarray]:
    """The official state dict's repeated tensors: the tied MLM decoder and the position_ids buffer."""
    for prefix in prefixes:
        head = f"{prefix}.cls.predictions"
        state[f"{head}.decoder.weight"] = state[f"{prefix}.bert.embeddings.word_embeddings.weight"].copy()
        state[f"{head}.decoder.bias"] = state[f"{head}.bias"].copy()
        state[f"{prefix}.bert.embeddings.position_ids"] = np.arange(max_len, dtype=np.int64)[None]
    return state


class OfficialExport(Export):
    """An Export that also writes the tied decoder copies and position_ids, as the official files hold them."""

    def state_dict(self, params, what):
        state = super().state_dict(params, what)
        max_len = state["text_encoder.bert.embeddings.position_embeddings.weight"].shape[0]
        return _tied_copies(state, ("text_encoder",), max_len)


def official_export(config: dict) -> Export:
    """`mmjax-convert --to albef`: the online model under the official key names (load it into
    ALBEF with load_state_dict(..., strict=False): the momentum model and queues are not written)."""
    return OfficialExport(MODEL_TABLE, None, notes=(
        "Wrote the online model only: ALBEF's momentum copies and queues are pretraining state "
        "(mmjax.convert.albef.from_train_state writes them from a training run's state)",))


def to_train_state(state: Mapping[str, np.ndarray], abstract_params: Mapping) -> dict:
    """{"params", "ema_params", "queue"} (nested numpy) of mmjax.tasks.albef from a full official
    pretraining state dict; `abstract_params`: the task's (unboxed) parameter shapes, e.g.
    `jax.eval_shape` of its init. Raises listing every missing, unexpected or mis-shaped key."""
    check_tied(state)
    params = flatten(dict(abstract_params))
    expected = {f"params/{p}": v for p, v in params.items()}
    expected.update({f"ema_params/{p}": v for p, v in params.items() if p.split("/")[0] not in NOT_IN_MOMENTUM})
    embed_dim = np.shape(state["image_queue"])[0] if "image_queue" in state else params["vision_proj/bias"].shape[0]
    size = np.shape(state["image_queue"])[1] if "image_queue" in state else 0
    expected.update({"queue/image": np.zeros((size, embed_dim), np.float32),
                     "queue/text": np.zeros((size, embed_dim), np.float32),
                     "queue/pointer": np.zeros((), np.int32)})
    flat = to_mmjax(state, TRAIN_STATE_TABLE, expected, what="ALBEF pretraining state dict")
    for p in params:
        if p.split("/")[0] in NOT_IN_MOMENTUM:
            flat[f"ema_params/{p}"] = flat[f"params/{p}"].copy()
    return unflatten(flat)


def from_train_state(params: Mapping, ema_params: Mapping | None = None, queue: Mapping | None = None
                     ) -> dict[str, np.ndarray]:
    """The official state dict of an mmjax ALBEF (unscanned, unboxed): the online model, plus the
    momentum model and the queues when given (ALBEF's full pretraining state)."""
    flat = {f"params/{p}": np.asarray(v) for p, v in flatten(dict(params)).items()}
    prefixes = ("text_encoder",)
    if ema_params is not None:
        flat.update({f"ema_params/{p}": np.asarray(v) for p, v in flatten(dict(ema_params)).items()
                     if p.split("/")[0] not in NOT_IN_MOMENTUM})
        prefixes += ("text_encoder_m",)
    if queue is not None:
        flat.update({f"queue/{k}": np.asarray(v) for k, v in queue.items()})
    state = to_torch(flat, TRAIN_STATE_TABLE, what="ALBEF state dict")
    max_len = state["text_encoder.bert.embeddings.position_embeddings.weight"].shape[0]
    return _tied_copies(state, prefixes, max_len)
