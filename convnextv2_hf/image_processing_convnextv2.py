"""Image processors whose defaults are the official ConvNeXt V2 evaluation transform.

Official eval transform (``build_transform`` in the official repository's ``datasets.py``): ImageNet default
mean/std, bicubic; for size < 384 the shorter side is resized to int(size / crop_pct) (crop_pct 0.875) and the
centre size x size is cropped; for size >= 384 the image is resized straight to size x size (warp). transformers'
ConvNeXt processors implement exactly this resize rule but default to mean/std 0.5 and 384 px, and place the centre
crop one pixel off the official one when the margin is odd. Ours subclass them, changing the defaults and the crop
placement.

Input images, checked one by one before processing (``prepare_images``); a bad one raises ``ValueError``
"image I of N: ..." naming its index. Every image goes through the package's one image rule
(``image_loading.decode_image``; the rule for each property is in that module's docstring): PIL images of any
mode, local file paths (``str`` or ``os.PathLike``) and encoded image files as ``bytes`` become 8-bit RGB with
EXIF orientation applied, alpha composited on white, 16-bit and float grey scaled to 8 bits (PIL itself clips
those, turning a 16-bit photo white); decoding is bounded (``image_loading.max_image_pixels``) and complete, so a
truncated file fails with its index instead of deep inside the resize. Arrays and tensors, (H, W), (H, W, C) or
(C, H, W) with C in {1, 3, 4}, are read by dtype: uint8 as 0..255, uint16 as 16-bit, bool as 0/255, other
integers within 0..255, integer RGBA composited on white, floating point as the 8-bit pixels it stands for when
the processor resizes (as mode F: values all in [0, 1] scaled by 255, else 0..255 with ``do_rescale``; rounded,
then read as an 8-bit array), so a float array gives exactly the pixels of the same values as uint8 in both
backends; other floats (``do_rescale=False`` beyond [0, 1], or above 255 in the torchvision backend) are taken as
given, as are all floats when a call's ``rescale_factor`` is not 1/255 (it says what the values mean).
Floating-point images whose values all lie in [0, 1] get a ``UserWarning`` when ``do_rescale`` is on, since
dividing by 255 again would leave them nearly black.

The pipelines (``pipeline("image-classification")``, ``pipeline("image-feature-extraction")``) hand paths and PIL
images to these processors untouched (``reads_image_sources``, see ``convnextv2_hf.pipelines``), so they see the
same pixels as a direct call; transformers' own loader, which the stock pipelines run first, clips 16-bit images
and drops alpha.

Saved processors load with stock transformers alone: for the ``convnextv2`` model type it falls back to its
built-in ConvNeXt processor with our saved values (mean, std, size, crop_pct, bicubic), which gives the same
pixels except for that one-pixel crop shift on images with an odd margin at sizes below 384. (An ``auto_map``
would make stock transformers refuse to load the folder without ``trust_remote_code``, so we write none, and
no class name of ours either, see ``to_dict``.) With this package imported, ``AutoImageProcessor`` gives back
the backend that saved the folder (see ``register_saved_pil_type``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from torchvision.transforms import InterpolationMode
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

from .compat_convnextv2 import prefer_pil_backend, register_image_processor_classes
from .image_loading import array_pixels, decode_image, eight_bit_from_float
from .pipelines import register_pipelines

EVAL_CROP_PCT = 0.875
NUM_CHANNELS = 3  # the processors always give RGB (do_convert_rgb), so mean and std have three values

# `image_processor_type` the PIL backend writes. Stock transformers reads it as its ConvNeXt processor (it never
# writes the name itself: its PIL processors save the torchvision name), and `register_saved_pil_type` lets it
# lead to our PIL backend when this package is imported.
SAVED_PIL_TYPE = "ConvNextImageProcessorPil"
_SIZE_KEYS = ("shortest_edge", "longest_edge", "height", "width", "max_height", "max_width")


def check_settings(crop_pct, size, image_mean, image_std, rescale_factor, resample=None) -> None:
    """``ValueError`` naming the field for settings the processors cannot use: ``crop_pct`` outside (0, 1], a
    size that is not a positive integer ``shortest_edge``, ``image_mean``/``image_std`` that are not one number
    or three (one per RGB channel), a std that is not positive, a ``rescale_factor`` that is not positive, a
    ``resample`` that is not a ``PILImageResampling`` filter (or a torchvision ``InterpolationMode``)."""
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, numbers.Real) or not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be a number in (0, 1] (officially {EVAL_CROP_PCT}), got {crop_pct!r}")
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = {"shortest_edge": size}  # what transformers makes of an int size for these processors
    if not isinstance(size, (dict, SizeDict, type(None))):
        raise ValueError(f"size must be {{'shortest_edge': S}} or an int S, got {size!r}")
    size_dict = {key: value for key, value in dict(size or {}).items() if value is not None}
    for key, value in size_dict.items():
        if key in _SIZE_KEYS and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
            raise ValueError(f"size['{key}'] must be a positive integer, got {value!r}")
    if set(size_dict) != {"shortest_edge"}:
        raise ValueError(
            f"size must be {{'shortest_edge': S}} (crop at S < 384, warp to S x S at S >= 384), got {size_dict}"
        )
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        values = values.tolist() if isinstance(values, np.ndarray) else values
        numbers_given = [values] * NUM_CHANNELS if isinstance(values, numbers.Real) else values
        if not isinstance(numbers_given, Sequence) or isinstance(numbers_given, str):
            raise ValueError(f"{name} must be one number or {NUM_CHANNELS} (one per RGB channel), got {values!r}")
        if len(numbers_given) != NUM_CHANNELS:
            raise ValueError(
                f"{name} must have {NUM_CHANNELS} values (one per RGB channel), got {len(numbers_given)}: {values!r}"
            )
        for value in numbers_given:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
                raise ValueError(f"{name} must hold finite numbers, got {values!r}")
            if name == "image_std" and value <= 0:
                raise ValueError(f"image_std must be positive (it divides the pixels), got {values!r}")
    if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, numbers.Real) or not rescale_factor > 0:
        raise ValueError(f"rescale_factor must be a positive number (1/255 for 8-bit pixels), got {rescale_factor!r}")
    if not _known_resample(resample):
        names = ", ".join(f"{member.name} ({member.value})" for member in PILImageResampling)
        raise ValueError(f"resample must be a PILImageResampling filter: {names}; got {resample!r}")


def _known_resample(resample) -> bool:
    if resample is None or isinstance(resample, InterpolationMode):
        return True
    if isinstance(resample, bool) or not isinstance(resample, numbers.Integral):
        return False  # the backends look the filter up by its number: a name such as "bicubic" fails there
    return int(resample) in {member.value for member in PILImageResampling}


def _check_device(device) -> None:
    """``ValueError`` for a ``device`` torch cannot name, or CUDA where torch sees none (torch's own errors there are
    a RuntimeError listing device types, or one about NVIDIA drivers)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but torch sees no CUDA device here")


