"""BERT tables: transformers `BertModel`, `BertForMaskedLM` and `BertLMHeadModel` (a decoder,
optionally with cross-attention: `bert.encoder.layer.N.crossattention.*`), both ways.

The MLM / LM decoder is tied to the word embeddings (transformers' default): its weight and bias
(`cls.predictions.decoder.*`) repeat `word_embeddings.weight` and `cls.predictions.bias`, so they
are checked equal on import and not written on export. Google's original checkpoints (those of
bert-base-uncased) spell LayerNorm parameters gamma / beta and carry the pooler and the
next-sentence head (`cls.seq_relationship`) beside the MLM head: gamma / beta are read, the
next-sentence head is left out with a note. `layer_rules` and friends serve the tables of
families built on BERT (ALBEF, BLIP, ViLT).
"""

from __future__ import annotations

import numpy as np

from mmjax.convert.engine import (
    ConversionError,
    Plan,
    Rule,
    Table,
    attention,
    linear,
    norm,
    require,
    rule,
)
from mmjax.convert.export import Export
from mmjax.convert.vit import hf_activation, hf_activation_name
from mmjax.models import bert
from mmjax.pretrained import input_spec

BERT = "mmjax.models.bert.Bert"
HF_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertLMHeadModel")
HEAD = "cls.predictions"
TIED = {f"{HEAD}.decoder.weight": "embeddings.word_embeddings.weight", f"{HEAD}.decoder.bias": f"{HEAD}.bias"}
NEXT_SENTENCE = r"cls\.seq_relationship\..*"


def layer_norm(src: str, dst: str) -> list[Rule]:
    """A LayerNorm; Google's original spelling gamma / beta is read too."""
    return [*norm(src, dst), rule(f"{src}.gamma", f"{dst}/scale", export=False),
            rule(f"{src}.beta", f"{dst}/bias", export=False)]


def attention_rules(src: str, dst: str) -> list[Rule]:
    """BertAttention (`src`.self.{query,key,value}, `src`.output.dense) <-> an mmjax Attention."""
    return attention(*(f"{src}.self.{n}" for n in ("query", "key", "value")), f"{src}.output.dense", dst)


def layer_rules(src: str, dst: str) -> list[Rule]:
    """One BertLayer (e.g. `bert.encoder.layer.{i}`) <-> one post-LN mmjax Block (`encoder/layer_{i}`)."""
    return [*attention_rules(f"{src}.attention", f"{dst}/attn"),
            *layer_norm(f"{src}.attention.output.LayerNorm", f"{dst}/ln1"),
            *attention_rules(f"{src}.crossattention", f"{dst}/cross_attn"),
            *layer_norm(f"{src}.crossattention.output.LayerNorm", f"{dst}/ln_cross"),
            *linear(f"{src}.intermediate.dense", f"{dst}/mlp/fc1"),
            *linear(f"{src}.output.dense", f"{dst}/mlp/fc2"),
            *layer_norm(f"{src}.output.LayerNorm", f"{dst}/ln2")]


def embeddings_rules(src: str, dst: str) -> list[Rule]:
    """BertEmbeddings (`bert.embeddings`) <-> mmjax TextEmbeddings (`embeddings`)."""
    return [rule(f"{src}.word_embeddings.weight", f"{dst}/word/embedding"),
            rule(f"{src}.position_embeddings.weight", f"{dst}/position/embedding"),
            rule(f"{src}.token_type_embeddings.weight", f"{dst}/token_type/embedding"),
            *layer_norm(f"{src}.LayerNorm", f"{dst}/ln")]


def lm_head_rules(src: str, dst: str) -> list[Rule]:
    """BertLMPredictionHead (`cls.predictions`, decoder tied) <-> mmjax LMHead (`lm_head`)."""
    return [*linear(f"{src}.transform.dense", f"{dst}/dense"),
            *layer_norm(f"{src}.transform.LayerNorm", f"{dst}/ln"),
            rule(f"{src}.bias", f"{dst}/bias")]


def hf_table(prefix: str, ignore: tuple[str, ...] = ()) -> Table:
    """`prefix`: "bert." inside the MLM / LM models, "" for a bare BertModel."""
    return Table((
        *embeddings_rules(f"{prefix}embeddings", "embeddings"),
        *layer_rules(f"{prefix}encoder.layer.{{i}}", "encoder/layer_{i}"),
        *linear(f"{prefix}pooler.dense", "pooler"),
        *lm_head_rules(HEAD, "lm_head"),
    ), ignore=(r".*position_ids", r".*token_type_ids", *ignore))


def _tied_keys(state: dict[str, np.ndarray], prefix: str) -> tuple[str, ...]:
    """The decoder keys that repeat tied parameters (to be skipped); raises for an untied decoder."""
    skipped = []
    for key, source in TIED.items():
        source = f"{prefix}{source}" if source.startswith("embeddings") else source
        if key not in state:
            continue
        if source not in state:           # older files keep only the decoder's copy of the bias
            raise ConversionError(f"The checkpoint has {key} but not {source}, which it is tied to")
        if np.shape(state[key]) != np.shape(state[source]) or not np.array_equal(state[key], state[source]):
            raise ConversionError(f"{key} differs from {source}: an untied MLM decoder is not supported "
                                  "(mmjax's LM head scores against the word embeddings)")
        skipped.append(key.replace(".", r"\."))
    return tuple(skipped)


