"""CapFilt (BLIP, Li et al. 2022, Sec. 3.3): bootstrap an image-text data set with a captioner
and a filter. For every image the captioner (a BlipCaptioner model directory) samples a synthetic
caption (nucleus sampling, top_p 0.9, 5 to 20 tokens counting [DEC] and the prompt "a picture
of ", repetition penalty 1.1, as BLIP's `generate(sample=True)`); the filter (a BlipRetrieval)
scores the original and the synthetic caption with its ITM head, and a caption is kept when its
"match" probability (softmax class 1) is >= the threshold.

    mmjax-capfilt --captioner DIR --filter DIR --tokenizer vocab.txt \\
                  --input IMAGE_DIR CAPTIONS.jsonl | --input 'shards/{00000..00009}.tar' \\
                  --output OUT [--threshold 0.5] [--top-p 0.9] [--batch-size 16] [--seed 0]

OUT is a folder data set (`data=dict(name="folder", image_dir=OUT, captions=OUT/captions.jsonl)`):
images/NNNNNNNN.png (the decoded input image, lossless), captions.jsonl with one line per kept
(image, caption): {"image", "caption", "source": "web" | "synthetic", "itm_probability"}, and
summary.json with the counts and settings. Batch b samples with fold_in(key(seed), b); the last
batch is padded with copies of its first image, so every batch has one shape.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmjax import generate, inference_spec, pretrained
from mmjax.data.preprocess import Preprocess

CAPTIONER_CLASS = "mmjax.models.blip.BlipCaptioner"
FILTER_CLASS = "mmjax.models.blip.BlipRetrieval"
DEFAULT_BOS = 30522          # BLIP-base's [DEC]
SPECIAL_IDS_ADDED = 2        # BLIP's text towers embed [DEC] and [ENC] beyond BERT's vocabulary


@dataclasses.dataclass(frozen=True)
class Settings:
    """CapFilt's knobs (BLIP's values by default)."""

    threshold: float = 0.5
    top_p: float = 0.9
    max_length: int = 20               # transformers' max_length: [DEC] + prompt + caption
    min_length: int = 5
    repetition_penalty: float = 1.1
    prompt: str = "a picture of "
    batch_size: int = 16
    seed: int = 0
    context_length: int = 35           # the filter's text length (BLIP's retrieval max_length)
    bos_token_id: int | None = None    # None: the captioner's transformers config, else 30522
    enc_token_id: int | None = None    # set: replaces [CLS] in the filter's input (official BLIP's [ENC])


@dataclasses.dataclass
class BlipModel:
    """A loaded model directory: module, variables, its image preprocessing and text vocabulary."""

    module: Any
    variables: dict
    preprocess: Preprocess
    vocab_size: int
    config: dict


def load_model(directory: str, expected: str, role: str, preprocess: str | None = None) -> BlipModel:
    """The model directory `directory` (--captioner / --filter), which must hold an `expected` class."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--{role} {directory!r} is not a directory (expected an mmjax model directory "
                                "written by mmjax-convert)")
    config = pretrained.model_config(directory)
    if config.get("class") != expected:
        hf = "BlipForConditionalGeneration" if expected == CAPTIONER_CLASS else "BlipForImageTextRetrieval"
        raise ValueError(f"--{role} {directory!r} holds a {config.get('class')}, but CapFilt's {role} must be a "
                         f"{expected.rsplit('.', 1)[1]} (mmjax-convert transformers' {hf})")
    module, variables = pretrained.load(directory)
    pp = preprocess or inference_spec.image_pp(inference_spec.spec(config, timm_lookup=False)["preprocess"])
    if not pp:
        size = inference_spec.image_size(config)
        pp = f"resize({size}, 'bicubic')|normalize('clip')"          # BLIP's own transform
    text = config["fields"].get("text") or {}
    return BlipModel(module, variables, Preprocess(pp), int(text.get("vocab_size", 30524)), config)


def load_tokenizer(path: str, context_length: int, models: Sequence[BlipModel]):
    """The WordPiece tokenizer of `path` (vocab.txt / tokenizer.json), checked against each model:
    its ids must embed, and it must be the model's vocabulary (BLIP adds at most [DEC], [ENC])."""
    from mmjax.data.tokenizers.wordpiece import WordPieceTokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokenizer {path!r} does not exist (a WordPiece vocab.txt or tokenizer.json)")
    tokenizer = WordPieceTokenizer(path, context_length)
    for model in models:
        if not model.vocab_size - SPECIAL_IDS_ADDED <= tokenizer.vocab_size <= model.vocab_size:
            raise ValueError(f"--tokenizer {path!r} has {tokenizer.vocab_size} ids, but the model "
                             f"{model.config['class'].rsplit('.', 1)[1]} embeds {model.vocab_size}: not its "
                             f"vocabulary (expected {model.vocab_size - SPECIAL_IDS_ADDED} to {model.vocab_size})")
    return tokenizer


