"""Image processors whose defaults are the official ConvNeXt V2 evaluation transform.

Official eval transform (OFFICIAL.md): ImageNet default mean/std, bicubic; for size < 384 the shorter side is
resized to int(size / crop_pct) (crop_pct 0.875) and the centre size x size is cropped; for size >= 384 the
image is resized straight to size x size (warp). transformers' ConvNeXt processors implement exactly this
resize rule but default to mean/std 0.5 and 384 px, and place the centre crop one pixel off the official
one when the margin is odd. Ours subclass them, changing the defaults and the crop placement.

Saved processors load with stock transformers alone: for the ``convnextv2`` model type it falls back to its
built-in ConvNeXt processor with our saved values (mean, std, size, crop_pct, bicubic), which gives the same
pixels except for that one-pixel crop shift on images with an odd margin at sizes below 384. (An ``auto_map``
would make stock transformers refuse to load the folder without ``trust_remote_code``, so we write none, and
no class name either, see ``to_dict``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
)
from transformers.models.convnext.image_processing_convnext import ConvNextImageProcessor
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

EVAL_CROP_PCT = 0.875


def check_images(images) -> list:
    """The images as a list; ``ValueError`` naming the problem for an empty batch, an empty image or a
    non-image object. Accepts PIL images, (H, W[, C]) / (C, H, W) arrays and tensors, and lists of them."""
    batch = list(images) if isinstance(images, Sequence) and not isinstance(images, str) else [images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        batch = list(images)
    if not batch:
        raise ValueError("the batch of images is empty")
    for index, image in enumerate(batch):
        if isinstance(image, PIL.Image.Image):
            size = image.size
        elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3):
            size = tuple(image.shape)
        else:
            kind = f"{type(image).__name__} with shape {tuple(image.shape)}" if hasattr(image, "shape") else repr(image)
            raise ValueError(f"image {index} is not an image (PIL image, array or tensor), got {kind[:200]}")
        if 0 in size:
            raise ValueError(f"image {index} has no pixels (size {size})")
    return batch


class _OfficialEvalDefaults:
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 224}
    crop_pct = EVAL_CROP_PCT
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    default_to_square = False

    def preprocess(self, images, *args, **kwargs):
        """As the ConvNeXt processors, after checking the input (see ``check_images``)."""
        return super().preprocess(check_images(images), *args, **kwargs)

    def to_dict(self) -> dict:
        # No class name in preprocessor_config.json: AutoImageProcessor then picks the processor registered for
        # the folder's model type, ours when this package is imported and transformers' ConvNeXt one otherwise
        # (a name it does not know would make stock transformers refuse the folder).
        output = super().to_dict()
        output.pop("image_processor_type", None)
        return output

    def resize(self, image, size: SizeDict, resample, crop_pct: float | None = None, **kwargs):
        """The official rule: shorter side to int(S / crop_pct) then centre crop S x S when S < 384, else warp."""
        edge = size.shortest_edge
        if not edge:
            raise ValueError(f"size must have a 'shortest_edge' key, got {dict(size)}")
        plain_resize = self._backend.resize
        if edge >= 384:
            return plain_resize(self, image, SizeDict(height=edge, width=edge), resample=resample, **kwargs)
        crop_pct = self.crop_pct if crop_pct is None else crop_pct
        height, width = get_resize_output_image_size(
            image, size=int(edge / crop_pct), default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
        image = plain_resize(self, image, SizeDict(height=height, width=width), resample=resample, **kwargs)
        return self.center_crop(image, SizeDict(height=edge, width=edge))

    def center_crop(self, image, size, **kwargs):
        """Centre crop placed as torchvision's ``CenterCrop`` (the official transform) places it: offsets are
        rounded, where transformers truncates them, which shifts the crop by one pixel for odd margins."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


class ConvNextV2ImageProcessor(_OfficialEvalDefaults, ConvNextImageProcessor):
    """Official ConvNeXt V2 evaluation preprocessing, torchvision backend (tensors, fast; GPU capable).

    ``size={"shortest_edge": S}``: crop at S < 384 after resizing the shorter side to int(S / crop_pct);
    warp to S x S at S >= 384.
    """

    _backend = TorchvisionBackend


class ConvNextV2ImageProcessorPil(_OfficialEvalDefaults, ConvNextImageProcessorPil):
    """Official ConvNeXt V2 evaluation preprocessing, PIL backend: the official PIL pipeline to float rounding."""

    _backend = PilBackend


def processor_for_resolution(resolution: int, backend: str = "torchvision"):
    """The official evaluation processor of a checkpoint trained at ``resolution`` (crop at 224, warp at 384+)."""
    classes = {"torchvision": ConvNextV2ImageProcessor, "pil": ConvNextV2ImageProcessorPil}
    if backend not in classes:
        raise ValueError(f"backend must be one of {sorted(classes)}, got {backend!r}")
    return classes[backend](size={"shortest_edge": resolution})


__all__ = ["ConvNextV2ImageProcessor", "ConvNextV2ImageProcessorPil", "check_images", "processor_for_resolution"]