# the per-call arguments transformers types as float (or lists of floats): it refuses an int such as crop_pct=1
_FLOAT_KWARGS = ("crop_pct", "rescale_factor", "image_mean", "image_std")


def _float_kwargs(kwargs: dict) -> dict:
    """``kwargs`` with whole numbers given for float arguments as floats (1 -> 1.0, [0, 1, 1] -> [0.0, 1.0, 1.0])."""

    def as_float(value):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, (list, tuple)) and all(
            isinstance(item, numbers.Real) and not isinstance(item, bool) for item in value
        ):
            return [float(item) for item in value]
        return value

    return {key: as_float(value) if key in _FLOAT_KWARGS else value for key, value in kwargs.items()}


def _batch_as_list(images) -> list:
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes, bytearray)):
        return list(images)
    return [images]


def _is_float_array(image) -> bool:
    if isinstance(image, torch.Tensor):
        return image.is_floating_point()
    return isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)


def _looks_rescaled(image) -> bool:
    return _is_float_array(image) and bool(image.min() >= 0 and image.max() <= 1)


def eight_bit_float_pixels(image):
    """A floating-point array as the 8-bit pixels it stands for, as a mode "F" image is read: values in [0, 1]
    (all of them) scaled by 255, others taken as 0..255, rounded, then read as an 8-bit array (RGBA composited on
    white). Values in [0, 1] come back as float32 ``k / 255`` (still for ``do_rescale=False``), others as uint8.
    ``ValueError`` for values outside 0..255."""
    unit = _looks_rescaled(image)
    eight = array_pixels(eight_bit_from_float(image * 255 if unit else image))
    if not unit:
        return eight
    return eight.to(torch.float32) / 255 if isinstance(eight, torch.Tensor) else eight.astype(np.float32) / 255


