"""Training transforms of the official recipes, built from torchvision.transforms.v2.

- ``fcmae_pretraining_transform``: RandomResizedCrop(scale 0.2-1.0, bicubic), horizontal flip, normalise.
- ``finetuning_transform``: RandomResizedCrop, flip, RandAugment, normalise, RandomErasing(0.25).
- ``fcmae_evaluation_transform``: resize, centre crop, normalise (deterministic, for FCMAE validation).
- ``MixUpCutMixCollator``: batches examples and applies MixUp (alpha 0.8) or CutMix (alpha 1.0), switching
  with probability 0.5, with label smoothing; the soft labels go straight into
  ``ConvNextV2ForImageClassification`` (which takes (N, num_labels) float labels as soft targets).
- ``with_image_transform`` / ``image_folder_dataset``: ``datasets`` image folders with a transform. Images are
  decoded here, completely, so a corrupt or truncated file raises a ``ValueError`` naming it (or, with
  ``skip_corrupt_images=True``, is left out with a warning: its example's ``pixel_values`` is ``None`` and the
  collators drop it).
- Every transform starts with ``ToRGB``: a PIL image becomes RGB by the package's one image rule
  (``convnextv2_hf.image_loading``), the pixels the image processors and pipelines see for the same file.
- ``with_example_index`` and ``streaming_image_dataset``: each example carries its ``index`` (what
  ``FCMAECollator`` seeds its masks with).

RandAugment differs from the official "rand-m9-mstd0.5-inc1" (timm): torchvision applies a fixed magnitude 9
(no per-op magnitude noise, the "mstd0.5" part) and its own op set and magnitude directions (timm's "inc1"
makes every op stronger with the magnitude; torchvision's ops already do so, but the op lists differ: timm
adds Invert/SolarizeAdd and leaves out Identity). Random erasing fills with per-pixel normal noise like the
official "pixel" mode, in the normalised space.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from torchvision.transforms import v2
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import logging

from .image_loading import ImageReadError, open_image, to_rgb

logger = logging.get_logger(__name__)

BICUBIC = v2.InterpolationMode.BICUBIC


class ToRGB(torch.nn.Module):
    """First step of every transform here: a PIL image becomes RGB by the package's one image rule
    (``image_loading.to_rgb``: EXIF orientation, alpha on white, 16-bit and float grey scaled), so training sees
    the pixels the image processors see; tensors go to torchvision's ``v2.RGB`` (grey to three channels)."""

    def __init__(self):
        super().__init__()
        self.tensor_rgb = v2.RGB()

    def forward(self, image):
        if isinstance(image, PIL.Image.Image):
            return to_rgb(image)
        return self.tensor_rgb(image)


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def fcmae_pretraining_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """The official FCMAE pretraining augmentation; any PIL image or tensor in, (3, size, size) float out."""
    return v2.Compose(
        [
            ToRGB(),
            v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalised_tensor(mean, std),
        ]
    )


