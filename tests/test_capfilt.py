"""mmjax-capfilt on tiny random-weight BLIP models converted from transformers: the folder data
set it writes, the filter's decisions against ITM probabilities computed here through the mmjax
model's own forward pass, the synthetic captions against mmjax.generate with the same seed, and
the errors for bad input."""

import json
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

import mmjax
from mmjax import capfilt, generate, inference_spec
from mmjax.convert import cli
from mmjax.data import sources
from mmjax.data.preprocess import Preprocess
from mmjax.data.tokenizers.wordpiece import WordPieceTokenizer

WORDS = ["a", "picture", "of", "red", "green", "blue", "circle", "square", "star", "small", "large", "on", "the",
         "left", "right", "top", "bottom", "dark", "light", "background", "is", "there", "shape", "image"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(97 - len(SPECIALS) - len(WORDS))]     # 97 ids
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, encoder_hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            vocab_size=99, max_position_embeddings=40, bos_token_id=97, sep_token_id=3, pad_token_id=0)
NUM_IMAGES, BATCH = 6, 4


def _random_weights(model, seed):
    """Draws every weight at std 0.2 (transformers' BLIP vision init is ~1e-10), so images and
    captions visibly move the ITM probabilities and the sampled tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def setup(module_tmp):
    root = module_tmp("capfilt")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    config = BlipConfig(vision_config=VISION, text_config=TEXT, image_text_hidden_size=16)
    for name, cls, seed in (("captioner", BlipForConditionalGeneration, 1), ("filter", BlipForImageTextRetrieval, 2)):
        torch.manual_seed(seed)
        _random_weights(cls(config), seed).save_pretrained(str(root / f"hf_{name}"))
        cli.main(["--source", "hf", "--checkpoint", str(root / f"hf_{name}"), "--output", str(root / name)])
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    lines, examples = [], []
    for i in range(NUM_IMAGES):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        caption = " ".join(rng.choice(WORDS[3:], size=4))
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
        examples.append((image, caption))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with tarfile.open(root / "shard.tar", "w") as tar:
        for i in range(NUM_IMAGES):
            tar.add(root / "images" / f"{i}.png", arcname=f"{i:06d}.png")
            (root / f"{i:06d}.txt").write_text(examples[i][1])
            tar.add(root / f"{i:06d}.txt", arcname=f"{i:06d}.txt")
    return root, examples


def _cli(root, output, *extra, inputs=None):
    inputs = inputs or [str(root / "images"), str(root / "captions.jsonl")]
    capfilt.main(["--captioner", str(root / "captioner"), "--filter", str(root / "filter"),
                  "--tokenizer", str(root / "vocab.txt"), "--input", *inputs, "--output", str(output),
                  "--batch-size", str(BATCH), "--seed", "7", *extra])
    return json.loads((output / "summary.json").read_text())


@pytest.fixture(scope="module")
def tool(setup):
    """The CapFilt of the CLI's defaults (seed 7, batches of 4), built once: its runs share compiled functions."""
    root, _ = setup
    captioner = capfilt.load_model(str(root / "captioner"), capfilt.CAPTIONER_CLASS, "captioner")
    filter_model = capfilt.load_model(str(root / "filter"), capfilt.FILTER_CLASS, "filter")
    tokenizer = capfilt.load_tokenizer(str(root / "vocab.txt"), 35, [captioner, filter_model])
    return capfilt.CapFilt(captioner, filter_model, tokenizer, capfilt.Settings(batch_size=BATCH, seed=7))


def _folder(root):
    return capfilt.open_input([str(root / "images"), str(root / "captions.jsonl")])


def _lines(output):
    with open(output / "captions.jsonl") as f:
        return [json.loads(line) for line in f]


def _preprocessed(directory, images):
    pp = Preprocess(inference_spec.image_pp(inference_spec.spec(mmjax.pretrained.model_config(str(directory)),
                                                                 timm_lookup=False)["preprocess"]))
    return np.stack([pp({"image": im}, np.random.default_rng(0))["image"] for im in images]).astype(np.float32)


