"""mmjax: landmark vision and vision-language models as pure-functional Flax modules."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `mmjax.load(DIR)`: imported lazily so that `import mmjax` stays light.
    if name == "load":
        from mmjax.pretrained import load
        return load
    raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
