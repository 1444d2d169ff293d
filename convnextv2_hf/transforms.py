"""Training transforms of the official recipes, built from torchvision.transforms.v2.

- ``fcmae_pretraining_transform``: RandomResizedCrop(scale 0.2-1.0, bicubic), horizontal flip, normalise.
- ``finetuning_transform``: RandomResizedCrop, flip, RandAugment, normalise, RandomErasing(0.25).
- ``MixUpCutMixCollator``: batches examples and applies MixUp (alpha 0.8) or CutMix (alpha 1.0), switching
  with probability 0.5, with label smoothing; the soft labels go straight into
  ``ConvNextV2ForImageClassification`` (which takes (N, num_labels) float labels as soft targets).

RandAugment differs from the official "rand-m9-mstd0.5-inc1" (timm): torchvision applies a fixed magnitude 9
(no per-op magnitude noise, the "mstd0.5" part) and its own op set and magnitude directions (timm's "inc1"
makes every op stronger with the magnitude; torchvision's ops already do so, but the op lists differ: timm
adds Invert/SolarizeAdd and leaves out Identity). Random erasing fills with per-pixel normal noise like the
official "pixel" mode, in the normalised space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

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


def with_image_transform(
    dataset,
    transform,
    image_column: str = "image",
    label_column: str | None = "label",
    mixable: bool = False,
):
    """``dataset.with_transform`` for a ``datasets`` image dataset: each example becomes ``pixel_values`` (and
    ``labels`` when ``label_column`` is set; ``mixable=True`` marks training examples for
    ``MixUpCutMixCollator``). Train with ``remove_unused_columns=False``."""
    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(f"image column {image_column!r} not in the dataset's columns {columns}")
    if label_column is not None and label_column not in columns:
        raise ValueError(
            f"label column {label_column!r} not in the dataset's columns {columns}; pass label_column=None"
        )

    def apply(batch: dict) -> dict:
        output = {"pixel_values": [transform(image) for image in batch[image_column]]}
        if label_column is not None:
            output["labels"] = batch[label_column]
        if mixable:
            output["mixable"] = [True] * len(output["pixel_values"])
        return output

    return dataset.with_transform(apply)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_folder_dataset(data_dir, transform=None, image_column: str = "image", label_column: str = "label"):
    """Load ``data_dir`` as a ``datasets`` image folder (``data_dir/<split>/<class>/*.png`` or
    ``data_dir/<class>/*.png``) and apply ``transform`` to every split with ``with_image_transform``.

    Returns a ``DatasetDict``; ``ValueError`` when the folder does not exist or holds no images.
    """
    from pathlib import Path

    from datasets import load_dataset

    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*") if p.is_file()):
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    splits = load_dataset("imagefolder", data_dir=str(root))
    if transform is None:
        return splits
    for name in list(splits):
        has_labels = label_column in splits[name].column_names
        splits[name] = with_image_transform(splits[name], transform, image_column, label_column if has_labels else None)
    return splits


__all__ = [
    "IMAGE_EXTENSIONS",
    "MixUpCutMixCollator",
    "image_folder_dataset",
    "fcmae_pretraining_transform",
    "finetuning_transform",
    "with_image_transform",
]