@pytest.fixture(scope="module")
def expected(setup):
    """Synthetic captions by mmjax.generate (batch b: fold_in(key(7), b), the last batch padded with
    its first image) and each caption's ITM probability by the filter's forward pass."""
    root, examples = setup
    tokenizer = WordPieceTokenizer(str(root / "vocab.txt"), 35)
    model, variables = mmjax.load(str(root / "captioner"))
    prompt = np.asarray([97] + tokenizer.encode("a picture of "), np.int32)
    config = generate.GenerationConfig(max_length=20, min_length=5, do_sample=True, top_p=0.9, repetition_penalty=1.1,
                                       eos_token_id=3, pad_token_id=0)
    generator = generate.Generator(generate.FlaxDecoder(model, method="decode_text"), max_length=20)
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode_images"))
    images = [im for im, _ in examples]
    synthetic = []
    for b, start in enumerate(range(0, NUM_IMAGES, BATCH)):
        chunk = images[start:start + BATCH]
        chunk = chunk + [chunk[0]] * (BATCH - len(chunk))
        context = encode(variables, jnp.asarray(_preprocessed(root / "captioner", chunk)))
        out = generator(variables["params"], jnp.asarray(np.tile(prompt, (BATCH, 1))), config,
                        inputs={"context": context}, key=jax.random.fold_in(jax.random.key(7), b))
        ids = np.asarray(out.generated)[:len(images[start:start + BATCH])]
        synthetic += [t.strip() for t in tokenizer.decode(np.where(ids < 97, ids, 0))]
    assert all(synthetic), "every synthetic caption has words (else threshold 0 would drop it)"
    filter_model, filter_vars = mmjax.load(str(root / "filter"))
    pixels = jnp.asarray(_preprocessed(root / "filter", images))

    def p_match(captions):
        tokens = tokenizer(captions)
        logits = jax.jit(filter_model.apply)(filter_vars, pixels, tokens, tokens != 0)["itm_logits"]
        return np.asarray(jax.nn.softmax(logits, axis=-1)[:, 1])

    return synthetic, p_match([c for _, c in examples]), p_match(synthetic)