def prepare_images(
    images, do_rescale: bool = True, eight_bit_floats: bool = False, wide_floats_as_given: bool = False
) -> list:
    """The images as a list the backends read correctly (rules in the module docstring). ``eight_bit_floats``
    (set when the processor resizes): floating-point arrays of pixel values (all in [0, 1], or in 0..255 with
    ``do_rescale``) are brought to 8 bits first (``eight_bit_float_pixels``), so that they give the pixels of the
    same values as uint8: resampled as floats they would miss the 8-bit path's rounding and clipping (bicubic
    overshoots), and transformers refuses float RGBA above 1. Float values above 255 are refused there, or with
    ``wide_floats_as_given`` (the torchvision backend, which resamples floats) left as they are, for a
    ``rescale_factor`` of the user's (1 / 65535 for 16-bit values given as floats).

    Raises ``ValueError`` for an empty batch, and "image I of N: ..." for the first image that is not one.
    Warns (``UserWarning``) when ``do_rescale`` is on and floating-point images already lie in [0, 1].
    """
    batch = _batch_as_list(images)
    if not batch:
        raise ValueError("the batch of images is empty")
    prepared, already_rescaled = [], []
    for index, image in enumerate(batch):
        try:
            image = decode_image(image)
            looks_rescaled = _looks_rescaled(image)
            wide = wide_floats_as_given and _is_float_array(image) and bool(image.max() > 255)
            if eight_bit_floats and _is_float_array(image) and (looks_rescaled or (do_rescale and not wide)):
                image = eight_bit_float_pixels(image)
        except ValueError as error:
            raise ValueError(f"image {index} of {len(batch)}: {error}") from None
        if do_rescale and looks_rescaled:
            already_rescaled.append(index)
        prepared.append(image)
    if already_rescaled:
        warnings.warn(
            f"images {already_rescaled} are floating point with every value in [0, 1], so they look rescaled "
            "already, and do_rescale=True divides them by 255 again. Pass do_rescale=False for images in [0, 1].",
            UserWarning,
            stacklevel=4,
        )
    return prepared


