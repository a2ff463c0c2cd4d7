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
    """benchmarks/gpu.sh's two halves (PyTorch, then mmjax with the ratio) on tiny models: the
    script that a GPU session runs must not rot while no GPU is lent."""
    from benchmarks import gpu
    common = ["--smoke", "--models", "vit", "--remat", "off"]
    gpu.main(["--framework", "torch", "--out", str(tmp_path / "torch.json"), *common])
    results = gpu.main(["--framework", "mmjax", "--torch-results", str(tmp_path / "torch.json"),
                        "--out", str(tmp_path / "gpu.json"), *common])
    (row,) = results["mmjax"]
    assert "error" not in row and row["train"]["examples_per_sec"] > 0 and row["ratio_vs_torch"] > 0
    assert row["flops"]["tflops"] > 0
    assert "vs PyTorch" in (tmp_path / "gpu.md").read_text()
