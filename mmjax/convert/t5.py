"""T5 table: transformers `T5ForConditionalGeneration` (T5 v1.0, v1.1, Flan-T5) <-> mmjax.models.t5.T5,
both ways.

Query kernels are T5's q weights times sqrt(head_dim) (mmjax's attention divides q·k by it, T5's
does not). The word embeddings live once, in `shared.weight`: the encoder's and decoder's
`embed_tokens` copies must equal it (checked, then dropped) and are not written. The head:
untied (Flan-T5, T5 v1.1: `lm_head.weight`, no output scaling) or tied (T5 v1.0: the embeddings
after scaling by d_model**-0.5, a `lm_head.weight` must equal them). transformers 5 always ties
the head in a model built from a config and records the v1.1 case as scale_decoder_outputs=False;
both spellings are read. A gated-gelu config's dense_act_fn picks the gate's GELU: tanh (gelu_new,
transformers' default) or exact ("gelu": BLIP-2's Flan-T5, as LAVIS runs it). `prefix` serves
models that hold a T5 inside (BLIP-2: "language_model.").
"""

from __future__ import annotations

import numpy as np

from mmjax.convert.engine import (
    HEADS_IN,
    HEADS_OUT,
    LINEAR,
    ConversionError,
    Plan,
    Rule,
    Table,
    Transform,
    rule,
)
from mmjax.convert.export import Export
from mmjax.models import t5
from mmjax.pretrained import input_spec

T5_CLASS = "mmjax.models.t5.T5"
HF_ARCHITECTURES = ("T5ForConditionalGeneration",)
FEED_FORWARD = {"gated-gelu": "geglu", "relu": "relu"}
# gated-gelu's activation (dense_act_fn; transformers' default gelu_new): BLIP-2's Flan-T5 configs say "gelu"
GATED_GELU = {"gelu_new": "geglu", "gelu_pytorch_tanh": "geglu", "gelu": "geglu_exact"}
DENSE_ACT_FN = {"geglu": "gelu_new", "geglu_exact": "gelu", "relu": "relu"}
HEAD, SHARED = "lm_head.weight", "shared.weight"
COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _scale(x: np.ndarray, factor: float) -> np.ndarray:
    return x * np.asarray(factor, x.dtype)


# T5's q weight (heads*head_dim, embed) <-> mmjax query kernel (embed, heads, head_dim) * sqrt(head_dim)
UNSCALED_QUERY = Transform("t5_query", HEADS_IN.torch_shape,
                           lambda x, s: _scale(HEADS_IN.to_mmjax(x, s), np.sqrt(s[2])),
                           lambda y: HEADS_IN.to_torch(_scale(y, 1 / np.sqrt(y.shape[-1]))))


def _attention(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.q.weight", f"{dst}/query/kernel", UNSCALED_QUERY),
            rule(f"{src}.k.weight", f"{dst}/key/kernel", HEADS_IN),
            rule(f"{src}.v.weight", f"{dst}/value/kernel", HEADS_IN),
            rule(f"{src}.o.weight", f"{dst}/out/kernel", HEADS_OUT)]


def _feed_forward(src: str, dst: str, gated: bool) -> list[Rule]:
    ff = f"{src}.DenseReluDense"
    into = ([rule(f"{ff}.wi_0.weight", f"{dst}/mlp/gate/kernel", LINEAR),
             rule(f"{ff}.wi_1.weight", f"{dst}/mlp/fc1/kernel", LINEAR)] if gated
            else [rule(f"{ff}.wi.weight", f"{dst}/mlp/fc1/kernel", LINEAR)])
    return [*into, rule(f"{ff}.wo.weight", f"{dst}/mlp/fc2/kernel", LINEAR),
            rule(f"{src}.layer_norm.weight", f"{dst}/ln2/scale")]


def t5_table(mlp: str = "geglu", prefix: str = "", ignore: tuple[str, ...] = ()) -> Table:
    """transformers T5 keys (after `prefix`) <-> T5 parameters; `mlp`: the model's feed-forward kind."""
    gated = mlp != "relu"
    enc, dec = f"{prefix}encoder.block.{{i}}.layer", f"{prefix}decoder.block.{{i}}.layer"
    bias = "layer.0.SelfAttention.relative_attention_bias.weight"
    return Table((
        rule(f"{prefix}{SHARED}", "shared/embedding"),
        rule(f"{prefix}encoder.block.0.{bias}", "encoder_rel_bias/embedding"),
        rule(f"{prefix}decoder.block.0.{bias}", "decoder_rel_bias/embedding"),
        *_attention(f"{enc}.0.SelfAttention", "encoder/layer_{i}/attn"),
        rule(f"{enc}.0.layer_norm.weight", "encoder/layer_{i}/ln1/scale"),
        *_feed_forward(f"{enc}.1", "encoder/layer_{i}", gated),
        rule(f"{prefix}encoder.final_layer_norm.weight", "encoder_norm/scale"),
        *_attention(f"{dec}.0.SelfAttention", "decoder/layer_{i}/attn"),
        rule(f"{dec}.0.layer_norm.weight", "decoder/layer_{i}/ln1/scale"),
        *_attention(f"{dec}.1.EncDecAttention", "decoder/layer_{i}/cross_attn"),
        rule(f"{dec}.1.layer_norm.weight", "decoder/layer_{i}/ln_cross/scale"),
        *_feed_forward(f"{dec}.2", "decoder/layer_{i}", gated),
        rule(f"{prefix}decoder.final_layer_norm.weight", "decoder_norm/scale"),
        rule(f"{prefix}{HEAD}", "lm_head/kernel", LINEAR),
    ), ignore=(rf"{prefix}decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight", *ignore))