def fcmae_evaluation_transform(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Deterministic FCMAE validation input: shorter side resized to ``size`` (bicubic), centre crop, normalise;
    (3, size, size) float out. No randomness, so evaluation losses compare across steps and runs."""
    return v2.Compose(
        [
            ToRGB(),
            v2.Resize(size, interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(size),
            *_to_normalised_tensor(mean, std),
        ]
    )


def finetuning_transform(
    size: int = 224,
    rand_augment_magnitude: int = 9,
    rand_augment_ops: int = 2,
    random_erasing: float = 0.25,
    horizontal_flip: bool = True,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """The official fine-tuning augmentation (see the module docstring for how RandAugment differs).
    ``horizontal_flip=False`` for data whose classes a mirror changes (digits, text)."""
    steps = [ToRGB(), v2.RandomResizedCrop(size, interpolation=BICUBIC, antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if rand_augment_magnitude > 0:
        steps.append(v2.RandAugment(num_ops=rand_augment_ops, magnitude=rand_augment_magnitude, interpolation=BICUBIC))
    steps += _to_normalised_tensor(mean, std)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(steps)


class MixUpCutMixCollator:
    """Collate ``{"pixel_values", "labels"}`` examples, then mix training batches with MixUp or CutMix.

    Labels of training batches come out as (N, num_labels) float soft targets, smoothed by ``label_smoothing``
    (as the official recipe does); with both alphas 0 only the smoothing is applied. The Trainer collates
    evaluation batches with the same collator: only batches whose examples carry ``mixable=True`` (see
    ``with_image_transform(..., mixable=True)``) are mixed; others keep their class ids, as metrics need.
    """

    def __init__(
        self,
        num_labels: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        if num_labels < 2:
            raise ValueError(f"MixUp/CutMix needs at least 2 labels, got num_labels={num_labels}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_labels = num_labels
        self.label_smoothing = label_smoothing
        choices, weights = [], []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_labels))
            weights.append(1.0 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_labels))
            weights.append(switch_prob if mixup_alpha > 0 else 1.0)
        self.mix = v2.RandomChoice(choices, p=weights) if choices else None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        examples = readable_examples(examples)
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        labels = torch.as_tensor([int(example["labels"]) for example in examples])
        if not all(example.get("mixable", False) for example in examples):
            return {"pixel_values": pixel_values, "labels": labels}
        if self.mix is not None:
            pixel_values, targets = self.mix(pixel_values, labels)  # mixed one-hot targets
        else:
            targets = torch.nn.functional.one_hot(labels, self.num_labels).float()
        # mixing is linear, so smoothing the mixed one-hot targets equals mixing smoothed targets (timm's order)
        targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_labels
        return {"pixel_values": pixel_values, "labels": targets}


def readable_examples(examples: list[dict]) -> list[dict]:
    """The examples whose image could be read (``with_image_transform(..., skip_corrupt_images=True)`` gives the
    others ``pixel_values=None``); ``ValueError`` when none is left, as an empty batch cannot train."""
    kept = [example for example in examples if example.get("pixel_values") is not None]
    if not kept:
        raise ValueError(f"every image of this batch of {len(examples)} was skipped as unreadable")
    return kept


def load_image(value, skip_corrupt_images: bool = False) -> PIL.Image.Image | None:
    """Decode one image completely: a ``datasets`` ``Image(decode=False)`` value (``{"bytes", "path"}``), a path,
    raw bytes or a PIL image, by ``image_loading.open_image``: bounded (an image over the pixel limit is refused
    before it is decoded), EXIF orientation applied as ``datasets`` does, mode kept (the transforms' ``ToRGB``
    makes pixels of it). Decoding every pixel here (not lazily later) makes a truncated file fail here.

    A file that cannot be read raises ``ValueError`` naming it; with ``skip_corrupt_images=True`` it is logged as a
    warning and ``None`` is returned instead.
    """
    try:
        return open_image(value)
    except ImageReadError as error:
        name = error.name or "an image given as bytes (no file name)"
        if not skip_corrupt_images:
            raise ValueError(
                f"cannot read image {name}: {error.problem}. Remove or replace the file, or skip unreadable images "
                "with a warning (--skip_corrupt_images / skip_corrupt_images=True)"
            ) from None
        logger.warning(f"skipping unreadable image {name}: {error.problem}")
        return None


def _decode_later(dataset, image_column: str):
    """The dataset with ``image_column`` left undecoded (``load_image`` decodes it, naming any bad file)."""
    import datasets

    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def with_image_transform(
    dataset,
    transform,
    image_column: str = "image",
    label_column: str | None = "label",
    mixable: bool = False,
    skip_corrupt_images: bool = False,
):
    """``dataset.with_transform`` for a ``datasets`` image dataset: each example becomes ``pixel_values`` (and
    ``labels`` when ``label_column`` is set; ``mixable=True`` marks training examples for
    ``MixUpCutMixCollator``). Train with ``remove_unused_columns=False``.

    Images are decoded by ``load_image``: an unreadable file raises ``ValueError`` naming it, or with
    ``skip_corrupt_images=True`` gives ``pixel_values=None`` with a warning (the collators drop such examples).
    """
    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(f"image column {image_column!r} not in the dataset's columns {columns}")
    if label_column is not None and label_column not in columns:
        raise ValueError(
            f"label column {label_column!r} not in the dataset's columns {columns}; pass label_column=None"
        )
    dataset = _decode_later(dataset, image_column)
    return dataset.with_transform(ImageTransform(transform, image_column, label_column, mixable, skip_corrupt_images))


@dataclass
class ImageTransform:
    """What ``with_image_transform`` applies to each batch; a class, not a closure, so that the dataset pickles
    (DataLoader workers started by "spawn", the default on macOS and Windows, get it pickled)."""

    transform: Callable
    image_column: str
    label_column: str | None
    mixable: bool
    skip_corrupt_images: bool

    def __call__(self, batch: dict) -> dict:
        images = [load_image(value, self.skip_corrupt_images) for value in batch[self.image_column]]
        output = {"pixel_values": [None if image is None else self.transform(image) for image in images]}
        if self.label_column is not None:
            output["labels"] = batch[self.label_column]
        if self.mixable:
            output["mixable"] = [True] * len(output["pixel_values"])
        return output


class ExampleIndexDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples also carry their position ``index`` (and any constant ``fields``,
    e.g. ``fixed_mask=True``). ``FCMAECollator(seed=...)`` derives each example's mask from it."""

    def __init__(self, dataset, **fields):
        self.dataset = dataset
        self.fields = fields

    def __len__(self) -> int:
        return len(self.dataset)

    def _extend(self, example: dict, index: int) -> dict:
        return {**example, "index": index, **self.fields}

    def __getitem__(self, index: int) -> dict:
        return self._extend(self.dataset[index], index)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # one formatted batch from `datasets` (its with_transform runs once per batch, not once per example)
        if hasattr(self.dataset, "__getitems__"):
            examples = self.dataset.__getitems__(indices)
        else:
            examples = [self.dataset[index] for index in indices]
        return [self._extend(example, index) for example, index in zip(examples, indices, strict=True)]


def with_example_index(dataset, **fields) -> ExampleIndexDataset:
    """Wrap a map-style dataset so each example carries ``index`` (its position) and ``fields``."""
    return ExampleIndexDataset(dataset, **fields)


def streaming_image_dataset(
    source,
    transform,
    image_column: str = "image",
    skip_corrupt_images: bool = False,
    shuffle_seed: int | None = None,
    shuffle_buffer_size: int = 10_000,
    **fields,
):
    """A streamed ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``) as FCMAE training input:
    each example becomes ``pixel_values`` (``None`` for an image skipped as unreadable), ``index`` (its position
    in the stream, counted before shuffling) and ``fields``. With ``shuffle_seed`` the stream is shuffled in a
    buffer of ``shuffle_buffer_size`` examples, re-seeded every epoch by the Trainer.

    Nothing is read until iteration; the Trainer needs ``max_steps``. Under several processes keep
    ``accelerator_config.dispatch_batches=False``: each process then reads its own shards of the stream.
    """
    columns = list(source.features) if source.features is not None else None
    if columns is not None and image_column not in columns:
        raise ValueError(f"image column {image_column!r} not in the streamed dataset's columns {columns}")
    source = _decode_later(source, image_column)

    apply = StreamingImageTransform(transform, image_column, skip_corrupt_images, fields)
    stream = source.map(apply, with_indices=True, remove_columns=columns)
    if shuffle_seed is not None:
        stream = stream.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer_size)
    return stream


