"""ConvNeXt V2 for the Hugging Face ecosystem, with FCMAE masked image modeling.

Importing this package registers its classes for the ``convnextv2`` model type in transformers' Auto
classes (``AutoConfig``, ``AutoModel``, ``AutoModelForImageClassification``,
``AutoModelForMaskedImageModeling``, ``AutoBackbone``, ``AutoImageProcessor``), so every convnextv2
checkpoint, including those saved by stock transformers, loads into the classes below.
"""

import transformers

from .configuration_convnextv2 import PRESETS, ConvNextV2Config
from .image_processing_convnextv2 import ConvNextV2ImageProcessor, ConvNextV2ImageProcessorPil
from .modeling_convnextv2 import (
    ConvNextV2Backbone,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2MaskedImageModelingOutput,
    ConvNextV2Model,
    ConvNextV2PreTrainedModel,
)

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    # exist_ok=True takes the built-in slots on purpose: our classes are drop-in replacements. Both our config
    # and the stock one are keys, so `from_config(stock_config)` also builds our classes.
    transformers.AutoConfig.register("convnextv2", ConvNextV2Config, exist_ok=True)
    for auto_class, model_class in (
        (transformers.AutoModel, ConvNextV2Model),
        (transformers.AutoModelForImageClassification, ConvNextV2ForImageClassification),
        (transformers.AutoModelForMaskedImageModeling, ConvNextV2ForMaskedImageModeling),
        (transformers.AutoBackbone, ConvNextV2Backbone),
    ):
        for config_class in (ConvNextV2Config, transformers.ConvNextV2Config):
            auto_class.register(config_class, model_class, exist_ok=True)
    processors = {"torchvision": ConvNextV2ImageProcessor, "pil": ConvNextV2ImageProcessorPil}
    for config_class in (ConvNextV2Config, transformers.ConvNextV2Config):
        transformers.AutoImageProcessor.register(config_class, image_processor_classes=processors, exist_ok=True)


_register_auto_classes()

__all__ = [
    "PRESETS",
    "ConvNextV2Backbone",
    "ConvNextV2Config",
    "ConvNextV2ForImageClassification",
    "ConvNextV2ForMaskedImageModeling",
    "ConvNextV2ImageProcessor",
    "ConvNextV2ImageProcessorPil",
    "ConvNextV2MaskedImageModelingOutput",
    "ConvNextV2Model",
    "ConvNextV2PreTrainedModel",
    "__version__",
]
