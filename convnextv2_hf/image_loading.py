"""How an image becomes the RGB pixels the model sees: one rule for each property of an image, applied by every
way in (both image processors, ``pipeline("image-classification")`` and ``pipeline("image-feature-extraction")``,
the training transforms, the image-folder and ``datasets`` loaders, streaming included, and
``examples/evaluate_classifier.py``). ``to_rgb`` is the home of the rule for PIL images, ``array_pixels`` for
arrays and tensors, ``open_image`` of decoding files; ``decode_image`` takes any of them.

PIL images and image files (paths, bytes), by property:

- **EXIF orientation**: applied (``PIL.ImageOps.exif_transpose``), as ``datasets``' Image feature and
  transformers' ``load_image`` (the pipelines' loader) do; a phone photo is seen upright.
- **Alpha and transparency** (RGBA, LA, PA, premultiplied RGBa, palette images with a transparency entry):
  composited on white, ``round((colour * alpha + 255 * (255 - alpha)) / 255)``, as transformers' own
  ``convert_to_rgb`` does. Why: the colour stored under a transparent pixel is arbitrary (often black, often
  left-overs of an edit), so dropping alpha shows the model what no viewer shows. The official ConvNeXt V2 training
  loader (torchvision's ``pil_loader``: ``convert("RGB")``) and transformers' ``load_image`` drop alpha instead: the
  pixels differ from theirs exactly where alpha < 255, and are the same where the image is opaque.
- **Palette** (P): the palette's colours; a transparency entry (PNG tRNS, GIF) is alpha, as above.
- **1-bit** (1): black 0, white 255. **Grey** (L): the grey value in R, G and B; LA: composited, then grey.
- **16-bit** (I;16, I;16L, I;16B, I;16N) and **32-bit integer** (I): 16-bit grey, read as 0..65535 and brought
  to 8 bits as ``round(v * 255 / 65535)`` (PIL's own conversion clips at 255, turning a 16-bit photo white). Mode
  I is read as 16-bit too (older Pillow opens 16-bit PNGs as I, 16-bit TIFF readers give it); values outside
  0..65535 raise.
- **Float** (F): [0, 1] when every value is <= 1 (scaled by 255), else 0..255; rounded to 8 bits. Negative values,
  values above 255 and NaN or infinity raise.
- **CMYK**: PIL's conversion, ``round((255 - c) * (255 - k) / 255)`` for red (likewise green, blue), as the official
  loader and ``load_image`` do (no ICC colour management). YCbCr, HSV, LAB, RGBX: PIL's conversion to RGB.
- Several frames (GIF, TIFF): the first.

Arrays and tensors carry no mode and no EXIF; ``array_pixels`` reads them by dtype and shape: (H, W),
(H, W, C) or (C, H, W) with C in {1, 3, 4} (channels first when the first axis could be either, as transformers
reads them). uint8 as 0..255; uint16 as 16-bit (as above); bool as 0/255 (as mode 1); other integer types when
within 0..255 (an int32 array is not mode I: give 16-bit pixels as uint16); floating point as given here (finite
values only), and the processors, when they resize, read float pixels as 8-bit as for mode F (values all in [0, 1]
scaled by 255, else 0..255 with ``do_rescale``; rounded), so a float array gives the pixels of the same values as
uint8. Four integer channels are RGBA, composited on white as above (float RGBA too, once brought to 8 bits). Two
channels are refused: grey+alpha or something else, an array cannot say; pass a PIL "LA" image.

**Decoding is bounded.** A file whose header says it decodes to more than ``max_image_pixels()`` pixels (default
89,478,485, PIL's own threshold; the environment variable ``CONVNEXTV2_MAX_IMAGE_PIXELS`` or
``set_max_image_pixels`` changes it, in this process and those it starts later; ``None`` / 0 turns it off) is
refused with a ``ValueError`` naming it before
its pixels are decoded (PIL opens lazily: the header gives the size). A 12000 x 12000 1-bit PNG is 18 KB on disk
and 432 MB as RGB. PIL's own check (``PIL.Image.MAX_IMAGE_PIXELS``, a warning above it and an error above twice
it) is kept in step: ``set_max_image_pixels`` raises PIL's with ours, PIL's warning is ours, and PIL's error
surfaces as the same ``ValueError`` naming the file. PIL images given already decoded are held to the limit too.

This module imports nothing of the package (it may travel beside the image processor as remote code).
"""

from __future__ import annotations

import io
import numbers
import os
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