@dataclass
class StreamingImageTransform:
    """What ``streaming_image_dataset`` maps over each streamed example; a class, not a closure, so that the stream
    pickles (DataLoader workers started by "spawn", the default on macOS and Windows, get it pickled)."""

    transform: Callable
    image_column: str
    skip_corrupt_images: bool
    fields: dict

    def __call__(self, example: dict, index: int) -> dict:
        image = load_image(example[self.image_column], self.skip_corrupt_images)
        return {"pixel_values": None if image is None else self.transform(image), "index": index, **self.fields}


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# folder names that `datasets`' imagefolder reads as splits (datasets.data_files.SPLIT_KEYWORDS)
SPLIT_FOLDER_NAMES = ("train", "training", "validation", "valid", "dev", "val", "test", "testing", "eval", "evaluation")


def check_file_names(root: Path) -> list[Path]:
    """Every file under ``root``; ``ValueError`` naming the first path that is not valid UTF-8 (Python keeps such
    bytes as surrogates; ``datasets`` and Arrow fail on them deep inside their code)."""
    files = []
    for path in sorted(root.rglob("*")):
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"the file name {os.fsencode(path)!r} under {os.fsencode(root)!r} is not valid UTF-8: rename it"
            ) from None
        if path.is_file():
            files.append(path)
    return files


