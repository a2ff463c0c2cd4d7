"""Data: the embedded `mmjax_shapes` data set, data sources, preprocessing and grain pipelines.

Modules: `shapes` (TFDS builder, CLASS_NAMES, VOCAB, ZERO_SHOT_TEMPLATES),
`sources` (data config -> random-access source), `preprocess` (pp strings),
`pipeline` (train loader and eval batches).
"""

from mmjax.data.pipeline import eval_batches, make_train_loader
from mmjax.data.preprocess import Preprocess
from mmjax.data.sources import class_names, get_source, num_examples

__all__ = [
    "Preprocess",
    "class_names",
    "eval_batches",
    "get_source",
    "make_train_loader",
    "num_examples",
]