MAX_PIXELS_ENV = "CONVNEXTV2_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default (PIL.Image.MAX_IMAGE_PIXELS): 1024 ** 3 // 4 // 3
EXIF_ORIENTATION = 0x0112  # the Orientation tag
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_HOW_TO_ALLOW_MORE = f"set {MAX_PIXELS_ENV} or call convnextv2_hf.image_loading.set_max_image_pixels to allow more"
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageReadError(ValueError):
    """An image that cannot be read. ``str()`` is the whole message; ``problem`` is what went wrong alone (PIL's
    own words for a file it cannot decode) and ``name`` the file, for callers that word the message their way."""

    def __init__(self, message: str, problem: str, name: str | None):
        super().__init__(message)
        self.problem = problem
        self.name = name


def _parse_limit(value) -> int | None:
    """A pixel limit from a number or the environment variable's text; ``None`` (or 0, "none", ""): no limit."""
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "").replace(",", "")
        try:
            value = None if text in ("", "none") else int(text)
        except ValueError:
            raise ValueError(f"the image pixel limit must be a whole number >= 0 or None, got {value!r}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"the image pixel limit must be a whole number >= 0 or None, got {value!r}")
    return int(value) or None


_max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS


def max_image_pixels() -> int | None:
    """The most pixels (width x height) an image may decode to here; ``None``: no limit of ours."""
    return _max_image_pixels


def set_max_image_pixels(limit: int | None) -> None:
    """Set the decoding limit (``None`` or 0: none). PIL's own ``PIL.Image.MAX_IMAGE_PIXELS`` is raised with it
    when lower, so PIL does not refuse what was allowed here; it is never lowered (a stricter PIL setting of
    yours stays in force, and its refusals are reported as ours). The environment variable is set to it too, so
    processes started afterwards (DataLoader workers under "spawn", torchrun children) read the same limit."""
    global _max_image_pixels
    _max_image_pixels = _parse_limit(limit)
    os.environ[MAX_PIXELS_ENV] = "none" if _max_image_pixels is None else str(_max_image_pixels)
    pil_limit = PIL.Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and (_max_image_pixels is None or _max_image_pixels > pil_limit):
        PIL.Image.MAX_IMAGE_PIXELS = _max_image_pixels


if os.environ.get(MAX_PIXELS_ENV) is not None:
    try:
        set_max_image_pixels(os.environ[MAX_PIXELS_ENV])
    except ValueError as error:
        raise ValueError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r}: {error}") from None


def _effective_limit() -> int | None:
    limits = [limit for limit in (_max_image_pixels, PIL.Image.MAX_IMAGE_PIXELS) if limit]
    return min(limits) if limits else None


def _quoted(name: str | None) -> str:
    return repr(name) if name else "the image"


def check_size(image: PIL.Image.Image, name: str | None = None) -> None:
    """``ImageReadError`` when ``image`` (opened lazily: only its header read) would decode to more pixels than
    the limit (module docstring), or has none."""
    width, height = image.size
    if width == 0 or height == 0:
        problem = f"has no pixels (size {image.size})"
        raise ImageReadError(problem if not name else f"{name!r} {problem}", problem, name)
    limit = _effective_limit()
    if limit is not None and width * height > limit:
        problem = (
            f"{width} x {height} = {width * height:,} pixels, over the limit of {limit:,} pixels an image may decode "
            f"to ({_HOW_TO_ALLOW_MORE})"
        )
        raise ImageReadError(f"{_quoted(name)} is {problem}", problem, name)