def image_folder_classes(root: Path) -> dict[str, dict[str, int]]:
    """``{split: {class folder: image count}}`` of an image folder laid out as ``datasets`` reads it: split folders
    (``SPLIT_FOLDER_NAMES``) holding class folders, or class folders directly (split ``"train"``). Images directly
    in a split (or in ``root``) count under the class ``""``. Hidden folders are left out."""

    def count(folder: Path) -> int:
        return sum(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))

    def classes(folder: Path) -> dict[str, int]:
        found = {p.name: count(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
        loose = sum(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
        return {**({"": loose} if loose else {}), **found}

    subfolders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    splits = [p for p in subfolders if p.name.lower() in SPLIT_FOLDER_NAMES]
    if splits:
        return {p.name: classes(p) for p in splits}
    return {"train": classes(root)}


def check_image_folder(root: str | os.PathLike, labelled: bool = True) -> dict[str, dict[str, int]]:
    """``ValueError`` naming the problem for a data folder that cannot be read as an image folder: it does not exist
    or is a file, a file name is not valid UTF-8, it holds no images, or (``labelled``) a class folder holds none
    (``datasets`` would leave the class out without a word). Returns ``image_folder_classes``."""
    root = Path(root)
    if root.is_file():
        raise ValueError(f"image folder {str(root)!r} is a file, not a folder of images")
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    files = check_file_names(root)
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    layout = image_folder_classes(root)
    if labelled:
        for split, counts in layout.items():
            empty = [name for name, number in counts.items() if name and number == 0]
            if empty:
                where = root if split == "train" and not (root / split).is_dir() else root / split
                raise ValueError(
                    f"class folder(s) {empty} in {str(where)!r} hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                    "add images or remove the folder"
                )
    return layout


def check_output_outside_data(output_dir: str | os.PathLike, data_paths: dict[str, str | os.PathLike | None]) -> None:
    """``ValueError`` when ``output_dir`` equals, lies inside or holds one of ``data_paths`` (``{flag: path}``;
    ``None`` and paths that do not exist locally are skipped): checkpoints written into a data folder would be read
    as data by the next run (or make it unloadable), and a data folder inside the output could be deleted with it.
    Paths are compared after resolving ``..`` and symbolic links."""
    output = Path(output_dir).expanduser().resolve()
    for flag, path in data_paths.items():
        if path is None or not Path(path).expanduser().exists():
            continue
        data = Path(path).expanduser().resolve()
        if output == data or output.is_relative_to(data) or data.is_relative_to(output):
            relation = "is" if output == data else ("is inside" if output.is_relative_to(data) else "holds")
            raise ValueError(
                f"--output_dir {str(output_dir)!r} {relation} the data folder --{flag} {str(path)!r}: keep outputs and "
                "data apart (choose an --output_dir outside the data)"
            )


def image_folder_dataset(
    data_dir,
    transform=None,
    image_column: str = "image",
    label_column: str = "label",
    skip_corrupt_images: bool = False,
    streaming: bool = False,
    drop_labels: bool | None = None,
):
    """Load ``data_dir`` as a ``datasets`` image folder (``data_dir/<split>/<class>/*.png`` or
    ``data_dir/<class>/*.png``) and apply ``transform`` to every split with ``with_image_transform``
    (``streaming=True``: an ``IterableDatasetDict``, never given a transform here).

    ``drop_labels`` is ``datasets``' option: ``None`` labels the images by their class folders only when there are
    at least two; ``False`` always does, so a folder holding a single class (an evaluation set of one class) keeps
    its ``label_column``; ``True`` never does.

    Without a transform (or streamed) the images are decoded by the column's feature, ``BoundedImage``
    (``convnextv2_hf.bounded_image_feature``): bounded by the pixel limit like every other way in (an image over it
    is a ``ValueError`` naming the file and the limit), EXIF orientation applied, mode kept.

    ``skip_corrupt_images`` needs a transform (the transform is what skips), and a stream takes none here: either
    combination that would be silently ignored is a ``ValueError``.

    Returns a ``DatasetDict``. Checked first (``check_image_folder``), ``ValueError`` naming the problem: the folder
    does not exist or is a file, holds no images, a file name that is not valid UTF-8, or (unless
    ``drop_labels=True``) a class folder without images, which would silently drop its class.
    """
    from datasets import load_dataset

    from .bounded_image_feature import bounded_images

    if streaming and transform is not None:
        raise ValueError(
            "image_folder_dataset(streaming=True) gives a stream that no transform is applied to here: pass "
            "transform=None and give the stream its transform with streaming_image_dataset"
        )
    if skip_corrupt_images and transform is None:
        raise ValueError(
            "skip_corrupt_images=True needs a transform: without one the image feature decodes each image when it "
            "is read, and raises on an unreadable file (give a transform, or use streaming_image_dataset for a stream)"
        )
    root = Path(data_dir)
    check_image_folder(root, labelled=drop_labels is not True)
    splits = load_dataset("imagefolder", data_dir=str(root), streaming=streaming, drop_labels=drop_labels)
    if transform is None or streaming:
        for name in list(splits):  # no transform decodes them here: the image feature does, bounded
            splits[name] = bounded_images(splits[name], image_column)
        return splits
    for name in list(splits):
        has_labels = label_column in splits[name].column_names
        label = label_column if has_labels else None
        splits[name] = with_image_transform(
            splits[name], transform, image_column, label, skip_corrupt_images=skip_corrupt_images
        )
    return splits


__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDER_NAMES",
    "ExampleIndexDataset",
    "ImageTransform",
    "MixUpCutMixCollator",
    "StreamingImageTransform",
    "ToRGB",
    "fcmae_evaluation_transform",
    "fcmae_pretraining_transform",
    "check_file_names",
    "check_image_folder",
    "check_output_outside_data",
    "finetuning_transform",
    "image_folder_classes",
    "image_folder_dataset",
    "load_image",
    "readable_examples",
    "streaming_image_dataset",
    "with_example_index",
    "with_image_transform",
]
