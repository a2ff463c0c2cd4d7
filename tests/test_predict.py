"""mmjax-predict: zero-shot probabilities of a CLIP converted from open_clip equal open_clip's own,
a trained ViT run's predictions equal the argmax of its logits, bad files are reported and
skipped, and a labelled folder gives top-1."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmjax import predict as predict_lib
from mmjax.data import shapes

CLASSES = ["red circle", "green square", "blue star", "yellow cross"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
OPEN_CLIP_TINY = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def photos(module_tmp):
    """Shapes images of several sizes and modes, in class folders, plus a corrupt file and a note."""
    root = module_tmp("photos")
    for i in range(8):
        name = CLASSES[i % 4]
        example = shapes.generate_example(shapes.CLASS_NAMES.index(name) + 24 * i, 7, 48)
        image = Image.fromarray(example["image"]).resize((48 + 8 * (i % 3), 48))
        os.makedirs(root / name.replace(" ", "_"), exist_ok=True)
        image.convert("L" if i == 5 else "RGB").save(root / name.replace(" ", "_") / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "red_circle" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "red_circle" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def converted_clip(module_tmp):
    """(open_clip model with random weights, its mmjax model directory)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from mmjax.convert import api

    tmp = module_tmp("open_clip")
    torch.manual_seed(0)
    ref = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(**OPEN_CLIP_TINY["vision_cfg"]),
                         text_cfg=open_clip.CLIPTextCfg(**OPEN_CLIP_TINY["text_cfg"])).eval()
    with torch.no_grad():     # norms and biases away from 1 / 0, so that a mis-mapped one shows
        for p in ref.parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape))
    (tmp / "tiny.json").write_text(json.dumps(OPEN_CLIP_TINY))
    save_file(ref.state_dict(), str(tmp / "tiny.safetensors"))
    api.import_checkpoint("open_clip", str(tmp / "tiny.safetensors"), str(tmp / "mm"), str(tmp / "tiny.json"))
    return ref, str(tmp / "mm")


def _open_clip_probs(ref, pixels: np.ndarray) -> np.ndarray:
    """open_clip's zero-shot classifier (mean of normalised template embeddings) and probabilities."""
    import open_clip
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        weights = []
        for name in CLASSES:
            tokens = open_clip.tokenize([t.format(name) for t in TEMPLATES], context_length=16)
            weights.append(F.normalize(F.normalize(ref.encode_text(tokens), dim=-1).mean(0), dim=-1))
        image = F.normalize(ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2))), dim=-1)
        return (ref.logit_scale.exp() * image @ torch.stack(weights).T).softmax(-1).numpy()


def _preprocessed(model_path, paths):
    """The model's own preprocessing (inference_spec) of the images, as a batch."""
    from mmjax import pretrained
    from mmjax.data.preprocess import Preprocess

    pp = Preprocess(pretrained.inference_spec(model_path)["preprocess"])
    return np.stack([pp({"image": predict_lib.image_folder.load_rgb(p)})["image"] for p in paths]).astype(np.float32)


def test_zeroshot_equals_open_clip(converted_clip, photos, capsys):
    ref, model_dir = converted_clip
    paths = predict_lib.image_files([os.path.join(photos, "*", "*")])
    assert len(paths) == 10 and paths[0].endswith("blue_star/2.png")
    results = predict_lib.predict(model_dir, paths, CLASSES, top_k=4, templates=TEMPLATES)
    assert [r["path"] for r in results] == paths
    bad = [r for r in results if "error" in r]
    assert [os.path.basename(r["path"]) for r in bad] == ["corrupt.png", "notes.txt"]
    good = [r for r in results if "error" not in r]
    got = np.zeros((len(good), len(CLASSES)))
    for row, r in zip(got, good):
        for name, index, prob in r["top"]:
            assert CLASSES[index] == name
            row[index] = prob
        assert [p for *_, p in r["top"]] == sorted(row, reverse=True)
    # The same pixels through open_clip: the model's own preprocessing, from inference_spec.
    pixels = _preprocessed(model_dir, [r["path"] for r in good])
    assert pixels.shape == (8, 32, 32, 3)
    want = _open_clip_probs(ref, pixels)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()      # measured: 6.9e-7
    assert len(set(want.argmax(1).tolist())) > 1            # not one class for every image

    predict_lib.main(["--model", model_dir, "--images", os.path.join(photos, "*", "*"), "--classes", ",".join(CLASSES),
                      "--templates", *TEMPLATES, "--top-k", "2", "--json"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["path"], [t["class"] for t in x["top"]]) for x in lines] == [
        (r["path"], [n for n, *_ in r["top"][:2]]) for r in good]
    assert "skipped" in err and "corrupt.png" in err and "2 of 10 images could not be read" in err


