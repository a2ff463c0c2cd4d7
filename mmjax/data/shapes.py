"""`mmjax_shapes`: an embedded, procedurally generated image-caption data set (TFDS builder).

Each example is a coloured shape on a plain background with a varied English
caption; the class is colour x shape (24 classes such as "red circle"). It is
generated locally in seconds (no download), so tests, examples and smoke runs
of every model can train and zero-shot evaluate offline.

The features avoid encoded images and the files are array_record, so TFDS
writes and reads the data set without importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmjax.data import shapes_captions as captions
from mmjax.data import shapes_render as render

CLASS_NAMES: list[str] = captions.CLASS_NAMES
VOCAB: list[str] = captions.VOCAB
ZERO_SHOT_TEMPLATES: list[str] = captions.ZERO_SHOT_TEMPLATES
PUNCTUATION: list[str] = captions.PUNCTUATION
POSITION_NAMES: list[str] = [
    "top left", "top", "top right", "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]  # row-major over the 3x3 grid, as returned by `captions.position_name`

DEFAULT_NUM_TRAIN = 20_000
DEFAULT_NUM_TEST = 2_000
SPLIT_SEEDS = {"train": 1_234, "test": 98_765}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side length and split sizes; each combination gets its own directory."""

    image_size: int = 32
    num_train: int = DEFAULT_NUM_TRAIN
    num_test: int = DEFAULT_NUM_TEST


def shapes_config(
    image_size: int = 32,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
) -> ShapesConfig:
    """Returns the config for an image size and split sizes, e.g. name "32px" or "32px_200_50"."""
    if image_size < 8:
        raise ValueError(f"mmjax_shapes: image_size must be >= 8, got {image_size}")
    if num_train < 1 or num_test < 1:
        raise ValueError(f"mmjax_shapes: split sizes must be >= 1, got {num_train}, {num_test}")
    name = f"{image_size}px"
    if (num_train, num_test) != (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST):
        name += f"_{num_train}_{num_test}"
    return ShapesConfig(
        name=name,
        description=f"{image_size}x{image_size} images, {num_train} train / {num_test} test",
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
    )


def generate_example(index: int, seed: int, image_size: int) -> dict:
    """Example `index` of the split seeded with `seed`; a pure function of its arguments.

    Classes cycle with the index, so every split is balanced; the order on
    disk is shuffled by TFDS anyway.
    """
    rng = np.random.default_rng((seed, index))
    label = index % len(CLASS_NAMES)
    scene = render.sample_scene(rng, label)
    return {
        "image": render.render_scene(scene, image_size),
        "label": label,
        "caption": captions.make_caption(scene, rng),
        "color": scene.color,
        "shape": scene.shape,
        "size": scene.size,
        "position": scene.row * 3 + scene.column,
    }


class MmjaxShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes with captions; configs "32px" (default) and "64px"."""

    VERSION = tfds.core.Version("1.1.0")  # Bump when generation changes: copies are reused.
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Larger shapes: small ones are legible at 32 px."}
    BUILDER_CONFIGS = [shapes_config(32), shapes_config(64)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup needs the `importlib_resources` backport on Python >= 3.9.
        return epath.Path(__file__)

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(
                    shape=(size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                ),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "caption": tfds.features.Text(),
                "color": tfds.features.ClassLabel(names=list(render.COLORS)),
                "shape": tfds.features.ClassLabel(names=list(render.SHAPES)),
                "size": tfds.features.ClassLabel(names=list(render.SIZES)),
                "position": tfds.features.ClassLabel(names=POSITION_NAMES),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):  # dl_manager unused: nothing is downloaded.
        config = self.builder_config
        return {
            "train": self._generate_examples(config.num_train, SPLIT_SEEDS["train"]),
            "test": self._generate_examples(config.num_test, SPLIT_SEEDS["test"]),
        }

    def _generate_examples(self, num_examples: int, seed: int):
        size = self.builder_config.image_size
        for index in range(num_examples):
            yield index, generate_example(index, seed, size)


def prepare(
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int = 32,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
) -> MmjaxShapes:
    """Returns the builder, generating the data into `data_dir` first if needed.

    `data_dir=None` means the TFDS default (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    """
    config = shapes_config(image_size, num_train, num_test)
    # Predefined configs go by name: TFDS rejects a copy of a registered config,
    # which is what a data source unpickled in a grain worker would otherwise hold.
    name_or_config = config.name if config.name in MmjaxShapes.builder_configs else config
    builder = MmjaxShapes(data_dir=data_dir, config=name_or_config)
    try:
        builder.download_and_prepare()  # A no-op when the files already exist.
    except OSError:
        # Another process sharing data_dir may have finished first (its rename wins).
        builder = MmjaxShapes(data_dir=data_dir, config=name_or_config)
        if not builder.is_prepared():
            raise
    return builder