def bos_token_id(captioner: BlipModel, settings: Settings) -> int:
    """[DEC]: the setting, else the captioner's transformers config, else BLIP-base's 30522."""
    bos = settings.bos_token_id
    if bos is None:
        text_config = ((captioner.config.get("source") or {}).get("config") or {}).get("text_config") or {}
        bos = text_config.get("bos_token_id", DEFAULT_BOS)
    if not 0 <= int(bos) < captioner.vocab_size:
        raise ValueError(f"bos_token_id {bos} is outside the captioner's vocabulary of {captioner.vocab_size} ids")
    return int(bos)


def open_input(inputs: Sequence[str]):
    """The source of --input: [IMAGE_DIR, CAPTIONS.jsonl] (folder) or [SHARDS] (webdataset)."""
    from mmjax.data import sources

    if len(inputs) == 2:
        return sources.get_source({"name": "folder", "image_dir": inputs[0], "captions": inputs[1]})
    if len(inputs) == 1:
        return sources.get_source({"name": "webdataset", "shards": inputs[0]})
    raise ValueError(f"--input takes IMAGE_DIR CAPTIONS.jsonl or one webdataset shard pattern, got {list(inputs)}")


class CapFilt:
    """The captioner and the filter, jitted once; `captions` and `match_probability` per batch."""

    def __init__(self, captioner: BlipModel, filter_model: BlipModel, tokenizer, settings: Settings):
        self.captioner, self.filter, self.tokenizer, self.settings = captioner, filter_model, tokenizer, settings
        prompt_ids = tokenizer.encode(settings.prompt) if settings.prompt.strip() else []
        self.prompt = np.asarray([bos_token_id(captioner, settings), *prompt_ids], np.int32)
        self.generation = generate.GenerationConfig(
            max_length=settings.max_length, min_length=settings.min_length, do_sample=True, top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty, eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id)
        self.generator = generate.Generator(generate.FlaxDecoder(captioner.module, method="decode_text"),
                                            max_length=self.generation.total_length(len(self.prompt)))
        self._encode = jax.jit(lambda v, x: captioner.module.apply(v, x, method="encode_images"))
        self._image_tokens = jax.jit(lambda v, x: filter_model.module.apply(v, x, method="encode_image_tokens"))
        self._itm = jax.jit(lambda v, t, m, img: jax.nn.softmax(
            filter_model.module.apply(v, t, m, img, method="match"), axis=-1)[:, 1])

    def with_threshold(self, threshold: float) -> CapFilt:
        """The same models and compiled functions, filtering at another threshold."""
        other = copy.copy(self)
        other.settings = dataclasses.replace(self.settings, threshold=float(threshold))
        return other

    def captions(self, images: np.ndarray, key: jax.Array) -> list[str]:
        """Synthetic captions (prompt removed) of captioner-preprocessed images."""
        context = self._encode(self.captioner.variables, jnp.asarray(images))
        prompt = jnp.asarray(np.broadcast_to(self.prompt, (len(images), len(self.prompt))))
        out = self.generator(self.captioner.variables["params"], prompt, self.generation,
                             inputs={"context": context}, key=key)
        ids = np.asarray(out.generated)
        ids = np.where(ids < self.tokenizer.vocab_size, ids, self.tokenizer.pad_token_id)
        return [text.strip() for text in self.tokenizer.decode(ids)]

    def image_tokens(self, images: np.ndarray) -> jax.Array:
        return self._image_tokens(self.filter.variables, jnp.asarray(images))

    def match_probability(self, image_tokens: jax.Array, captions: Sequence[str]) -> np.ndarray:
        """The filter's ITM "match" probability of caption i with image i."""
        tokens = self.tokenizer(list(captions))
        if self.settings.enc_token_id is not None:
            tokens[:, 0] = self.settings.enc_token_id
        mask = tokens != self.tokenizer.pad_token_id
        return np.asarray(self._itm(self.filter.variables, jnp.asarray(tokens), jnp.asarray(mask), image_tokens))


