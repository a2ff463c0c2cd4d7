"""DALL-E dVAE checkpoints -> mmjax through mmjax-convert, at the real size (n_hid 256, 8192
tokens) with random weights on 112-px images: OpenAI's `dall_e` Encoder (same logits and token
ids, and an exact round trip back to a state dict that dall_e loads with strict=True), its
Decoder (same logit-Laplace statistics), transformers' FlavaImageCodebook, and bad input."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from references import require

import mmjax
from mmjax.convert import io
from mmjax.models import dvae

dall_e = require("dall_e")


def _randomize(module, seed):
    """Random weights at DALL-E's scale (std 1/sqrt(fan_in)) and random (non-zero) biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 1 / np.sqrt(p[0].numel()) if p.ndim == 4 else 0.1
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def _pixels(n=1, size=112, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def _check_ids(ids, ref_logits, label):
    """Token ids equal the reference argmax wherever its top two logits are not a numerical tie."""
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4
    ref_ids = ref_logits.argmax(-1)
    print(f"{label}: token ids equal {(np.asarray(ids) == ref_ids).sum()}/{ref_ids.size} "
          f"({clear.sum()} without a near tie)")
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(ids)[clear], ref_ids[clear])


@functools.partial(jax.jit, static_argnums=0)      # compiled once for equal encoders (dall_e, FLAVA)
def _encode(model, variables, x):
    return model.apply(variables, x), model.apply(variables, x, method="tokenize")


@pytest.fixture(scope="module")
def encoder(module_tmp, convert):
    tmp = module_tmp("dall_e_encoder")
    ref = _randomize(dall_e.Encoder(device=torch.device("cpu"), requires_grad=False), seed=0)
    x = _pixels()
    with torch.no_grad():
        want = ref(dall_e.map_pixels(torch.from_numpy(x.transpose(0, 3, 1, 2)))).numpy().transpose(0, 2, 3, 1)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.save(state, str(tmp / "encoder.pt"))
    convert("--source", "dall_e", "--model", "encoder", "--checkpoint", tmp / "encoder.pt", "--output", tmp / "mm")
    model, variables = mmjax.load(str(tmp / "mm"))
    return {"tmp": tmp, "state": state, "variables": variables, "got": _encode(model, variables, x), "want": want}


def test_encoder_matches_dall_e(encoder, diff):
    (logits, ids), want = encoder["got"], encoder["want"]
    assert logits.shape == (1, 14, 14, 8192) and ids.dtype == np.int32
    assert diff(logits, want, "dall_e Encoder @112px logits") <= 1e-5
    _check_ids(ids, want, "dall_e Encoder @112px")


def test_encoder_round_trip_is_exact(encoder, convert, reimport_equals):
    """mmjax -> dall_e state dict (strict load equals the original) -> mmjax (equals the first)."""
    tmp = encoder["tmp"]
    convert("--to", "dall_e", "--input", tmp / "mm", "--output", tmp / "back.pt")
    fresh = dall_e.Encoder(device=torch.device("cpu"), requires_grad=False)
    fresh.load_state_dict(torch.load(str(tmp / "back.pt")), strict=True)
    restored = fresh.state_dict()
    assert set(restored) == set(encoder["state"])
    for k, v in encoder["state"].items():
        assert torch.equal(restored[k], v), k
    reimport_equals("dall_e", tmp / "back.pt", encoder["variables"], "encoder")


def test_decoder_matches_dall_e(tmp_path, convert, diff):
    ref = _randomize(dall_e.Decoder(device=torch.device("cpu"), requires_grad=False), seed=1)
    tokens = np.random.default_rng(1).integers(0, 8192, size=(1, 14, 14)).astype(np.int32)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(tokens).long(), 8192).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        want = ref(one_hot).numpy().transpose(0, 2, 3, 1)
    torch.save(ref.state_dict(), str(tmp_path / "decoder.pt"))
    del ref, one_hot
    convert("--source", "dall_e", "--model", "decoder", "--checkpoint", tmp_path / "decoder.pt",
            "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    assert isinstance(model, dvae.DVAEDecoder) and model.n_init == 128 and model.n_hid == 256
    got = jax.jit(model.apply)(variables, tokens)
    assert got.shape == (1, 112, 112, 6)
    assert diff(got, want, "dall_e Decoder (14x14 tokens -> 112px) logit-Laplace statistics") <= 5e-6


def test_flava_image_codebook_matches_transformers(tmp_path, convert, diff):
    with torch.device("meta"):          # every parameter is drawn below: skip transformers' init
        ref = transformers.FlavaImageCodebook(transformers.FlavaImageCodebookConfig())
    ref = _randomize(ref.to_empty(device="cpu"), seed=2)
    x = _pixels(seed=2)
    mapped = dvae.map_pixels(torch.from_numpy(x.transpose(0, 3, 1, 2)))   # FLAVA's processor maps pixels
    with torch.no_grad():
        want = ref(mapped).numpy().transpose(0, 2, 3, 1)      # its get_codebook_indices is this argmax
    ref.save_pretrained(str(tmp_path / "hf"))
    del ref
    convert("--source", "hf", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "mm")
    model, variables = mmjax.load(str(tmp_path / "mm"))
    logits, ids = _encode(model, variables, x)
    assert diff(logits, want, "transformers FlavaImageCodebook @112px logits") <= 1e-5
    _check_ids(ids, want, "transformers FlavaImageCodebook @112px")


def test_bad_input(tmp_path, convert, capsys):
    with pytest.raises(SystemExit):
        convert("--source", "dall_e", "--model", "tokenizer", "--checkpoint", tmp_path / "x.pt", "--output",
                tmp_path / "out")
    assert "Unknown dall_e model 'tokenizer'" in capsys.readouterr().err
    # A small encoder state dict with one extra key and one conv of the wrong shape: one error lists both.
    state = {k: v.numpy() for k, v in dall_e.Encoder(n_hid=16, n_blk_per_group=1, vocab_size=32,
                                                     device=torch.device("cpu")).state_dict().items()}
    state["blocks.group_5.block_1.id_path.w"] = np.zeros((1, 1, 1, 1), np.float32)
    state["blocks.output.conv.w"] = state["blocks.output.conv.w"][:, :-1]
    io.write_state_dict(str(tmp_path / "small.safetensors"), state)
    with pytest.raises(SystemExit):
        convert("--source", "dall_e", "--model", "encoder", "--checkpoint", tmp_path / "small.safetensors",
                "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert "blocks.group_5.block_1.id_path.w (1, 1, 1, 1): the model has no group_5_block_1/id_path/kernel" in err
    assert "blocks.output.conv.w: checkpoint has (32, 127, 1, 1), the model needs (32, 128, 1, 1)" in err
    with pytest.raises(SystemExit):
        convert("--source", "dall_e", "--model", "decoder", "--checkpoint", tmp_path / "small.safetensors",
                "--output", tmp_path / "out")
    expected = "Not a DALL-E dVAE decoder state dict: blocks.group_1.block_1.id_path.w is missing"
    assert expected in capsys.readouterr().err
