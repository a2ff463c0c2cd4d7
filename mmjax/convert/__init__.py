"""Checkpoint conversion between PyTorch ecosystems (timm, open_clip / OpenAI, Hugging Face) and mmjax.

How a conversion is described (see engine.py):
  * A `Table` is a list of `Rule`s, one per PyTorch key pattern (`blocks.{i}.attn.qkv.weight`),
    each naming the mmjax path(s) it fills (`encoder/layer_{i}/attn/query/kernel` ...) and a
    `Transform` (COPY, LINEAR, CONV, HEADS_IN, HEADS_OUT, HEADS_BIAS, drop_leading(n)). Helpers
    `linear`, `norm`, `conv`, `attention`, `fused_qkv` write the usual module shapes in one line.
    Every transform is invertible, so one table converts in both directions.
  * The engine checks every key against the shapes that the mmjax model creates and raises one
    `ConversionError` listing all missing, unexpected and mis-shaped keys.
  * Scanned layouts are not in the tables: `stack_layers` / `unstack_layers` move between
    `layer_{i}` and a stacked `layers` axis for any block stack.

Adding a family (MAE, BEiT, BLIP, an LLM, ...): write `convert/<family>.py` with
  1. a `Table` per source library;
  2. `from_<source>(name_or_config, state) -> Plan` choosing the mmjax class, its fields and
     example inputs (used to trace parameter shapes);
  3. optionally `<target>_export(model_config) -> (table, hf_config_or_None)`, or an
     `export.Export` when the target leaves parameters out (timm holds no MAE decoder) or
     stores tensors that mmjax recomputes (transformers' fixed sin-cos tables);
  4. optionally warm-start presets (its pretraining run -> its fine-tuning model, `config.init.preset`)
     registered with `warm_start.register_preset` when api.py imports the module (mae.py's
     `mae_to_vit`);
then register them in `api.py` (SOURCES / HF_ARCHITECTURES / EXPORTS) and add a parity test
against the reference implementation with random weights in tests/convert/.
"""

from mmjax.convert.engine import ConversionError, Plan, Rule, Table, Transform

__all__ = ["ConversionError", "Plan", "Rule", "Table", "Transform"]
