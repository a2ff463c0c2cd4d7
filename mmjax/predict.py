"""mmjax-predict: top-k classes of image files, from a model directory or a training run, no config.

    mmjax-predict --model clip_b16 --images 'photos/*.jpg' --classes cat,dog,car [--top-k 3]
    mmjax-predict --model runs/vit --images photos/ --json
    mmjax-predict --model clip_b16 --eval-folder labelled/ [--split val]   # top-1 over class folders
    mmjax-predict --model clip_b16 --images 'gs://bucket/photos/*.jpg' --classes cat,dog  # bucket too

CLIP-like models (inference_spec kind "contrastive") classify zero-shot: each class name goes
through the prompt templates and the model's tokenizer, the class embedding is the mean of the
normalised prompt embeddings (as CLIP's zero-shot classifier), and the probabilities are
softmax(exp(logit_scale) * cosine) (sigmoid(exp(logit_scale) * cosine + logit_bias) for SigLIP,
as open_clip computes them). Classifiers give softmax(logits), named by the model's class names,
--classes, or indices. Images are read with PIL and converted to RGB, then preprocessed with
the model's own pp string (mmjax.pretrained.inference_spec; --pp overrides it). Files that do
not decode are reported and skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Callable, Sequence

import numpy as np

from mmjax import paths
from mmjax.data import image_folder

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def image_files(patterns: Sequence[str]) -> list[str]:
    """Files named by paths, glob patterns or folders (their images, recursively), in order; local
    or in a bucket (`gs://bucket/photos/*.jpg`, through `mmjax.paths`)."""
    files: list[str] = []
    for pattern in patterns:
        pattern = paths.expand(pattern)
        if paths.isdir(pattern):
            found = [p for p in image_folder.files_under(pattern) if image_folder.is_image_file(p)]
        elif glob.has_magic(pattern):
            matches = paths.glob(pattern)
            if paths.is_remote(pattern):     # one listing per folder, not a request per match
                objects = paths.existing_files(matches)
                found = [p for p in matches if p in objects]
            else:
                found = [p for p in matches if not paths.isdir(p)]
        else:
            found = [pattern]       # a missing file is reported with the unreadable ones
        if not found:
            raise FileNotFoundError(f"mmjax-predict: no image matches {pattern!r}")
        files += [p for p in found if p not in files]
    return files


class Classifier:
    """Class probabilities of decoded uint8 RGB images for one model (loaded once)."""

    def __init__(self, model_path: str, classes: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, *, step: int | None = None, pp: str | None = None):
        from mmjax import pretrained  # here, not at the top: `mmjax-predict --help` stays quick
        from mmjax.data.preprocess import Preprocess

        spec = pretrained.inference_spec(model_path, step=step)
        self.kind = spec["kind"]
        if self.kind not in ("contrastive", "classifier"):
            raise ValueError(f"mmjax-predict classifies with CLIP-like models and classifiers; {model_path} "
                             f"is neither (kind {self.kind!r})")
        pp = pp or spec["preprocess"]
        if not pp:
            raise ValueError(f"{model_path} records no image preprocessing; pass one, e.g. "
                             "--pp \"resize_small(224, 'bicubic')|central_crop(224)|normalize('clip')\"")
        self.pp = pp
        self._preprocess = Preprocess(pp)
        self.model, variables = pretrained.load(model_path, step=step)
        if self.kind == "contrastive":
            self.names = list(classes or spec["class_names"] or [])
            if not self.names:
                raise ValueError(f"{model_path} is a CLIP-like model: name the classes (--classes cat,dog "
                                 "or --classes-file FILE)")
            self.templates = list(templates or DEFAULT_TEMPLATES)
            self._scores = self._zeroshot_scores(spec, variables)
        else:
            self._scores = self._classifier_scores(variables)
            num = self.model.num_classes
            self.names = list(classes or spec["class_names"] or [str(i) for i in range(num)])
            if len(self.names) != num:
                raise ValueError(f"{model_path} has {num} classes, but {len(self.names)} class names were given")

    def _zeroshot_scores(self, spec: dict, variables: dict) -> Callable[[np.ndarray], np.ndarray]:
        import jax

        from mmjax.data.tokenizers import build_tokenizer
        from mmjax.evaluate import zeroshot

        if not spec["tokenizer"]:
            raise ValueError("this CLIP-like model records no tokenizer, so class prompts cannot be encoded")
        tokenizer = build_tokenizer(spec["tokenizer"])
        encode_text = jax.jit(lambda t: self.model.apply(variables, t, method="encode_text"))
        class_embs = zeroshot.class_embeddings(lambda p: np.asarray(encode_text(tokenizer(p))),
                                               self.names, self.templates)
        params = variables["params"]
        scale = float(np.exp(np.asarray(params["logit_scale"])))
        bias = float(np.asarray(params["logit_bias"])) if "logit_bias" in params else None
        encode_image = jax.jit(lambda x: self.model.apply(variables, x, method="encode_image"))

        def probs(images: np.ndarray) -> np.ndarray:
            logits = scale * zeroshot.normalize(np.asarray(encode_image(images), np.float32)) @ class_embs.T
            return _softmax(logits) if bias is None else 1 / (1 + np.exp(-(logits + bias)))
        return probs

    def _classifier_scores(self, variables: dict) -> Callable[[np.ndarray], np.ndarray]:
        import jax

        logits_fn = jax.jit(lambda x: self.model.apply(variables, x)["logits"])

        def probs(images: np.ndarray) -> np.ndarray:
            logits = np.asarray(logits_fn(images), np.float32)
            if logits.ndim != 2:
                raise ValueError(f"the model gives outputs of shape {logits.shape}, not (batch, classes) logits")
            return _softmax(logits)
        return probs

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self._preprocess({"image": image}, np.random.default_rng(0))["image"], np.float32)

    def probabilities(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """(N, classes) probabilities of decoded images, in fixed-size batches (one compiled shape)."""
        pixels = [self.preprocess(image) for image in images]
        if len({p.shape for p in pixels}) > 1:
            raise ValueError(f"the preprocessing {self.pp!r} gives images of different shapes "
                             f"{sorted({p.shape for p in pixels})}; it needs a crop or a resize to a fixed size")
        size = min(batch_size, len(pixels))
        out = []
        for start in range(0, len(pixels), size):
            chunk = pixels[start:start + size]
            batch = np.stack(chunk + [np.zeros_like(chunk[0])] * (size - len(chunk)))
            out.append(self._scores(batch)[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.names)), np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def read_images(paths: Sequence[str]) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    """(path, uint8 RGB image) of the files that decode, and (path, why) of those that do not."""
    good, bad = [], []
    for path in paths:
        try:
            good.append((path, image_folder.load_rgb(path)))
        except image_folder.DECODE_ERRORS as e:
            bad.append((path, f"{type(e).__name__}: {e}"))
    return good, bad


def predict(model_path: str, image_paths: Sequence[str], classes: Sequence[str] | None = None, top_k: int = 5,
            templates: Sequence[str] | None = None, *, step: int | None = None, pp: str | None = None,
            batch_size: int = 32) -> list[dict]:
    """One dict per image, in order: {"path", "top": [(class name, class index, probability), ...]}
    for images that decode, {"path", "error"} for those that do not."""
    good, bad = read_images(image_paths)
    results = {path: {"path": path, "error": why} for path, why in bad}
    if good:
        clf = Classifier(model_path, classes, templates, step=step, pp=pp)
        probs = clf.probabilities([image for _, image in good], batch_size)
        for (path, _), p in zip(good, probs):
            order = np.argsort(-p, kind="stable")[:top_k]
            results[path] = {"path": path, "top": [(clf.names[i], int(i), float(p[i])) for i in order]}
    return [results[path] for path in image_paths]


def evaluate_folder(model_path: str, image_dir: str, split: str | None = None,
                    classes: Sequence[str] | None = None, templates: Sequence[str] | None = None, *,
                    step: int | None = None, pp: str | None = None, batch_size: int = 32) -> dict:
    """Top-1 over a class-per-folder data set (mmjax.data.image_folder). CLIP-like models use the
    folder names (or `classes`) as class names; a classifier's class i is the i-th sorted folder."""
    from mmjax import pretrained
    from mmjax.data import sources

    data = {"name": "folder", "image_dir": image_dir, "split": split}
    source = sources.get_source(data)
    names = list(classes or sources.class_names(data))
    if len(names) != len(source.classes):
        raise ValueError(f"{image_dir} has {len(source.classes)} class folders, but {len(names)} classes were named")
    zero_shot = pretrained.inference_spec(model_path, step=step)["kind"] == "contrastive"
    clf = Classifier(model_path, names if zero_shot else classes, templates, step=step, pp=pp)
    if len(names) > len(clf.names):
        raise ValueError(f"{image_dir} has {len(names)} class folders, but the model has {len(clf.names)} classes")
    examples = [(source[i], source.labels[i]) for i in range(len(source))]
    readable = [(e["image"], label) for e, label in examples if e is not None]
    probs = clf.probabilities([image for image, _ in readable], batch_size)
    labels = np.asarray([label for _, label in readable])
    correct = probs.argmax(axis=1) == labels
    per_class = {names[c]: float(correct[labels == c].mean()) for c in range(len(names)) if (labels == c).any()}
    return {"top1": float(correct.mean()), "num_images": len(readable), "num_classes": len(names),
            "unreadable": len(examples) - len(readable), "per_class_top1": per_class}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmjax-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="mmjax model directory (mmjax-convert) or training workdir")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", help="image files, glob patterns (quoted) or folders")
    what.add_argument("--eval-folder", help="class-per-folder images (DIR/<class>/...): print top-1")
    p.add_argument("--split", help="with --eval-folder: read DIR/SPLIT/<class>/...")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", help="comma-separated class names, e.g. cat,dog,car")
    names.add_argument("--classes-file", help="class names, one per line")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--templates", nargs="+", help=f"prompt templates with {{}} (default: {DEFAULT_TEMPLATES[0]!r})")
    p.add_argument("--step", type=int, help="with a workdir: this checkpoint step (default: the newest good one)")
    p.add_argument("--pp", help="preprocessing pp string instead of the model's own")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise SystemExit("mmjax-predict: --top-k and --batch-size must be positive")
    classes = None
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif args.classes_file:
        from mmjax.evaluate.zeroshot import read_class_names
        classes = read_class_names(args.classes_file)
    common = dict(classes=classes, templates=args.templates, step=args.step, pp=args.pp, batch_size=args.batch_size)
    try:
        if args.eval_folder:
            result = evaluate_folder(args.model, args.eval_folder, args.split, **common)
            print(json.dumps(result) if args.json else
                  f"top-1 {result['top1']:.4f} over {result['num_images']} images of {result['num_classes']} "
                  f"classes ({result['unreadable']} unreadable skipped)")
            return
        results = predict(args.model, image_files(args.images), top_k=args.top_k, **common)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"mmjax-predict: {e}") from e
    for r in results:
        if "error" in r:
            print(f"skipped {r['path']}: {r['error']}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"path": r["path"], "top": [{"class": n, "index": i, "prob": p} for n, i, p in r["top"]]}))
        else:
            print(r["path"] + "\n" + "\n".join(f"  {p:.4f}  {n}" for n, _, p in r["top"]))
    skipped = sum("error" in r for r in results)
    if skipped:
        print(f"{skipped} of {len(results)} images could not be read", file=sys.stderr)


if __name__ == "__main__":
    main()