def test_eval_folder_top1(converted_clip, photos, tmp_path):
    _, model_dir = converted_clip
    result = predict_lib.evaluate_folder(model_dir, photos, templates=TEMPLATES)
    folders = sorted(os.listdir(photos))
    paths = [os.path.join(photos, f, n) for f in folders for n in sorted(os.listdir(os.path.join(photos, f)))
             if not n.endswith((".txt", "corrupt.png"))]
    names = [f.replace("_", " ") for f in folders]
    predicted = [r["top"][0][1] for r in predict_lib.predict(model_dir, paths, names, 1, TEMPLATES)]
    truth = [folders.index(os.path.basename(os.path.dirname(p))) for p in paths]
    assert result["top1"] == pytest.approx(np.mean(np.equal(predicted, truth)))
    assert (result["num_images"], result["num_classes"], result["unreadable"]) == (8, 4, 1)


def test_bad_input(converted_clip, photos, tmp_path, monkeypatch):
    _, model_dir = converted_clip
    with pytest.raises(FileNotFoundError, match="no image matches .*nothing"):
        predict_lib.image_files([str(tmp_path / "nothing*.jpg")])
    assert len(predict_lib.image_files([photos])) == 9               # a folder: its image files
    with pytest.raises(ValueError, match="CLIP-like model: name the classes"):
        predict_lib.predict(model_dir, [os.path.join(photos, "red_circle", "0.png")])
    with pytest.raises(ValueError, match="different shapes"):
        predict_lib.predict(model_dir, predict_lib.image_files([photos]), CLASSES, pp="value_range(-1, 1)")
    from mmjax import pretrained
    monkeypatch.setattr(pretrained, "inference_spec", lambda path, step=None: {
        "kind": "other", "preprocess": None, "tokenizer": None, "class_names": None})
    with pytest.raises(ValueError, match="neither \\(kind 'other'\\)"):
        predict_lib.predict(model_dir, [os.path.join(photos, "red_circle", "0.png")], CLASSES)
    with pytest.raises(SystemExit, match="no image matches"):
        predict_lib.main(["--model", model_dir, "--images", str(tmp_path / "none.*")])


def test_trained_vit_run(shapes_vit_run, photos):
    """A short ViT run on the shapes data (the session's, tests/conftest.py): the predicted class
    is the argmax of its logits."""
    import jax

    import mmjax
    from mmjax import pretrained

    run = shapes_vit_run.workdir
    paths = predict_lib.image_files([photos])
    results = [r for r in predict_lib.predict(run, paths, top_k=3) if "error" not in r]
    spec = pretrained.inference_spec(run)
    assert spec["kind"] == "classifier"
    model, variables = mmjax.load(run)
    pixels = _preprocessed(run, [r["path"] for r in results])
    logits = np.asarray(jax.jit(model.apply)(variables, pixels)["logits"])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    names = spec["class_names"] or [str(i) for i in range(24)]
    for r, row in zip(results, probs):
        assert [i for _, i, _ in r["top"]] == np.argsort(-row, kind="stable")[:3].tolist()
        assert [n for n, *_ in r["top"]] == [names[i] for _, i, _ in r["top"]]
        assert np.allclose([p for *_, p in r["top"]], np.sort(row)[::-1][:3], atol=1e-5)
