"""The `vqa_folder` source (mmjax.data.vqa_folder): JSONL questions over a folder of images, answers
padded for batching, bad lines and missing images skipped and counted, and the pp strings of the
VQA v2 recipes run over it in the eval and training pipelines."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax.data import pipeline, shapes, sources
from mmjax.data.preprocess import Preprocess
from mmjax.data.tokenizers import build_tokenizer
from mmjax.evaluate import vqa_score
from mmjax.evaluate.drivers import vqa as vqa_driver

VQA_V2 = ["red"] * 7 + ["dark red", "red", "Red."]
LINES = [   # (image file, PIL mode, question, answers, size)
    ("a.png", "RGB", "what colour is the shape?", VQA_V2, 32),
    ("sub/b.jpg", "L", "where is it?", ["top left", "left", "top left"], 24),
    ("c.png", "RGBA", "what shape is it?", "circle", 40),
    ("d.jpeg", "CMYK", "is it small?", ["yes", "", "yes"], 32),
]


def _write_image(root, name: str, mode: str, size: int, index: int) -> None:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(shapes.generate_example(index, seed=0, image_size=32)["image"]).resize((size, size + 2))
    image.convert(mode).save(path)


def _write_jsonl(path, entries) -> str:
    with open(path, "w") as f:
        for entry in entries:
            f.write(entry if isinstance(entry, str) else json.dumps(entry))
            f.write("\n")
    return str(path)


@pytest.fixture(scope="module")
def folder(module_tmp):
    """Four questions on grey/RGB/RGBA/CMYK images of several sizes, each with an id and a type."""
    root = module_tmp("vqa")
    for i, (name, mode, _, _, size) in enumerate(LINES):
        _write_image(root / "images", name, mode, size, i)
    questions = _write_jsonl(root / "questions.jsonl", [
        {"image": name, "question": q, "answers": a, "question_id": 100 + i, "question_type": q.split()[0]}
        for i, (name, _, q, a, _) in enumerate(LINES)])
    return {"name": "vqa_folder", "image_dir": str(root / "images"), "questions": questions}


def test_examples_hold_rgb_images_questions_and_padded_answers(folder):
    source = sources.get_source(folder)
    assert len(source) == sources.num_examples(folder) == 4 and source.skipped == {}
    assert sources.class_names(folder) is None
    for i, (_, _, question, answers, size) in enumerate(LINES):
        example = source[i]
        assert set(example) == {"image", "question", "answers", "question_id", "question_type"}
        assert example["image"].dtype == np.uint8 and example["image"].shape == (size + 2, size, 3)
        assert example["question"] == question
        assert example["question_id"] == 100 + i and example["question_type"] == question.split()[0]
        given = [answers] if isinstance(answers, str) else [a for a in answers if a]
        assert example["answers"] == given + [""] * (10 - len(given))
    original = np.asarray(Image.open(os.path.join(folder["image_dir"], "a.png")))
    np.testing.assert_array_equal(source[0]["image"], original)
    grey = np.asarray(Image.open(os.path.join(folder["image_dir"], "sub/b.jpg")))
    np.testing.assert_array_equal(source[1]["image"], np.repeat(grey[..., None], 3, axis=-1))


def test_padding_is_invisible_to_the_vqa_score(folder):
    example = sources.get_source(folder)[1]
    humans = vqa_driver.human_answers(np.asarray(example["answers"]), 0, "vqa", "answers")
    assert humans == ["top left", "left", "top left"]
    assert vqa_score.vqa_accuracy("top left", humans) == pytest.approx(vqa_score.leave_one_out_score(2, 3))


def test_longer_answer_lists_set_the_padded_length_and_partial_fields_are_left_out(tmp_path, caplog):
    _write_image(tmp_path, "a.png", "RGB", 32, 0)
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        {"image": "a.png", "question": "what?", "answers": [f"x{i}" for i in range(12)], "question_id": 1},
        {"image": "a.png", "question": "why?", "answers": ["y"]}])
    with caplog.at_level(logging.WARNING):
        source = sources.get_source({"name": "vqa_folder", "image_dir": str(tmp_path), "questions": questions})
    assert [len(source[i]["answers"]) for i in range(2)] == [12, 12]
    assert "question_id" not in source[0] and "'question_id' is on 1 of 2 usable lines" in caplog.text


def test_bad_lines_and_missing_images_are_skipped_and_counted(tmp_path, caplog):
    _write_image(tmp_path, "a.png", "RGB", 32, 0)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good = {"image": "a.png", "question": "what colour?", "answers": ["red"]}
    questions = _write_jsonl(tmp_path / "q.jsonl", [
        good, "{not json", {"image": "gone.png", "question": "q?", "answers": ["a"]},
        {"image": "a.png", "answers": ["a"]}, {"image": "a.png", "question": "q?", "answers": []},
        {"image": "a.png", "question": "q?", "answers": [3]}, {"question": "q?", "answers": ["a"]}, "",
        {"image": "broken.jpg", "question": "q?", "answers": ["a"]}])
    with caplog.at_level(logging.WARNING):
        source = sources.get_source({"name": "vqa_folder", "image_dir": str(tmp_path), "questions": questions})
    assert len(source) == 2
    assert source.skipped == {"invalid JSON": 1, "missing image": 1, "no question": 1, "no answer": 2,
                              "no image": 1}
    assert "skipped 6 of 8 lines" in caplog.text and "line 2: invalid JSON" in caplog.text
    assert source[1] is None and source.unreadable == 1   # the corrupt image, reported when read
    assert source[0]["answers"][0] == "red"


def test_unusable_input_fails_before_anything_compiles(tmp_path):
    _write_image(tmp_path, "a.png", "RGB", 32, 0)
    config = {"name": "vqa_folder", "image_dir": str(tmp_path)}
    bad = _write_jsonl(tmp_path / "bad.jsonl", ['{"image": "a.png"', {"image": "a.png", "question": "q?"}])
    with pytest.raises(ValueError, match=r"no usable line .*1 invalid JSON, 1 no answer; e\.g\. line 1: invalid JSON"):
        sources.get_source({**config, "questions": bad})
    with pytest.raises(ValueError, match="has no examples"):
        sources.get_source({**config, "questions": _write_jsonl(tmp_path / "empty.jsonl", [])})
    with pytest.raises(ValueError, match="needs a 'questions' entry"):
        sources.get_source(config)
    with pytest.raises(FileNotFoundError, match="questions file"):
        sources.get_source({**config, "questions": str(tmp_path / "nope.jsonl")})
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        sources.get_source({**config, "image_dir": str(tmp_path / "nope"), "questions": bad})


def _recipe(path: str, **args):
    from mmjax import configs

    arg = ",".join(f"{k}={v}" for k, v in args.items())
    return configs.load_config(f"{path}:{arg}" if arg else path)


@pytest.mark.parametrize("recipe", ["experiments/vilt/vqa_v2.py", "experiments/blip/vqa_v2.py"])
def test_recipes_eval_pp_batches_the_questions(folder, recipe):
    """The recipe's (non-smoke) eval pp string through eval_batches, with the shapes vocabulary."""
    cfg = _recipe(recipe, image_dir=folder["image_dir"], test_questions=folder["questions"])
    tokenizer = build_tokenizer(dict(name="shapes_wordpiece", context_length=16))
    batches = list(pipeline.eval_batches(folder, cfg.evals.vqa.pp, 3, tokenizer=tokenizer))
    assert len(batches) == 2 and batches[1]["mask"].tolist() == [True, False, False]
    size = 384 if "vilt" in recipe else 480
    batch = batches[0]
    assert batch["image"].shape == (3, size, size, 3) and batch["text"].shape == (3, 16)
    assert batch["answers"].shape == (3, 10) and batch["answers"][2].tolist() == ["circle"] + [""] * 9
    assert tokenizer.decode(batch["text"][1]) == "where is it?"


