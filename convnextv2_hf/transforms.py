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
- ``with_example_index`` and ``streaming_image_dataset``: each example carries its ``index`` (what
  ``FCMAECollator`` seeds its masks with).

RandAugment differs from the official "rand-m9-mstd0.5-inc1" (timm): torchvision applies a fixed magnitude 9
(no per-op magnitude noise, the "mstd0.5" part) and its own op set and magnitude directions (timm's "inc1"
makes every op stronger with the magnitude; torchvision's ops already do so, but the op lists differ: timm
adds Invert/SolarizeAdd and leaves out Identity). Random erasing fills with per-pixel normal noise like the
official "pixel" mode, in the normalised space.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torchvision.transforms import v2
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import logging

logger = logging.get_logger(__name__)

BICUBIC = v2.InterpolationMode.BICUBIC


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
            v2.RGB(),
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
            v2.RGB(),
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
    steps = [v2.RGB(), v2.RandomResizedCrop(size, interpolation=BICUBIC, antialias=True)]
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
    raw bytes or a PIL image. Decoding every pixel here (not lazily later) makes a truncated file fail here.

    A file that cannot be read raises ``ValueError`` naming it; with ``skip_corrupt_images=True`` it is logged as a
    warning and ``None`` is returned instead.
    """
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    else:
        data, path = None, value
    name = str(path) if path else "an image given as bytes (no file name)"
    try:
        with PIL.Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()  # the whole file now: PIL's open() reads only the header
        return image
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors for bad files
        if not skip_corrupt_images:
            raise ValueError(
                f"cannot read image {name}: {error}. Remove or replace the file, or skip unreadable images with a "
                "warning (--skip_corrupt_images / skip_corrupt_images=True)"
            ) from error
        logger.warning(f"skipping unreadable image {name}: {error}")
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

    def apply(batch: dict) -> dict:
        images = [load_image(value, skip_corrupt_images) for value in batch[image_column]]
        output = {"pixel_values": [None if image is None else transform(image) for image in images]}
        if label_column is not None:
            output["labels"] = batch[label_column]
        if mixable:
            output["mixable"] = [True] * len(output["pixel_values"])
        return output

    return dataset.with_transform(apply)


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

    def apply(example: dict, index: int) -> dict:
        image = load_image(example[image_column], skip_corrupt_images)
        return {"pixel_values": None if image is None else transform(image), "index": index, **fields}

    stream = source.map(apply, with_indices=True, remove_columns=columns)
    if shuffle_seed is not None:
        stream = stream.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer_size)
    return stream


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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

    Returns a ``DatasetDict``; ``ValueError`` when the folder does not exist or holds no images.
    """
    from datasets import load_dataset

    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*") if p.is_file()):
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    splits = load_dataset("imagefolder", data_dir=str(root), streaming=streaming, drop_labels=drop_labels)
    if transform is None or streaming:
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
    "ExampleIndexDataset",
    "MixUpCutMixCollator",
    "fcmae_evaluation_transform",
    "fcmae_pretraining_transform",
    "finetuning_transform",
    "image_folder_dataset",
    "load_image",
    "readable_examples",
    "streaming_image_dataset",
    "with_example_index",
    "with_image_transform",
]
