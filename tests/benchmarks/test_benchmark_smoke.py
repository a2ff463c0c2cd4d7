"""The benchmark entry points run end to end on tiny models and write well-formed results."""

import json

import jax
import pytest

from benchmarks import cpu, sharding_memory
from benchmarks.workloads import Workload


def test_cpu_benchmark_speed_section(tmp_path):
    out = str(tmp_path / "cpu.json")
    results = cpu.main(["--smoke", "--sections", "speed", "--models", "vit", "--out", out])
    with open(out) as f:
        saved = json.load(f)
    assert saved["environment"]["allocator"] in ("glibc malloc", "glibc malloc + huge pages", "jemalloc")
    (row,) = saved["speed"]
    for mode in ("inference", "train"):
        assert row["mmjax"][mode]["examples_per_sec"] > 0 and row["torch"][mode]["examples_per_sec"] > 0
        assert 1.0 <= row["flops"][mode]["agreement"] < 1.3   # tiny model: norms etc. weigh more
        assert row["mmjax"][mode]["memory"]["peak_bytes"] > 0
    table = (tmp_path / "cpu.md").read_text()
    assert "ratio mmjax÷PyTorch" in table and "XLA ÷ analytic" in table
    assert results["speed"][0]["workload"] == row["workload"]


def test_sharded_memory_shrinks_with_fsdp():
    assert jax.device_count() == 8
    w = Workload("vit", "tiny", batch=8, image_size=32)
    dp, fsdp = sharding_memory.measure(w, "dp"), sharding_memory.measure(w, "fsdp")
    state = lambda r: r["param_bytes_per_device"] + r["optimizer_bytes_per_device"]
    assert state(fsdp) < state(dp) / 4   # the LayerNorm/bias vectors stay replicated
    assert 0 < fsdp["compiled"]["peak_bytes"] < dp["compiled"]["peak_bytes"]


def test_unknown_section_is_an_error():
    with pytest.raises(SystemExit):
        cpu.parse_args(["--sections", "speed,bogus"])


def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu.sh's two halves (PyTorch, then mmjax with the ratio and the recipe rows) on tiny
    models: the script that a GPU session runs must not rot while no GPU is lent."""
    from benchmarks import gpu
    common = ["--smoke", "--models", "vit", "--remat", "off"]
    gpu.main(["--framework", "torch", "--out", str(tmp_path / "torch.json"), *common])
    results = gpu.main(["--framework", "mmjax", "--torch-results", str(tmp_path / "torch.json"),
                        "--out", str(tmp_path / "gpu.json"), *common])
    (row,) = results["mmjax"]
    assert "error" not in row and row["train"]["examples_per_sec"] > 0 and row["ratio_vs_torch"] > 0
    assert row["flops"]["tflops"] > 0
    (recipe,) = results["recipes"]        # BLIP-2 stage 2's smoke model, its towers frozen
    assert "error" not in recipe and recipe["train"]["examples_per_sec"] > 0
    assert 0 < recipe["trained_params_millions"] < recipe["params_millions"] and recipe["tflops_per_device"] > 0
    text = (tmp_path / "gpu.md").read_text()
    assert "vs PyTorch" in text and "blip2-stage2-opt2.7b" in text


def test_cpu_benchmark_blip_section(tmp_path):
    """The blip section on a tiny BLIP: both sides train on the same losses and caption alike."""
    out = str(tmp_path / "blip.json")
    cpu.main(["--smoke", "--sections", "blip", "--out", out])
    with open(out) as f:
        saved = json.load(f)["blip"]
    train = saved["train"]
    assert train["max_loss_diff"] < 1e-4 and len(train["losses"]["mmjax"]) == 3   # 1 warm-up + 2 timed steps
    assert train["mmjax"]["examples_per_sec"] > 0 and train["torch"]["examples_per_sec"] > 0 and train["ratio"] > 0
    assert 1.0 <= train["flops"]["agreement"] < 1.3
    (greedy,) = saved["generation"]
    assert greedy["same_tokens"] and len(greedy["mmjax_tokens"][0]) == 1 + greedy["new_tokens"]
    assert greedy["mmjax"]["tokens_per_sec"] > 0 and greedy["traces"] == 1
    assert "ratio mmjax÷transformers" in (tmp_path / "blip.md").read_text()


def test_cpu_benchmark_blip2_section(tmp_path):
    """The blip2 section on a tiny BLIP-2: frozen towers on both sides, the same losses step by step
    (the trained bridge moves them), and only the bridge holds optimizer state on mmjax's side."""
    out = str(tmp_path / "blip2.json")
    cpu.main(["--smoke", "--sections", "blip2", "--out", out])
    with open(out) as f:
        train = json.load(f)["blip2"]["train"]
    losses = train["losses"]
    assert train["max_loss_diff"] < 1e-4 and len(losses["mmjax"]) == 3 and losses["mmjax"][0] != losses["mmjax"][-1]
    assert 0 < train["mmjax"]["trained_millions"] < train["mmjax"]["params_millions"] / 10
    assert 1.0 <= train["flops"]["agreement"] < 1.1 and train["ratio"] > 0
    assert "BLIP-2 stage-2 train step" in (tmp_path / "blip2.md").read_text()


def test_fusion_memory_measures_a_recipe_with_task_state():
    """benchmarks/fusion_memory.py on a recipe whose task owns state (EMA model + queues), fsdp."""
    from benchmarks import fusion_memory

    row = fusion_memory.measure(fusion_memory.SMOKE_RECIPE, "fsdp", batch=8)
    assert row["task"] == "contrastive_momentum" and row["task_state_entries"] == ["ema_params", "queue"]
    assert row["batch_shapes"]["image"] == [32, 32, 3]
    unsharded = row["params_millions"] * 1e6 * 4
    assert row["param_bytes_per_device"] < unsharded / 4   # sharded 8 ways; norms and biases replicated
    assert row["task_state_bytes_per_device"] > row["param_bytes_per_device"]   # EMA copy + queues
    assert row["compiled"]["peak_bytes"] > 0
