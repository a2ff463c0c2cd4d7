"""mmjax: landmark vision and vision-language models as pure-functional Flax modules."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `mmjax.load(DIR)`: imported lazily so that `import mmjax` stays light.
    if name == "load":
        from mmjax.pretrained import load
        return load
    if name == "pretrained":   # mmjax.pretrained.inference_spec(...) without an import of its own
        import importlib
        return importlib.import_module("mmjax.pretrained")
    raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
