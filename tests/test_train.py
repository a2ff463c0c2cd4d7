"""The trainer end to end: runs, writes its outputs, resumes, learns, and rejects bad setups."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import trainer_process

from mmjax import configs, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANCE_SHAPES = 1 / 24   # the shapes data set's 24 colour x shape classes
# The main job made short: no intermediate evaluations or checkpoints, and zero-shot / retrieval
# on 500 of the test split's examples.
# Steps of batch 64, and the zero-shot top-1 each must reach in multiples of chance (3x = 0.125).
# Measured on 2 CPU cores (8 simulated devices): CLIP 0.184 after 100 steps; SigLIP 0.166 after 60.
CLIP_STEPS, CLIP_BOUND = 100, 3.0
SIGLIP_STEPS, SIGLIP_BOUND = 60, 3.0
SHORT_CLIP = ["--config.evals.every_steps=0", "--config.checkpoint.every_steps=100000",
              "--config.evals.zeroshot.max_examples=500", "--config.evals.retrieval.max_examples=500"]


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _load(spec: str, *overrides: str):
    return configs.apply_overrides(configs.load_config(spec), list(overrides))


def test_clip_smoke_run_writes_outputs_and_resumes(shapes_clip_run, tmp_path):
    """The session's shapes CLIP smoke run (tests/conftest.py), then a copy of it resumed."""
    workdir, final = shapes_clip_run.workdir, shapes_clip_run.final
    assert {"zeroshot/top1", "retrieval/i2t_r1", "retrieval/t2i_r5"} <= set(final)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps[-1] == 4
    lines = _metrics(workdir)
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))

    # Same command with a longer schedule: continues from step 4 instead of starting over.
    # (On a copy: the shared run stays as trained for the other tests.)
    workdir = str(tmp_path / "clip")
    shutil.copytree(shapes_clip_run.workdir, workdir)
    config = _load(shapes_clip_run.spec, *shapes_clip_run.overrides, "--config.total_steps=6")
    train.train(config, workdir)
    lines = _metrics(workdir)
    logged = [r["step"] for r in lines if "loss" in r]
    assert logged == [2, 4, 6], "the resumed run must start after the last checkpoint"


def test_vit_learns_shapes_far_above_chance(tmp_path):
    """Its own run, not the session's shapes_vit_run: learning needs many steps of larger batches.

    150 steps of a small ViT on 24 classes: top-1 well above chance (1/24 ≈ 0.042).

    This early the model has learnt the colour (a 4-way split, top-1 ≈ 0.25) and is only
    starting on the shape; 0.15 is 3.6× chance.
    """
    config = _load("experiments/vit/shapes.py:steps=150,batch=64",
                   "--config.model.patch_size=8", "--config.evals.every_steps=0",
                   "--config.checkpoint.every_steps=1000", "--config.evals.top1.max_examples=500")
    final = train.train(config, str(tmp_path / "vit"))
    print("ViT shapes top-1 after 150 steps:", final["top1"])
    assert final["top1"] > 0.15


def test_clip_main_job_learns_far_above_chance(tmp_path):
    """The main job (experiments/clip/shapes.py, conv stem, CLIP loss) through train.train, cut to
    CLIP_STEPS steps of batch 64: zero-shot top-1 over the 24 classes far above chance.

    The full recipe reaches 0.97 after 1300 steps of batch 128; this early it has the colours (a
    4-way split) and little of the shapes: 0.184 measured (4.4x chance).
    """
    config = _load(f"experiments/clip/shapes.py:steps={CLIP_STEPS},batch=64", *SHORT_CLIP)
    final = train.train(config, str(tmp_path / "clip"))
    top1 = final["zeroshot/top1"]
    print(f"CLIP (main job) zero-shot top-1 after {CLIP_STEPS} steps of 64: {top1:.3f} "
          f"({top1 / CHANCE_SHAPES:.1f}x chance)")
    assert top1 >= CLIP_BOUND * CHANCE_SHAPES


def test_siglip_learns_far_above_chance_through_the_console_script(tmp_path):
    """`mmjax-train --config experiments/clip/shapes.py:loss=siglip` as a user runs it (the
    installed console script, in its own process), cut to SIGLIP_STEPS steps of batch 64: the
    final zero-shot top-1 (metrics.jsonl, and the printed summary) far above chance: 0.166
    measured (4.0x chance)."""
    script = shutil.which("mmjax-train") or os.path.join(os.path.dirname(sys.executable), "mmjax-train")
    assert os.path.exists(script), "the mmjax-train console script is not installed"
    workdir = str(tmp_path / "siglip")
    env = dict(os.environ, JAX_PLATFORMS="cpu")     # XLA_FLAGS: conftest's 8 simulated devices
    proc = subprocess.Popen(
        [script, "--config", f"experiments/clip/shapes.py:loss=siglip,steps={SIGLIP_STEPS},batch=64",
         *SHORT_CLIP, "--workdir", workdir],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, _ = trainer_process.watch(proc)
    evals = [r for r in _metrics(workdir) if "zeroshot/top1" in r]
    assert [r["step"] for r in evals] == [SIGLIP_STEPS], "one evaluation, at the end"
    top1 = evals[-1]["zeroshot/top1"]
    print(f"SigLIP (mmjax-train) zero-shot top-1 after {SIGLIP_STEPS} steps of 64: {top1:.3f} "
          f"({top1 / CHANCE_SHAPES:.1f}x chance)")
    assert any(line.split() == ["zeroshot/top1", f"{top1:.4f}"] for line in lines), "".join(lines[-20:])
    assert top1 >= SIGLIP_BOUND * CHANCE_SHAPES


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(KeyError, match="optimizer.weight_decy"):
        train.parse_args(["--config", "experiments/vit/shapes.py", "--workdir", str(tmp_path),
                          "--config.optimizer.weight_decy=0.1"])


def test_stray_cli_argument_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--config", "experiments/vit/shapes.py", "--workdir", str(tmp_path), "--lr=3"])


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    config = _load("experiments/vit/shapes.py:smoke=True", "--config.input.batch_size=12")
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        train.train(config, str(tmp_path / "w"))


def test_mesh_must_match_devices(tmp_path):
    config = _load("experiments/vit/shapes.py:smoke=True", "--config.mesh=[('data', 3)]")
    with pytest.raises(ValueError, match="Mesh"):
        train.train(config, str(tmp_path / "w"))


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not writable"):
        train.train(_load("experiments/vit/shapes.py:smoke=True"), str(blocker / "sub"))
