"""Shared helpers for the conversion tests: random reference weights, inputs, in-process CLI."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def randomize():
    """Moves a torch model's 1-D parameters (norm scales/biases, linear biases, class tokens)
    away from their 1/0 init, so that a mis-mapped or missing parameter cannot hide."""
    import torch

    def fn(model, seed=0):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim <= 1 or p.shape[:-1] == (1, 1):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        return model.eval()
    return fn


@pytest.fixture(scope="session")
def randomize_tables():
    """BEiT's relative position bias tables start at zero in timm and transformers: make them
    random, so that a mis-mapped table cannot hide."""
    import torch

    def fn(model, seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        return model
    return fn


@pytest.fixture(scope="session")
def fill_mae_posembs():
    """transformers leaves ViTMAE's fixed sin-cos tables at zero in a model built from a config
    (checkpoints carry them): fill them with its own function, as its initialize_weights does
    (the original MAE layout rotates the two halves)."""
    import torch
    from transformers.models.vit_mae.modeling_vit_mae import (
        build_2d_sinusoidal_position_embedding,
    )

    def fn(model):
        with torch.no_grad():
            for param in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
                grid = round((param.shape[1] - 1) ** 0.5)
                table = build_2d_sinusoidal_position_embedding(grid, grid, param.shape[-1], cls_token=True)
                half = table.shape[-1] // 2
                param.copy_(torch.cat([table[..., half:], table[..., :half]], dim=-1)[None])
        return model
    return fn


@pytest.fixture(scope="session")
def images():
    def fn(n=2, size=224, seed=0):
        return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)
    return fn


@pytest.fixture(scope="session")
def convert():
    """mmjax-convert, run in-process (the same entry point as the console script)."""
    from mmjax.convert import cli

    def fn(*args):
        cli.main([str(a) for a in args])
    return fn


@pytest.fixture(scope="session")
def reimport_equals():
    """Checks that a written checkpoint converts back to exactly the mmjax parameters it came
    from: fn(source, checkpoint, variables, model=None) -> the import plan."""
    from mmjax.convert import api, engine

    def fn(source, checkpoint, variables, model=None):
        plan, state = api.plan_import(source, str(checkpoint), model)
        flat = engine.flatten(variables["params"])
        again = engine.to_mmjax(state, plan.table, flat)
        for path, value in flat.items():
            np.testing.assert_array_equal(again[path], np.asarray(value), err_msg=path)
        return plan
    return fn


def max_abs_diff(got, want, label):
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    print(f"{label}: max abs diff {diff:.3g} (max |x| {np.abs(np.asarray(want)).max():.3g})")
    assert np.abs(np.asarray(want)).max() > 0.1       # a non-trivial output
    return diff


@pytest.fixture(scope="session")
def diff():
    return max_abs_diff
