"""The LLM benchmarks at toy size: generation against transformers gives the same greedy tokens
and a table; the frozen-LLM step compiles, and keeps no optimizer state for the bfloat16 LLM where
training it keeps two moments per parameter (the compiled peaks of both, for 7B, are in
benchmarks/results/llm_memory.md: compiling the trained step would double this file's time)."""

import jax
from references import require

from benchmarks import llm_generation, llm_memory, report

require("torch")
require("transformers")


def test_generation_benchmark_matches_transformers_tokens():
    s = llm_generation.Setup("tiny", batches=(2,), prompt_length=4, new_tokens=5)
    (row,) = llm_generation.generation(s, warmup=0, steps=1)
    assert row["same_tokens"] and row["matching_token_fraction"] == 1.0
    assert len(row["mmjax_tokens"]) == 2 and len(row["mmjax_tokens"][0]) == 5
    assert row["traces"] == 1      # the timed calls reuse the first call's program
    for side in ("mmjax", "torch"):
        assert row[side]["tokens_per_sec"] > 0 and row[side]["first_call_s"] > 0
    table = report.llm_generation_table({"llm": {"generation": [row]}})
    assert "ratio mmjax÷transformers" in table and "| True |" in table


def test_frozen_llm_step_keeps_no_llm_optimizer_state():
    assert jax.device_count() == 8
    shapes = dict(batch=8, queries=4, query_width=32, text_length=8)
    frozen = llm_memory.measure(llm_memory.TINY_LM, "fsdp", "frozen", **shapes)
    trained = llm_memory.measure(llm_memory.TINY_LM, "fsdp", "trained", **shapes, compile=False)
    assert frozen["llm_param_dtypes"] == ["bfloat16"]      # DecoderLM(param_dtype=bfloat16)
    assert frozen["param_bytes_per_device"] == trained["param_bytes_per_device"]
    projection = 32 * 64 + 64          # the only trainable parameters: no AdamW state for the LLM
    assert frozen["trainable_params"] == projection
    assert frozen["optimizer_bytes_per_device"] < 2 * 4 * projection    # two float32 moments, sharded or not
    assert trained["optimizer_bytes_per_device"] >= 2 * trained["param_bytes_per_device"]   # AdamW: mu and nu
    assert frozen["compiled"]["peak_bytes"] > frozen["param_bytes_per_device"] > 0
    assert trained["compiled"] == {} and trained["compile_s"] is None