def test_recipes_training_pp_on_one_example(folder, tmp_path):
    """ViLT's soft-score targets and BLIP's tokenized answers, whose "" padding the task weighs 0."""
    from mmjax.tasks.blip_finetune import BlipVqaTask

    tokenizer = build_tokenizer(dict(name="shapes_wordpiece", context_length=16))
    answer_list = tmp_path / "answers.txt"
    answer_list.write_text("blue\nred\ntop left\ncircle\n")
    vilt = _recipe("experiments/vilt/vqa_v2.py", answers=str(answer_list))
    example = sources.get_source(folder)[0]
    out = Preprocess(vilt.input.pp.replace("384", "32"), tokenizer)(dict(example), np.random.default_rng(0))
    np.testing.assert_allclose(out["vqa_targets"], [0, 1, 0, 0])   # "red" 9 times ("Red." normalised)

    blip = _recipe("experiments/blip/vqa_v2.py", smoke=True)
    blip.input.pp = _recipe("experiments/blip/vqa_v2.py").input.pp.replace("480", "32")
    example = sources.get_source(folder)[1]
    out = Preprocess(blip.input.pp, tokenizer)(dict(example), np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and out["answer_tokens"].shape == (10, 16)
    task = BlipVqaTask(blip)
    _, _, weights = task.answer_inputs({"answer_tokens": jnp.asarray(out["answer_tokens"][None])})
    np.testing.assert_allclose(weights[0], [1 / 3] * 3 + [0] * 7, rtol=1e-6)