_CHECKED_SETTINGS = ("crop_pct", "size", "image_mean", "image_std", "rescale_factor", "resample")


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
    _saved_type: str | None = None  # image_processor_type in preprocessor_config.json, see to_dict
    # paths and PIL images are read here by the package's rule: the pipelines pass them on untouched, without
    # transformers' load_image (convnextv2_hf.pipelines)
    reads_image_sources = True

    def __init__(self, **kwargs):
        # Checked here, so bad values fail when the processor is built, also through from_dict / from_pretrained
        # (both build it from the saved values with the keyword overrides applied).
        super().__init__(**kwargs)
        check_settings(*(getattr(self, name) for name in _CHECKED_SETTINGS))

    def _check_call_settings(self, kwargs: dict) -> None:
        # None in a call's kwargs means the processor's own value
        check_settings(
            *(getattr(self, name) if kwargs.get(name) is None else kwargs[name] for name in _CHECKED_SETTINGS)
        )
        if kwargs.get("device") is not None:
            _check_device(kwargs["device"])

    def _validate_preprocess_kwargs(self, **kwargs):  # a transformers hook: compat_convnextv2 checks it is called
        self._check_call_settings(kwargs)
        super()._validate_preprocess_kwargs(**kwargs)

    def preprocess(self, images, *args, **kwargs):
        """As the ConvNeXt processors, after checking the settings of this call and reading each input image (see
        ``prepare_images``). Whole numbers are fine for float settings (``crop_pct=1``); a bad setting is a
        ``ValueError`` naming it, transformers' own type checks included."""
        kwargs = _float_kwargs(kwargs)
        self._check_call_settings(kwargs)  # before transformers' type checks, which would name only the type
        do_rescale = kwargs.get("do_rescale")
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_resize = kwargs.get("do_resize")
        do_resize = self.do_resize if do_resize is None else do_resize
        rescale_factor = kwargs.get("rescale_factor")
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        # float arrays of pixel values are resized as the 8-bit pixels they stand for (as mode F images are), unless
        # a rescale_factor of the caller's own says what the values mean
        eight_bit_scale = not do_rescale or abs(rescale_factor - 1 / 255) < 1e-9
        images = prepare_images(
            images,
            do_rescale=do_rescale,
            eight_bit_floats=do_resize and eight_bit_scale,
            wide_floats_as_given=self.backend != "pil",
        )
        try:
            return super().preprocess(images, *args, **kwargs)
        except StrictDataclassError as error:  # a call argument of the wrong type (do_rescale="yes", ...)
            raise ValueError(f"invalid image processor argument: {error}") from None

    def to_dict(self) -> dict:
        # Never one of our class names in preprocessor_config.json: stock transformers refuses a folder whose
        # image_processor_type it does not know. The torchvision backend writes none, so AutoImageProcessor picks
        # the processor registered for the model type in config.json (ours with this package imported,
        # transformers' ConvNeXt one otherwise). The PIL backend writes SAVED_PIL_TYPE, see
        # register_saved_pil_type.
        output = super().to_dict()
        output.pop("image_processor_type", None)
        if self._saved_type is not None:
            output["image_processor_type"] = self._saved_type
        return output

    def resize(self, image, size: SizeDict, resample, crop_pct: float | None = None, **kwargs):
        """The official rule: shorter side to int(S / crop_pct) then centre crop S x S when S < 384, else warp."""
        edge = size.shortest_edge
        if not edge:
            raise ValueError(f"size must have a 'shortest_edge' key, got {dict(size)}")
        if self.backend != "pil" and _looks_rescaled(image):
            levels = image.to(torch.float32) * 255
            eight = levels.round()
            if bool((levels - eight).abs().max() < 1e-3):
                # 8-bit pixels in [0, 1] (eight_bit_float_pixels, for do_rescale=False): resampled as uint8, rounded
                # and clipped as the same pixels given as uint8 are (transformers' PIL backend does the same)
                resized = self.resize(eight.to(torch.uint8), size, resample, crop_pct=crop_pct, **kwargs)
                return (resized.to(torch.float32) / 255).to(image.dtype)
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
    _saved_type = SAVED_PIL_TYPE


def register_saved_pil_type() -> None:
    """Make ``AutoImageProcessor.from_pretrained`` load a folder saved by the PIL backend as the PIL backend.

    AutoImageProcessor looks ``image_processor_type`` up among the values of its registered backend mappings,
    then picks the backend from its ``backend`` argument, defaulting to torchvision except for the type names in
    ``DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS``. An entry of its own (keyed by a name, not a config class, so the
    ``convnextv2`` registration in ``__init__`` stays as transformers expects) maps ``SAVED_PIL_TYPE`` to our two
    classes, and that list gains the name: no ``backend`` gives ours with PIL, ``backend="torchvision"`` ours with
    torchvision. The name stays a string in the entry, so lookups of transformers' own ConvNeXt PIL class by
    name are untouched. Idempotent.
    """
    register_image_processor_classes(
        "convnextv2_hf saved PIL processors",
        {"torchvision": ConvNextV2ImageProcessor, "pil": ConvNextV2ImageProcessorPil, "saved as": SAVED_PIL_TYPE},
    )
    prefer_pil_backend(SAVED_PIL_TYPE)


register_saved_pil_type()
# the pipelines hand raw images to processors that read image sources (ours): registered wherever the processors
# are imported, so `pipeline(...)` and a direct processor call never see different pixels
register_pipelines()


def processor_for_resolution(resolution: int, backend: str = "torchvision"):
    """The official evaluation processor of a checkpoint trained at ``resolution`` (crop at 224, warp at 384+)."""
    classes = {"torchvision": ConvNextV2ImageProcessor, "pil": ConvNextV2ImageProcessorPil}
    if backend not in classes:
        raise ValueError(f"backend must be one of {sorted(classes)}, got {backend!r}")
    return classes[backend](size={"shortest_edge": resolution})


__all__ = [
    "ConvNextV2ImageProcessor",
    "ConvNextV2ImageProcessorPil",
    "check_settings",
    "prepare_images",
    "processor_for_resolution",
    "register_saved_pil_type",
]