def from_hf(config: dict, state: dict[str, np.ndarray]) -> Plan:
    arch = (config.get("architectures") or ["BertModel"])[0]
    get = config.get
    if get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"BERT position_embedding_type {get('position_embedding_type')!r} is not supported "
                              "(absolute only)")
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    cross = bool(get("add_cross_attention", False))
    fields = {"width": get("hidden_size", 768), "depth": get("num_hidden_layers", 12),
              "num_heads": get("num_attention_heads", 12), "mlp_dim": get("intermediate_size", 3072),
              "vocab_size": get("vocab_size", 30522), "max_len": get("max_position_embeddings", 512),
              "type_vocab_size": get("type_vocab_size", 2), "ln_eps": get("layer_norm_eps", 1e-12),
              "act": hf_activation(get("hidden_act", "gelu")), "dropout": get("hidden_dropout_prob", 0.1),
              "causal": bool(get("is_decoder", False)), "cross_attention": cross,
              "pool": "pooler" if f"{prefix}pooler.dense.weight" in state else "cls",
              "lm_head": arch in ("BertForMaskedLM", "BertLMHeadModel") or f"{HEAD}.bias" in state}
    notes, ignore = [], _tied_keys(state, prefix)
    if any(k.startswith("cls.seq_relationship.") for k in state):
        notes.append("Left out the next-sentence-prediction head (cls.seq_relationship): mmjax's Bert has none")
        ignore += (NEXT_SENTENCE,)
    inputs = [input_spec((1, fields["max_len"]), "int32")]
    if cross:
        context_width = state[f"{prefix}encoder.layer.0.crossattention.self.key.weight"].shape[1]
        inputs += [input_spec((1, fields["max_len"]), "bool"), input_spec((1, 1, context_width))]
    return Plan(BERT, fields, inputs, hf_table(prefix, ignore), {"library": "hf", "architecture": arch,
                                                                  "config": config}, notes)


def hf_export(config: dict) -> Export:
    """The table and config.json that write this model directory for transformers: BertModel
    (with BERT's pooler), BertForMaskedLM (bidirectional, LM head) or BertLMHeadModel (causal, LM
    head); a pooler beside an LM head has no place there and is left out."""
    fields = config["fields"]
    require(fields, "transformers BERT", block=None, cross_attention_from=0, cross_attention_every=1)
    if fields.get("cross_attention") and not fields.get("causal"):
        raise ConversionError("transformers' BERT adds cross-attention to decoders only (is_decoder=True); this "
                              "model is bidirectional with cross-attention")
    if fields.get("type_vocab_size", 2) < 1:
        raise ConversionError("transformers' BERT needs token-type embeddings (type_vocab_size >= 1)")
    if fields.get("cross_attention") and config["inputs"][2]["shape"][-1] != fields["width"]:
        raise ConversionError("transformers' BERT cross-attends to states of its own width; this model's context "
                              f"is {config['inputs'][2]['shape'][-1]} wide")
    pooler, lm_head = fields.get("pool") == "pooler", fields.get("lm_head", False)
    if lm_head:
        arch = "BertLMHeadModel" if fields.get("causal") else "BertForMaskedLM"
    elif pooler:
        arch = "BertModel"
    else:
        raise ConversionError("transformers' BertModel has a pooler: export a model with pool='pooler' or an LM head")
    source = config["source"]
    hf_config = dict(source["config"]) if source.get("library") == "hf" else {}
    shape = bert.resolve_arch(fields.get("variant"), **{k: fields.get(k) for k in bert.ARCH_FIELDS})
    hf_config.update({
        "architectures": [arch], "model_type": "bert", "hidden_size": shape["width"],
        "num_hidden_layers": shape["depth"], "num_attention_heads": shape["num_heads"],
        "intermediate_size": shape["mlp_dim"], "hidden_act": hf_activation_name(fields.get("act", "gelu")),
        "vocab_size": fields.get("vocab_size", 30522), "max_position_embeddings": fields.get("max_len", 512),
        "type_vocab_size": fields.get("type_vocab_size", 2), "layer_norm_eps": fields.get("ln_eps", 1e-12),
        "hidden_dropout_prob": fields.get("dropout", 0.1), "is_decoder": bool(fields.get("causal")),
        "add_cross_attention": bool(fields.get("cross_attention")), "tie_word_embeddings": True,
        "position_embedding_type": "absolute"})
    hf_config.setdefault("attention_probs_dropout_prob", hf_config["hidden_dropout_prob"])
    prefix = "bert." if lm_head else ""
    dropped = pooler and lm_head
    notes = ("Left out BERT's pooler: transformers' BertForMaskedLM / BertLMHeadModel have none",) if dropped else ()
    return Export(hf_table(prefix), hf_config, drop=(r"pooler/.*",) if dropped else (), notes=notes)
