"""mmjax: landmark vision and vision-language models as pure-functional Flax modules."""

__version__ = "0.1.0"