def tied_ignores(state: dict[str, np.ndarray], tie_embeddings: bool, prefix: str = "") -> tuple[str, ...]:
    """Ignore patterns for the copies of `shared.weight` in `state` (raises where one differs)."""
    copies = [*COPIES, HEAD] if tie_embeddings else list(COPIES)
    shared = state.get(prefix + SHARED)
    ignored = []
    for key in (prefix + c for c in copies):
        if key not in state:
            continue
        if shared is None or np.shape(state[key]) != np.shape(shared) or not np.array_equal(state[key], shared):
            why = " (tie_word_embeddings)" if key.endswith(HEAD) else ""
            raise ConversionError(f"{key} differs from {prefix}{SHARED} but T5 ties them{why}")
        ignored.append(key.replace(".", r"\."))
    return tuple(ignored)


def fields_from_hf(config: dict) -> dict:
    """T5 fields from a transformers config.json (dict)."""
    get = config.get
    feed_forward = get("feed_forward_proj", "relu")
    if feed_forward not in FEED_FORWARD:
        raise ConversionError(f"T5 feed_forward_proj {feed_forward!r} is not supported; "
                              f"supported: {list(FEED_FORWARD)}")
    mlp = FEED_FORWARD[feed_forward]
    if mlp == "geglu":
        act = get("dense_act_fn") or "gelu_new"
        if act not in GATED_GELU:
            raise ConversionError(f"T5 gated-gelu with dense_act_fn {act!r} is not supported; supported: "
                                  f"{list(GATED_GELU)}")
        mlp = GATED_GELU[act]
    tied = get("scale_decoder_outputs", get("tie_word_embeddings", True))
    return {"width": get("d_model", 512), "encoder_depth": get("num_layers", 6),
            "decoder_depth": get("num_decoder_layers") or get("num_layers", 6), "num_heads": get("num_heads", 8),
            "head_dim": get("d_kv", 64), "mlp_dim": get("d_ff", 2048), "vocab_size": get("vocab_size", 32128),
            "num_buckets": get("relative_attention_num_buckets", 32),
            "max_distance": get("relative_attention_max_distance", 128), "mlp": mlp,
            "tie_embeddings": bool(tied), "norm_eps": get("layer_norm_epsilon", 1e-6)}


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    arch = (config.get("architectures") or [""])[0]
    if arch not in HF_ARCHITECTURES:
        raise ConversionError(f"Not a T5 architecture: {arch!r}; supported: {HF_ARCHITECTURES}")
    fields = fields_from_hf(config)
    inputs = [input_spec((1, 8), "int32"), input_spec((1, 4), "int32")]
    table = t5_table(fields["mlp"], ignore=tied_ignores(state, fields["tie_embeddings"]))
    return Plan(T5_CLASS, fields, inputs, table,
                {"library": "hf", "architecture": arch, "config": config})


def hf_config(fields: dict, base: dict | None = None) -> dict:
    """transformers config.json for a T5's fields (over `base`, the imported config)."""
    model = t5.T5(**fields)
    arch = model.arch()
    out = dict(base or {})
    out.update({"architectures": list(HF_ARCHITECTURES), "model_type": "t5", "d_model": arch["width"],
                "num_layers": arch["encoder_depth"], "num_decoder_layers": arch["decoder_depth"],
                "num_heads": arch["num_heads"], "d_kv": arch["head_dim"], "d_ff": arch["mlp_dim"],
                "vocab_size": arch["vocab_size"], "relative_attention_num_buckets": model.num_buckets,
                "relative_attention_max_distance": model.max_distance, "layer_norm_epsilon": model.norm_eps,
                "feed_forward_proj": "relu" if model.mlp == "relu" else "gated-gelu",
                "dense_act_fn": DENSE_ACT_FN[model.mlp], "is_gated_act": model.mlp != "relu",
                "tie_word_embeddings": model.tie_embeddings, "scale_decoder_outputs": model.tie_embeddings,
                "dropout_rate": model.dropout, "is_encoder_decoder": True, "decoder_start_token_id": 0})
    out.setdefault("pad_token_id", 0)
    out.setdefault("eos_token_id", 1)
    return out


def hf_export(config: dict) -> Export:
    """The table and config.json that write a T5 model directory for transformers."""
    fields = config["fields"]
    source = config.get("source") or {}
    base = source.get("config") if source.get("library") == "hf" else None
    fields = {k: v for k, v in fields.items() if k not in ("scan", "remat_policy")}
    return Export(t5_table(fields.get("mlp", "geglu")), hf_config(fields, base))