def image_name(image) -> str | None:
    """The file an image came from, for messages: a path, a PIL image's ``filename``, a ``datasets`` value's path."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, dict):
        return image.get("path") or None
    return getattr(image, "filename", None) or None


def _upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` turned as its EXIF orientation says (the tag is then dropped, so a second call changes nothing)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return image  # exif_transpose would copy every pixel even here
    return PIL.ImageOps.exif_transpose(image)


def _decode(image: PIL.Image.Image, name: str | None) -> PIL.Image.Image:
    check_size(image, name)
    try:
        image.load()  # PIL decodes lazily: a truncated or corrupt file fails here, not inside a resize
    except Exception as error:  # OSError, SyntaxError, struct.error, zlib.error, ... depending on the format
        where = f" of {name!r}" if name else ""
        raise ImageReadError(
            f"cannot decode the image data{where} ({type(error).__name__}: {error})", str(error), name
        ) from None
    return image


def open_image(source, name: str | None = None) -> PIL.Image.Image:
    """Decode one image file completely, bounded (module docstring), with its EXIF orientation applied and its mode
    kept (a mask stays a mask; ``to_rgb`` makes pixels of it).

    ``source``: a path, encoded bytes, a ``datasets`` ``Image(decode=False)`` value (``{"bytes", "path"}``), a file
    object, or a PIL image (decoded here if opened lazily). ``ImageReadError`` (a ``ValueError``) names the file.
    """
    if isinstance(source, PIL.Image.Image):
        return _upright(_decode(source, name or image_name(source)))
    data = None
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            problem = f"a datasets image value holds neither bytes nor a path: {str(source)[:200]}"
            raise ImageReadError(problem, problem, None)
    elif isinstance(source, (bytes, bytearray)):
        data, path = bytes(source), None
    else:
        path = source
    name = name or (os.fspath(path) if isinstance(path, (str, os.PathLike)) else None)
    if data is None and isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        problem = f"no such image file: {os.fspath(path)!r}"
        raise ImageReadError(problem, f"[Errno 2] No such file or directory: {os.fspath(path)!r}", name)
    try:
        with warnings.catch_warnings():
            # PIL warns above its limit and reads on; here check_size refuses (its limit is kept in step with ours)
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
    except PIL.Image.DecompressionBombError as error:
        problem = f"{error} ({_HOW_TO_ALLOW_MORE})"
        raise ImageReadError(f"{_quoted(name)} is too large to decode: {problem}", problem, name) from None
    except Exception as error:  # PIL raises several types for data it cannot identify
        detail = f"{type(error).__name__}: {error}"
        if name is not None:
            raise ImageReadError(f"cannot open {name!r} as an image ({detail})", str(error), name) from None
        size = len(data) if data is not None else "?"
        raise ImageReadError(f"cannot read {size} bytes as an image file ({detail})", str(error), None) from None
    with image:
        _decode(image, name)
    return _upright(image)


def eight_bit_from_sixteen(values):
    """0..65535 -> 0..255 uint8, rounded; exact for values v * 257 (the 16-bit copy of an 8-bit v)."""
    if isinstance(values, torch.Tensor):
        return (values.to(torch.float32) * (255 / 65535)).round().to(torch.uint8)
    return np.round(np.asarray(values).astype(np.float32) * (255 / 65535)).astype(np.uint8)


def eight_bit_from_float(values):
    """Floating-point pixels in 0..255 -> uint8, rounded (half to even); ``ValueError`` for values outside."""
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise ValueError(f"float pixel values must lie in 0..255 to be read as 8-bit, got {low:g}..{high:g}")
    if isinstance(values, torch.Tensor):
        return values.round().to(torch.uint8)
    return np.round(values).astype(np.uint8)


def composite_on_white(colour, alpha):
    """8-bit ``colour`` (..., C) or (C, ...) over white through 8-bit ``alpha`` (broadcastable), rounded to uint8:
    ``round((colour * alpha + 255 * (255 - alpha)) / 255)``, the same numbers as PIL's ``alpha_composite``."""
    if isinstance(colour, torch.Tensor):
        colour, alpha = colour.to(torch.int32), alpha.to(torch.int32)
        return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).to(torch.uint8)
    colour, alpha = colour.astype(np.int32), alpha.astype(np.int32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _grey_from_wide_mode(image: PIL.Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image as 8-bit grey values (rules in the module docstring)."""
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("mode 'F' image holds NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            raise ValueError(f"mode 'F' values must lie in [0, 1] or 0..255, got {low:g}..{high:g}")
        scale = 255.0 if high <= 1 else 1.0
        return eight_bit_from_float(values.astype(np.float32) * scale)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ValueError(f"mode {image.mode!r} is read as 16-bit (0..65535), got values {low}..{high}")
    return eight_bit_from_sixteen(values)


def _has_transparency(image: PIL.Image.Image) -> bool:
    return image.mode in _WITH_ALPHA or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def to_rgb(image: PIL.Image.Image, name: str | None = None) -> PIL.Image.Image:
    """The rule for PIL images (module docstring): an 8-bit "RGB" image, EXIF orientation applied, alpha and
    transparency composited on white, 16-bit / 32-bit / float grey scaled to 8 bits. Decodes a lazily opened image
    (bounded). ``ValueError`` for pixels the rule cannot read."""
    name = name or image_name(image)
    image = _upright(_decode(image, name))
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        grey = _grey_from_wide_mode(image)
        return PIL.Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")
    if image.mode == "La":
        image = image.convert("RGBa")  # PIL converts premultiplied grey+alpha only by way of RGBa
    if _has_transparency(image):
        rgba = np.asarray(image.convert("RGBA"))
        return PIL.Image.fromarray(composite_on_white(rgba[..., :3], rgba[..., 3:]), "RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:  # a mode PIL cannot convert
        raise ValueError(f"mode {image.mode!r} cannot be converted to RGB ({error})") from None


def _pixel_kind(image) -> str:
    """The pixel type: "bool", "uint8", "uint16", "int" (other integers), "float" or "other" (complex, ...)."""
    if isinstance(image, torch.Tensor):
        named = {torch.bool: "bool", torch.uint8: "uint8", torch.uint16: "uint16"}
        if image.dtype in named:
            return named[image.dtype]
        return "float" if image.is_floating_point() else "other" if image.is_complex() else "int"
    dtype = image.dtype
    if dtype.kind == "b":
        return "bool"
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return "uint8" if dtype.itemsize == 1 else "uint16"
    return {"u": "int", "i": "int", "f": "float"}.get(dtype.kind, "other")


def _eight_bit_array(image, kind: str):
    """An integer or bool array as uint8 by the dtype rules (module docstring)."""
    is_tensor = isinstance(image, torch.Tensor)
    if kind == "bool":
        return image.to(torch.uint8) * 255 if is_tensor else image.astype(np.uint8) * 255
    if kind == "uint8":
        return image
    if kind == "uint16":
        return eight_bit_from_sixteen(image)
    low, high = int(image.min()), int(image.max())
    if low < 0 or high > 255:
        raise ValueError(f"{image.dtype} pixel values must lie in 0..255 (uint16 is read as 16-bit), got {low}..{high}")
    return image.to(torch.uint8) if is_tensor else image.astype(np.uint8)


def array_pixels(image):
    """The rule for arrays and tensors (module docstring). Returns the array with a dtype the processors read right
    (uint8, or floating point as given) and 1 or 3 channels: a grey (H, W) one gains a channel axis, integer RGBA
    is composited on white. ``ValueError`` naming the problem for anything else."""
    is_tensor = isinstance(image, torch.Tensor)
    if is_tensor:
        image = image.detach()
    shape = tuple(image.shape)
    if image.ndim not in (2, 3):
        raise ValueError(f"{type(image).__name__} of shape {shape} is not an image: (H, W), (H, W, C) or (C, H, W)")
    if 0 in shape:
        raise ValueError(f"has no pixels (shape {shape})")
    if image.ndim == 3 and shape[0] not in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        raise ValueError(f"shape {shape} has no channel axis of 1, 3 or 4 first or last")
    if image.ndim == 2:  # a grey (H, W) image: transformers reads only arrays with a channel axis
        image = image[None]
    kind = _pixel_kind(image)
    if kind == "float":
        finite = torch.isfinite(image).all() if is_tensor else np.isfinite(image).all()
        if not finite:
            raise ValueError("holds NaN or infinite values")
        return image
    if kind == "other":
        raise ValueError(f"pixels of dtype {image.dtype} are not an image (integers, bool or floating point)")
    image = _eight_bit_array(image, kind)
    channels_first = image.shape[0] in (1, 3, 4)  # transformers' reading when both axes could be channels
    if image.shape[0 if channels_first else -1] == 4:
        if channels_first:
            return composite_on_white(image[:3], image[3:])
        return composite_on_white(image[..., :3], image[..., 3:])
    return image


def decode_image(image, name: str | None = None):
    """Any way an image is given to a processor, by the rule: paths, encoded bytes and PIL images become an
    8-bit RGB PIL image (``open_image`` then ``to_rgb``); arrays and tensors go through ``array_pixels``.
    ``ValueError`` naming the problem (and the file, when there is one) otherwise."""
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return array_pixels(image)
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = open_image(image, name)
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image, name)
    kind = "None" if image is None else f"{type(image).__name__} {image!r}"[:200]
    raise ValueError(f"is not an image (PIL image, array, tensor, file path or bytes), got {kind}")


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_PIXELS_ENV",
    "ImageReadError",
    "array_pixels",
    "check_size",
    "composite_on_white",
    "decode_image",
    "eight_bit_from_float",
    "eight_bit_from_sixteen",
    "image_name",
    "max_image_pixels",
    "open_image",
    "set_max_image_pixels",
    "to_rgb",
]
