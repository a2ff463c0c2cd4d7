"""The captioning evaluator with a stand-in task whose caption() returns known token ids: the
reference caption (BLEU-4 1, attributes all named) or another image's (scores checked against
pycocoevalcap called here, attribute accuracy against the data's own fields)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from mmjax import sharding
from mmjax.data import shapes_captions, shapes_render, sources, tokenizers
from mmjax.evaluate import runner
from mmjax.evaluate.captioning_metrics import tokenize_caption
from mmjax.evaluate.drivers import captioning

N = 24
DATA = {"name": "mmjax_shapes", "split": "test"}
ATTRIBUTES = {"color": list(shapes_render.COLORS),
              "shape": [shapes_captions.SHAPE_WORDS[s] for s in shapes_render.SHAPES]}


def _row_of(keys, images):
    return jnp.argmax((images.reshape(len(images), -1)[:, None, :] == keys[None]).all(-1), axis=1)


_lookup = jax.jit(lambda p, x: p["ids"][_row_of(p["image_keys"], x)])


class CaptionTableTask:
    """caption() returns row `ids[i]` for the image of example i; records the settings it got."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.config = ConfigDict({"task": "table"})
        self.settings = []

    def caption(self, params, images, settings):
        self.settings.append(settings)
        return _lookup(params, images)


@pytest.fixture(scope="module")
def data():
    tokenizer = tokenizers.build_tokenizer({"name": "shapes_wordpiece", "context_length": 32})
    source = sources.get_source(DATA)
    examples = [source[i] for i in range(N)]
    images = np.stack([e["image"] for e in examples]).reshape(N, -1).astype(np.int32)
    assert len({im.tobytes() for im in images}) == N
    captions = [e["caption"] for e in examples]
    ids = tokenizer(captions)[:, 1:]           # no [CLS]: generated ids start after the prompt
    fields = {k: np.asarray([e[k] for e in examples]) for k in ATTRIBUTES}
    return tokenizer, images, ids, captions, fields


def _cfg(**options):
    return ConfigDict({**dict(data=DATA, pp="keep('image', 'caption', 'color', 'shape')", batch_size=16,
                              max_examples=N), **options})


def _run(data, ids, **options):
    tokenizer, images = data[0], data[1]
    task = CaptionTableTask(tokenizer)
    params = {"image_keys": jnp.asarray(images), "ids": jnp.asarray(ids)}
    return captioning.run(task, params, sharding.make_mesh([("data", -1)]), _cfg(**options), "cap"), task


def _coco(predictions, references):
    gts = {i: [tokenize_caption(r)] for i, r in enumerate(references)}
    res = {i: [tokenize_caption(p)] for i, p in enumerate(predictions)}
    return Bleu(4).compute_score(gts, res, verbose=0)[0][3], Cider().compute_score(gts, res)[0]


def test_the_reference_caption_scores_bleu4_one_and_names_every_attribute(data):
    tokenizer, _, ids, captions, _ = data
    got, task = _run(data, ids, attribute_words=ATTRIBUTES)
    bleu4, cider = _coco(tokenizer.decode(ids), captions)
    assert got["cap/bleu4"] == pytest.approx(1.0, abs=1e-6) == pytest.approx(bleu4)
    assert got["cap/cider"] == pytest.approx(cider) and cider > 5
    assert got["cap/color_accuracy"] == 1.0 and got["cap/shape_accuracy"] == 1.0
    assert task.settings and all(s == {} for s in task.settings)      # the task's own defaults


def test_another_images_caption_scores_low(data):
    tokenizer, _, ids, captions, fields = data
    shifted = np.roll(ids, 1, axis=0)
    got, task = _run(data, shifted, attribute_words=ATTRIBUTES, generation={"max_new_tokens": 12, "do_sample": True})
    bleu4, cider = _coco(tokenizer.decode(shifted), captions)
    assert got["cap/bleu4"] == pytest.approx(bleu4) and got["cap/cider"] == pytest.approx(cider)
    assert cider < 1.5 and bleu4 < 0.5
    for field in ATTRIBUTES:
        assert got[f"cap/{field}_accuracy"] == pytest.approx(np.mean(np.roll(fields[field], 1) == fields[field]))
    assert all(s == {"max_new_tokens": 12, "do_sample": True} for s in task.settings)


def test_a_caption_naming_nothing_has_attribute_accuracy_zero(data):
    tokenizer = data[0]
    nothing = np.repeat(tokenizer(["a shape on a background"])[:, 1:], N, axis=0)
    got, _ = _run(data, nothing, attribute_words=ATTRIBUTES)
    assert got["cap/color_accuracy"] == 0.0 and got["cap/shape_accuracy"] == 0.0 and got["cap/cider"] < 0.5


def test_bad_settings_and_empty_splits_are_named(data):
    with pytest.raises(ValueError, match=r"evals\.cap\.generation: unknown key\(s\) \['beams'\]"):
        _run(data, data[2], generation={"beams": 3})
    with pytest.raises(ValueError, match=r"evals\.cap: the evaluation split has no examples"):
        _run(data, data[2], max_examples=0)
    with pytest.raises(ValueError, match=r"evals\.cap: no 'caption' in the evaluation batch"):
        _run(data, data[2], pp="keep('image')")
    with pytest.raises(ValueError, match=r"evals\.cap \(kind 'captioning'\): unknown key\(s\) \['references'\]"):
        runner.evaluators(ConfigDict({"cap": dict(kind="captioning", data=DATA, pp="keep('image')",
                                                  references="caption")}))