def test_threshold_zero_keeps_every_caption_and_writes_a_folder_data_set(setup, expected, tool, tmp_path,
                                                                        monkeypatch):
    """Through the CLI; its CapFilt is the module's `tool` (compiled once), given the CLI's settings."""
    root, examples = setup
    synthetic, p_web, p_syn = expected
    built = []

    def reuse_tool(captioner, filter_model, tokenizer, settings):
        built.append((captioner.config["class"], filter_model.config["class"], tokenizer.vocab_size, settings))
        reused = tool.with_threshold(settings.threshold)
        reused.settings = settings
        return reused

    monkeypatch.setattr(capfilt, "CapFilt", reuse_tool)
    summary = _cli(root, tmp_path / "out", "--threshold", "0")
    assert built == [(capfilt.CAPTIONER_CLASS, capfilt.FILTER_CLASS, 97,
                      capfilt.Settings(threshold=0.0, batch_size=BATCH, seed=7))]
    assert {k: summary[k] for k in ("images", "web_kept", "synthetic_kept", "images_without_caption")} == {
        "images": NUM_IMAGES, "web_kept": NUM_IMAGES, "synthetic_kept": NUM_IMAGES, "images_without_caption": 0}
    assert summary["settings"]["seed"] == 7 and summary["settings"]["top_p"] == 0.9
    lines = _lines(tmp_path / "out")
    assert [(x["caption"], x["source"]) for x in lines] == [
        (c, s) for (_, web), syn in zip(examples, synthetic) for c, s in ((web, "web"), (syn, "synthetic"))]
    np.testing.assert_allclose([x["itm_probability"] for x in lines], np.stack([p_web, p_syn], 1).ravel(), atol=1e-5)
    # The output reads back as a folder data set, images unchanged (PNG, lossless).
    out = sources.get_source({"name": "folder", "image_dir": str(tmp_path / "out"),
                              "captions": str(tmp_path / "out" / "captions.jsonl")})
    assert len(out) == 2 * NUM_IMAGES
    for j in range(len(out)):
        np.testing.assert_array_equal(out[j]["image"], examples[j // 2][0])
        assert out[j]["caption"] == lines[j]["caption"]


def test_the_filter_keeps_exactly_the_captions_whose_itm_probability_passes(setup, expected, tool, tmp_path):
    root, examples = setup
    synthetic, p_web, p_syn = expected
    probabilities = np.concatenate([p_web, p_syn])
    assert np.ptp(probabilities) > 0.05, "the random filter separates the captions"
    threshold = float(np.median(probabilities))
    summary = capfilt.run(tool.with_threshold(threshold), _folder(root), str(tmp_path / "out"))
    want = [(c, s) for i, (_, web) in enumerate(examples)
            for c, s, p in ((web, "web", p_web[i]), (synthetic[i], "synthetic", p_syn[i])) if p >= threshold]
    assert [(x["caption"], x["source"]) for x in _lines(tmp_path / "out")] == want
    assert 0 < len(want) < 2 * NUM_IMAGES
    kept_images = {i for i in range(NUM_IMAGES) if p_web[i] >= threshold or p_syn[i] >= threshold}
    assert summary["images_without_caption"] == NUM_IMAGES - len(kept_images)
    assert len(os.listdir(tmp_path / "out" / "images")) == len(kept_images)


def test_threshold_above_one_keeps_nothing_and_webdataset_input_reads_the_same(setup, tool, tmp_path):
    root, _ = setup
    summary = capfilt.run(tool.with_threshold(1.01), _folder(root), str(tmp_path / "none"))
    assert summary["web_kept"] == summary["synthetic_kept"] == 0 and summary["images_without_caption"] == NUM_IMAGES
    assert _lines(tmp_path / "none") == [] and os.listdir(tmp_path / "none" / "images") == []
    capfilt.run(tool.with_threshold(0), capfilt.open_input([str(root / "shard.tar")]), str(tmp_path / "wds"))
    capfilt.run(tool.with_threshold(0), _folder(root), str(tmp_path / "folder"))
    assert _lines(tmp_path / "wds") == _lines(tmp_path / "folder")
    with pytest.raises(FileExistsError, match="already holds a CapFilt data set"):
        capfilt.run(tool, _folder(root), str(tmp_path / "folder"))


def test_bad_input_is_named(setup, tmp_path):
    root, _ = setup
    base = ["--tokenizer", str(root / "vocab.txt"), "--input", str(root / "shard.tar"), "--output", str(tmp_path / "o")]
    with pytest.raises(FileNotFoundError, match=r"--captioner .*missing.* is not a directory"):
        capfilt.main(["--captioner", str(root / "missing"), "--filter", str(root / "filter"), *base])
    with pytest.raises(ValueError, match=r"--captioner .* holds a mmjax\.models\.blip\.BlipRetrieval, but CapFilt's "
                                         r"captioner must be a BlipCaptioner"):
        capfilt.main(["--captioner", str(root / "filter"), "--filter", str(root / "filter"), *base])
    small = tmp_path / "small_vocab.txt"
    small.write_text("\n".join(VOCAB[:50]) + "\n")
    with pytest.raises(ValueError, match=r"--tokenizer .*small_vocab.txt' has 50 ids, but the model BlipCaptioner "
                                         r"embeds 99: not its vocabulary"):
        capfilt.main(["--captioner", str(root / "captioner"), "--filter", str(root / "filter"), *base[:0],
                      "--tokenizer", str(small), *base[2:]])
