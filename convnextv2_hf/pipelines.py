"""``pipeline("image-classification")`` and ``pipeline("image-feature-extraction")`` that see the processor's pixels.

transformers' pipelines run every path, URL and PIL image through ``transformers.image_utils.load_image`` before
the image processor sees it; that loader applies EXIF orientation but converts with PIL's ``convert("RGB")``, which
clips 16-bit and float images (a 16-bit photo turns white) and drops alpha. An image processor that says it reads
image sources itself (``reads_image_sources = True``, as this package's processors do) gets them untouched here,
so ``pipeline(...)("scan.png")`` gives exactly the pixels of ``processor("scan.png")`` (the package's one image
rule, ``image_loading``). URLs and base64 strings are fetched or decoded to bytes the way ``load_image`` does and
handed over the same way. With any other image processor the pipelines are transformers' own, unchanged.

``register_pipelines`` puts the two classes in transformers' pipeline registry (``PIPELINE_REGISTRY``, the public
registry ``pipeline()`` looks tasks up in) in place of transformers' classes, keeping every other field of the
task's entry (its model classes, default model, type).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.error
import urllib.request

from transformers.pipelines.image_classification import ImageClassificationPipeline
from transformers.pipelines.image_feature_extraction import ImageFeatureExtractionPipeline

from .compat_convnextv2 import replace_pipeline_class


def reads_image_sources(image_processor) -> bool:
    """Whether ``image_processor`` decodes paths and PIL images by its own rule (see the module docstring)."""
    return bool(getattr(image_processor, "reads_image_sources", False))


def image_source(image, timeout: float | None = None):
    """What the processor is given for one pipeline input: a local path or a PIL image as it is; an http(s) URL
    fetched, and a base64 string (or ``data:image/...;base64,`` URI) decoded, to the file's bytes."""
    if not isinstance(image, str) or os.path.isfile(image):
        return image
    if image.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(image, timeout=timeout) as response:  # follows redirects
                return response.read()
        except urllib.error.HTTPError as error:
            raise ValueError(f"cannot fetch the image {image!r}: HTTP {error.code}") from None
        except (urllib.error.URLError, OSError) as error:
            raise ValueError(f"cannot fetch the image {image!r}: {error}") from None
    encoded = image.split(",", 1)[1] if image.startswith("data:image/") else image
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        shown = image if len(image) <= 200 else image[:200] + "..."
        raise ValueError(
            f"not an image source: {shown!r} is neither an image file, an http(s) URL nor base64-encoded image data"
        ) from None


class ConvNextV2ImageClassificationPipeline(ImageClassificationPipeline):
    """transformers' image-classification pipeline; images go to a processor that reads image sources untouched."""

    def preprocess(self, image, timeout=None):
        if not reads_image_sources(self.image_processor):
            return super().preprocess(image, timeout=timeout)
        model_inputs = self.image_processor(images=image_source(image, timeout), return_tensors="pt")
        return model_inputs.to(self.dtype)


class ConvNextV2ImageFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    """transformers' image-feature-extraction pipeline; images go to a processor that reads image sources
    untouched."""

    def preprocess(self, image, timeout=None, **image_processor_kwargs):
        if not reads_image_sources(self.image_processor):
            return super().preprocess(image, timeout=timeout, **image_processor_kwargs)
        source = image_source(image, timeout)
        model_inputs = self.image_processor(source, return_tensors="pt", **image_processor_kwargs)
        return model_inputs.to(self.dtype)


PIPELINES = {
    "image-classification": ConvNextV2ImageClassificationPipeline,
    "image-feature-extraction": ConvNextV2ImageFeatureExtractionPipeline,
}


def register_pipelines() -> None:
    """Make ``pipeline("image-classification")`` and ``pipeline("image-feature-extraction")`` build the classes above.

    Only the ``impl`` of each task's registry entry changes. (``PIPELINE_REGISTRY.register_pipeline`` would also
    mark the class as custom code, and ``Pipeline.save_pretrained`` would then write a ``custom_pipelines`` entry
    and copy this module beside the weights, so that stock transformers would refuse the saved folder without
    ``trust_remote_code``.) Idempotent.
    """
    for task, pipeline_class in PIPELINES.items():
        replace_pipeline_class(task, pipeline_class)


__all__ = [
    "ConvNextV2ImageClassificationPipeline",
    "ConvNextV2ImageFeatureExtractionPipeline",
    "image_source",
    "reads_image_sources",
    "register_pipelines",
]