def _preprocessed(pp: Preprocess, images: Sequence[np.ndarray]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([np.asarray(pp({"image": image}, rng)["image"], np.float32) for image in images])


def run(capfilt: CapFilt, source: Sequence[dict | None], output: str) -> dict:
    """Captions and filters every example of `source`, writing the folder data set `output`."""
    images_dir = os.path.join(output, "images")
    captions_path = os.path.join(output, "captions.jsonl")
    if os.path.exists(captions_path):
        raise FileExistsError(f"--output {output!r} already holds a CapFilt data set ({captions_path})")
    os.makedirs(images_dir, exist_ok=True)
    s = capfilt.settings
    counts = {"images": 0, "unreadable": 0, "web_kept": 0, "synthetic_kept": 0, "images_without_caption": 0}
    key = jax.random.key(s.seed)
    examples = []
    with open(captions_path, "w", encoding="utf-8") as out:
        def flush(batch_index: int) -> None:
            n = len(examples)
            padded = examples + [examples[0]] * (s.batch_size - n)
            raw = [e["image"] for e in padded]
            synthetic = capfilt.captions(_preprocessed(capfilt.captioner.preprocess, raw),
                                         jax.random.fold_in(key, batch_index))
            image_tokens = capfilt.image_tokens(_preprocessed(capfilt.filter.preprocess, raw))
            web = [str(e["caption"]) for e in padded]
            p_web, p_syn = capfilt.match_probability(image_tokens, web), capfilt.match_probability(image_tokens,
                                                                                                  synthetic)
            for i in range(n):
                kept = [(c, kind, float(p)) for c, kind, p in ((web[i], "web", p_web[i]),
                                                                (synthetic[i], "synthetic", p_syn[i]))
                        if p >= s.threshold and c]
                counts["images_without_caption"] += not kept
                if kept:
                    name = f"images/{counts['images'] + i:08d}.png"
                    Image.fromarray(np.asarray(raw[i], np.uint8)).save(os.path.join(output, name))
                for caption, kind, p in kept:
                    counts[f"{kind}_kept"] += 1
                    out.write(json.dumps({"image": name, "caption": caption, "source": kind,
                                          "itm_probability": p}) + "\n")
            counts["images"] += n
            examples.clear()

        batches = 0
        for index in range(len(source)):
            example = source[index]
            if example is None:
                counts["unreadable"] += 1
                continue
            examples.append(example)
            if len(examples) == s.batch_size:
                flush(batches)
                batches += 1
        if examples:
            flush(batches)
    summary = {**counts, "settings": dataclasses.asdict(s)}
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmjax-capfilt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captioner", required=True, help="model directory of a BlipCaptioner")
    p.add_argument("--filter", required=True, help="model directory of a BlipRetrieval (the ITM filter)")
    p.add_argument("--tokenizer", required=True, help="the models' WordPiece vocab.txt or tokenizer.json")
    p.add_argument("--input", required=True, nargs="+", help="IMAGE_DIR CAPTIONS.jsonl, or a webdataset shard pattern")
    p.add_argument("--output", required=True, help="folder for the new data set")
    p.add_argument("--threshold", type=float, default=Settings.threshold, help="keep a caption when p(match) >= this")
    p.add_argument("--top-p", type=float, default=Settings.top_p)
    p.add_argument("--max-length", type=int, default=Settings.max_length)
    p.add_argument("--min-length", type=int, default=Settings.min_length)
    p.add_argument("--repetition-penalty", type=float, default=Settings.repetition_penalty)
    p.add_argument("--prompt", default=Settings.prompt)
    p.add_argument("--batch-size", type=int, default=Settings.batch_size)
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--context-length", type=int, default=Settings.context_length)
    p.add_argument("--bos-token-id", type=int, default=None)
    p.add_argument("--enc-token-id", type=int, default=None)
    p.add_argument("--preprocess", default=None, help="pp string for both models' images (default: each model's own)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """mmjax-capfilt: prints the counts; OUTPUT/summary.json holds them with the settings."""
    args = parser().parse_args(argv)
    settings = Settings(threshold=args.threshold, top_p=args.top_p, max_length=args.max_length,
                        min_length=args.min_length, repetition_penalty=args.repetition_penalty, prompt=args.prompt,
                        batch_size=args.batch_size, seed=args.seed, context_length=args.context_length,
                        bos_token_id=args.bos_token_id, enc_token_id=args.enc_token_id)
    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")
    captioner = load_model(args.captioner, CAPTIONER_CLASS, "captioner", args.preprocess)
    filter_model = load_model(args.filter, FILTER_CLASS, "filter", args.preprocess)
    tokenizer = load_tokenizer(args.tokenizer, settings.context_length, [captioner, filter_model])
    summary = run(CapFilt(captioner, filter_model, tokenizer, settings), open_input(args.input), args.output)
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))


if __name__ == "__main__":
    main()
