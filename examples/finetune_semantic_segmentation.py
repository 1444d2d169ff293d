"""Semantic segmentation with ConvNeXt V2, the paper's downstream task: UperNet on a ``ConvNextV2Backbone``
initialised from an FCMAE or classifier checkpoint, trained with the stock ``transformers.Trainer``.

    python examples/finetune_semantic_segmentation.py --model_name_or_path out/fcmae \
        --train_dir data/train --validation_dir data/validation --class_names background,road,car \
        --output_dir out/upernet --image_size 512 --max_steps 160000 --per_device_train_batch_size 16
    torchrun --nproc_per_node 8 examples/finetune_semantic_segmentation.py ...     # or accelerate launch

Data: a folder of image/mask pairs (``--train_dir`` and optionally ``--validation_dir``, each holding
``images/`` and ``masks/`` with the same file stems; masks are PNG class-index images, 255 = ignore) or a
``datasets`` dataset (``--dataset_name``, an image and an annotation column). Without a validation split,
``--validation_fraction`` of the training set is held out. Labels: ``--class_names`` (class id = position) or
``--num_labels``.

The encoder weights of ``--model_name_or_path`` (``convnextv2.embeddings/encoder.*``, or the same names without
the prefix) go into the backbone by name, and what was left out is reported; the decode and auxiliary heads and
the backbone's output norms start from random weights. Layer-wise lr decay gives the backbone's blocks their
official layer ids and the heads scale 1.0. Mean IoU comes from ``convnextv2_hf.metrics`` (no Hub access). The
saved folder reloads with transformers alone: ``UperNetForSemanticSegmentation.from_pretrained(output_dir)``
and ``AutoImageProcessor.from_pretrained(output_dir)`` (a ``SegformerImageProcessor``).

Long runs: every numeric flag is checked when parsed, and an ``--output_dir`` that overlaps a data folder is
refused. A NaN or inf loss or gradient stops the run with an error naming the step, before that step is applied or
saved (``--stop_on_non_finite false`` lets it go on). ``--resume_from_checkpoint last`` takes the newest complete
checkpoint; a resume missing optimizer, scheduler or RNG state is refused unless ``--allow_fresh_optimizer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from transformers import (
    HfArgumentParser,
    SegformerImageProcessor,
    Trainer,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    set_seed,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import logging

from convnextv2_hf import ConvNextV2Config
from convnextv2_hf.configuration_convnextv2 import PRESETS
from convnextv2_hf.metrics import MeanIoU
from convnextv2_hf.recipes import CheckedTrainingArguments, check_finite_arguments, check_range
from convnextv2_hf.training import (
    LAYER_DECAY_TYPES,
    check_checkpoint_fits,
    check_safetensors_files,
    finish_distributed_run,
    layer_decay_optimizer,
    resume_checkpoint,
    run_callbacks,
)
from convnextv2_hf.transforms import IMAGE_EXTENSIONS, check_file_names, check_output_outside_data

logger = logging.get_logger(__name__)

OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]  # UperNet fuses all four stages
MASK_MODES = ("1", "L", "P", "I", "I;16")  # single-channel modes whose values are class ids
# the fields that shape the encoder; the rest of a checkpoint's config (classifier labels, FCMAE decoder) stays out
ENCODER_FIELDS = ("num_channels", "patch_size", "num_stages", "hidden_sizes", "depths", "hidden_act", "layer_norm_eps")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "FCMAE, classifier or encoder folder whose encoder initialises the backbone"}
    )
    model_size: str = field(default="atto", metadata={"help": f"for random initialisation: one of {list(PRESETS)}"})
    layer_decay: float = field(default=0.9, metadata={"help": "layer-wise lr decay of the backbone, in (0, 1]"})
    layer_decay_type: str = field(default="single", metadata={"help": f"one of {LAYER_DECAY_TYPES}"})
    drop_path_rate: float = 0.1
    decoder_hidden_size: int = field(default=512, metadata={"help": "UperNet's channels (its hidden_size)"})
    auxiliary_head: bool = field(default=True, metadata={"help": "an FCN head on stage 3 adds its loss in training"})
    auxiliary_loss_weight: float = 0.4
    auxiliary_channels: int = 256


@dataclass
class DataArguments:
    train_dir: str | None = field(default=None, metadata={"help": "folder with images/ and masks/ (same stems)"})
    validation_dir: str | None = field(default=None, metadata={"help": "the same layout, for evaluation"})
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets name or local path instead"})
    image_column: str = "image"
    annotation_column: str = "annotation"
    validation_fraction: float = field(default=0.1, metadata={"help": "held out when there is no validation split"})
    class_names: str | None = field(default=None, metadata={"help": "comma-separated class names, id = position"})
    num_labels: int | None = field(default=None, metadata={"help": "number of classes, when names are not given"})
    ignore_index: int = field(default=255, metadata={"help": "mask value that no loss or metric counts"})
    image_size: int = field(default=512, metadata={"help": "training crop and evaluation size, at least 32"})
    min_scale: float = field(default=0.5, metadata={"help": "smallest area fraction of a random crop (1 = no crop)"})
    horizontal_flip: bool = True


@dataclass
class SegmentationTrainingArguments(CheckedTrainingArguments):
    """``TrainingArguments`` with defaults for fine-tuning a pretrained backbone under UperNet (AdamW at 1e-4 with
    weight decay 0.05 and a polynomial schedule, as the ConvNeXt segmentation setups use), checked when parsed."""

    learning_rate: float = field(default=1e-4, metadata={"help": "peak lr of the heads; blocks get layer decay"})
    weight_decay: float = field(default=0.05, metadata={"help": "not on biases, norms and GRN parameters"})
    lr_scheduler_type: str = field(default="polynomial", metadata={"help": "transformers scheduler name"})


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args=None) -> None:
    """``ValueError`` for arguments that cannot work, before any data or weights are read and anything is written
    (the training arguments check themselves when parsed)."""
    check_finite_arguments(model_args, data_args)
    if model_args.model_name_or_path is None and model_args.model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_args.model_size!r}; choose one of {list(PRESETS)}")
    check_range("layer_decay", model_args.layer_decay, 0, 1, low_open=True)
    check_range("drop_path_rate", model_args.drop_path_rate, 0, 1, high_open=True)
    check_range("decoder_hidden_size", model_args.decoder_hidden_size, 1)
    check_range("auxiliary_loss_weight", model_args.auxiliary_loss_weight, 0)
    check_range("auxiliary_channels", model_args.auxiliary_channels, 1)
    if (data_args.train_dir is None) == (data_args.dataset_name is None):
        raise ValueError("give exactly one of --train_dir and --dataset_name")
    if data_args.validation_dir is not None and data_args.train_dir is None:
        raise ValueError("--validation_dir goes with --train_dir (a dataset brings its own splits)")
    stride = ConvNextV2Config().total_stride  # the encoder's: every stage keeps at least one position from here on
    if data_args.image_size < stride:
        raise ValueError(f"image_size must be at least the total stride {stride}, got {data_args.image_size}")
    check_range("min_scale", data_args.min_scale, 0, 1, low_open=True)
    check_range("validation_fraction", data_args.validation_fraction, 0, 1, low_open=True, high_open=True)
    classes_of(data_args)
    if training_args is not None:
        data = {name: getattr(data_args, name) for name in ("train_dir", "validation_dir", "dataset_name")}
        check_output_outside_data(training_args.output_dir, data)


def classes_of(data_args: DataArguments) -> list[str]:
    """The class names, index = class id, from ``--class_names`` or ``--num_labels`` (named by their ids)."""
    if data_args.class_names is not None:
        names = [name.strip() for name in data_args.class_names.split(",")]
        if any(not name for name in names) or len(set(names)) != len(names):
            raise ValueError(f"--class_names must be distinct non-empty names, got {data_args.class_names!r}")
        if data_args.num_labels is not None and data_args.num_labels != len(names):
            raise ValueError(f"--num_labels {data_args.num_labels} but --class_names has {len(names)} names")
    elif data_args.num_labels is not None:
        names = [str(i) for i in range(data_args.num_labels)]
    else:
        raise ValueError("give the classes: --class_names a,b,c (class id = position) or --num_labels N")
    if len(names) < 2:
        raise ValueError(f"segmentation needs at least 2 classes, got {len(names)}")
    if data_args.ignore_index in range(len(names)):
        raise ValueError(f"ignore_index {data_args.ignore_index} is a class id (0..{len(names) - 1})")
    return names


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def pair_folder_dataset(folder: str, image_column: str, annotation_column: str):
    """A ``datasets.Dataset`` of (image path, mask path) from ``folder/images`` and ``folder/masks``, paired by
    file stem. Checked up front, naming the files: every image has a mask and every mask an image, masks are
    single-channel PNGs (JPEG would blur the class ids)."""
    from datasets import Dataset

    root = Path(folder)
    if root.is_file():
        raise ValueError(f"{str(root)!r} is a file; give a folder with images/ and masks/ sub-folders")
    image_dir, mask_dir = root / "images", root / "masks"
    for path in (image_dir, mask_dir):
        if not path.is_dir():
            raise ValueError(f"{str(root)!r} needs images/ and masks/ sub-folders; {str(path)!r} is missing")
    check_file_names(root)  # a name that is not valid UTF-8 would fail deep inside datasets
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    if not images:
        raise ValueError(f"{str(image_dir)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    without_mask = sorted(set(images) - set(masks))
    without_image = sorted(set(masks) - set(images))
    if without_mask or without_image:
        raise ValueError(
            f"images and masks in {str(root)!r} must pair up by file stem: images without a mask "
            f"{without_mask[:5]}{' ...' if len(without_mask) > 5 else ''}, masks without an image "
            f"{without_image[:5]}{' ...' if len(without_image) > 5 else ''}"
        )
    for stem in images:
        mask = masks[stem]
        if mask.suffix.lower() != ".png":
            raise ValueError(f"mask {mask} is not a PNG: masks must be lossless class-index images")
        try:
            with PIL.Image.open(mask) as opened:
                mode = opened.mode
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise ValueError(f"cannot read mask {mask}: {error}") from error
        if mode not in MASK_MODES:
            raise ValueError(f"mask {mask} has mode {mode}: masks must be single-channel class-index PNGs {MASK_MODES}")
    return Dataset.from_dict(
        {image_column: [str(images[s]) for s in images], annotation_column: [str(masks[s]) for s in images]}
    )


def load_splits(data_args: DataArguments, seed: int):
    """(train, validation) ``datasets`` splits with the image and annotation columns."""
    if data_args.dataset_name is not None:
        from datasets import load_dataset

        splits = load_dataset(data_args.dataset_name)
        if "train" not in splits:
            raise ValueError(f"dataset {data_args.dataset_name!r} has no 'train' split (splits: {sorted(splits)})")
        train, validation = splits["train"], splits.get("validation")
    else:
        columns = (data_args.image_column, data_args.annotation_column)
        train = pair_folder_dataset(data_args.train_dir, *columns)
        validation = pair_folder_dataset(data_args.validation_dir, *columns) if data_args.validation_dir else None
    if validation is None:
        if len(train) < 2:
            raise ValueError(f"cannot hold out a validation set from {len(train)} training example(s)")
        parts = train.train_test_split(test_size=data_args.validation_fraction, seed=seed)
        train, validation = parts["train"], parts["test"]
    for name, split in (("train", train), ("validation", validation)):
        for column in (data_args.image_column, data_args.annotation_column):
            if column not in split.column_names:
                raise ValueError(f"the {name} split has no {column!r} column (columns: {split.column_names})")
    return train, validation


def _open(item, what: str) -> PIL.Image.Image:
    """A PIL image from a path (folder data) or a decoded ``datasets`` image; errors name the file."""
    if isinstance(item, PIL.Image.Image):
        return item
    try:
        with PIL.Image.open(item) as image:
            image.load()
            return image
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {what} {item}: {error}") from error


def segmentation_transform(data_args: DataArguments, num_labels: int, train: bool):
    """``datasets`` batch transform: images -> normalised (3, S, S) ``pixel_values``, masks -> (S, S) int64
    ``labels``. Training: random resized crop (area ``min_scale``..1) and flip, applied to image and mask alike
    (nearest-neighbour for the mask); evaluation: resize to S x S."""
    size = (data_args.image_size, data_args.image_size)
    if train:
        steps = [v2.RandomResizedCrop(size, scale=(data_args.min_scale, 1.0), antialias=True)]
        if data_args.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        geometry = v2.Compose(steps)
    else:
        geometry = v2.Resize(size, antialias=True)
    normalise = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    )

    def transform(batch: dict) -> dict:
        pixel_values, labels = [], []
        for image_item, mask_item in zip(
            batch[data_args.image_column], batch[data_args.annotation_column], strict=True
        ):
            image, mask = _open(image_item, "image").convert("RGB"), _open(mask_item, "mask")
            name = getattr(mask, "filename", "") or "a mask"
            if mask.mode not in MASK_MODES:
                raise ValueError(f"{name} has mode {mask.mode}: masks must be single-channel class ids {MASK_MODES}")
            if image.size != mask.size:
                raise ValueError(f"{name} is {mask.size[0]}x{mask.size[1]}, its image {image.size[0]}x{image.size[1]}")
            ids = np.asarray(mask, dtype=np.int64)
            bad = np.setdiff1d(np.unique(ids), [*range(num_labels), data_args.ignore_index])
            if bad.size:
                raise ValueError(
                    f"{name} holds values {bad.tolist()[:10]} that are neither class ids 0..{num_labels - 1} nor the "
                    f"ignore index {data_args.ignore_index}"
                )
            pixels = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
            pixels, target = geometry(pixels, tv_tensors.Mask(torch.from_numpy(ids)[None]))
            pixel_values.append(normalise(pixels).as_subclass(torch.Tensor))
            labels.append(target[0].as_subclass(torch.Tensor))
        return {"pixel_values": pixel_values, "labels": labels}

    return transform


def without_a_last_batch_of_one(train, training_args: TrainingArguments):
    """UperNet's pyramid pooling normalises 1x1 maps with BatchNorm, which cannot train on a batch of one image:
    refuse a per-device batch of 1, and leave out one example when the last batch of an epoch would hold one
    (one process; under several, accelerate fills the last batch from the start of the dataset)."""
    batch_size = training_args.per_device_train_batch_size
    if batch_size < 2:
        raise ValueError(
            f"per_device_train_batch_size must be >= 2, got {batch_size}: UperNet's pyramid pooling normalises 1x1 "
            "maps with BatchNorm, which needs two images per batch"
        )
    if training_args.world_size == 1 and len(train) % batch_size == 1:
        logger.warning(
            f"leaving out 1 of {len(train)} training examples: in batches of {batch_size} the last batch of each "
            "epoch would hold a single image, which UperNet's BatchNorm cannot train on"
        )
        train = train.select(range(len(train) - 1))
    return train


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]),
    }


def inference_processor(data_args: DataArguments) -> SegformerImageProcessor:
    """What stock transformers needs to run the saved model: resize to S x S, rescale, ImageNet normalisation."""
    return SegformerImageProcessor(
        do_resize=True,
        size={"height": data_args.image_size, "width": data_args.image_size},
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_reduce_labels=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def load_encoder_weights(backbone: torch.nn.Module, folder: str | Path) -> dict[str, list[str]]:
    """Copy the encoder of a saved FCMAE, classifier or encoder (``convnextv2.embeddings.*`` /
    ``convnextv2.encoder.*``, or the same without the prefix) into ``backbone`` by name.

    Returns ``{"loaded", "newly_initialised", "not_used"}`` key lists (and logs them). ``ValueError`` when the
    folder has no complete safetensors file, holds no encoder, or its encoder does not fit the backbone (a missing
    block, an extra one, another shape): a half-loaded encoder is never trained silently.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(folder)!r} holds no *.safetensors weights to initialise the backbone from")
    check_safetensors_files(folder)
    saved: dict[str, torch.Tensor] = {}
    for file in files:
        saved.update(load_file(str(file)))
    target = backbone.state_dict()
    encoder_prefixes = ("embeddings.", "encoder.")
    loaded, not_used, wrong_shape = {}, [], []
    for key, tensor in saved.items():
        name = key.removeprefix("convnextv2.")
        if not name.startswith(encoder_prefixes):
            not_used.append(key)  # classifier, final norm, FCMAE decoder and mask token
        elif name not in target:
            wrong_shape.append(f"{key} (no such backbone weight)")
        elif target[name].shape != tensor.shape:
            wrong_shape.append(f"{key} {tuple(tensor.shape)} vs backbone {tuple(target[name].shape)}")
        else:
            loaded[name] = tensor
    if not loaded:
        raise ValueError(f"{str(folder)!r} holds no ConvNeXt V2 encoder weights (convnextv2.encoder.* or encoder.*)")
    missing_encoder = sorted(k for k in target if k.startswith(encoder_prefixes) and k not in loaded)
    if wrong_shape or missing_encoder:
        raise ValueError(
            f"the encoder in {str(folder)!r} does not fit the backbone: unexpected {wrong_shape[:5]}, "
            f"missing {missing_encoder[:5]}"
        )
    backbone.load_state_dict(loaded, strict=False)
    report = {
        "loaded": sorted(loaded),
        "newly_initialised": sorted(k for k in target if k not in loaded),
        "not_used": sorted(not_used),
    }
    logger.warning(
        f"backbone initialised from {folder}: {len(loaded)} encoder tensors loaded; newly initialised: "
        f"{report['newly_initialised']}; not used: {report['not_used'][:8]}"
        f"{' ...' if len(report['not_used']) > 8 else ''}"
    )
    return report


def build_model(
    model_args: ModelArguments, names: list[str], ignore_index: int
) -> tuple[UperNetForSemanticSegmentation, dict | None]:
    """UperNet over a ``ConvNextV2Backbone`` (built through ``AutoBackbone``, which is ours once
    ``convnextv2_hf`` is imported), the backbone initialised from ``model_name_or_path`` when given."""
    if model_args.model_name_or_path is not None:
        source = ConvNextV2Config.from_pretrained(model_args.model_name_or_path)
        encoder = {name: getattr(source, name) for name in ENCODER_FIELDS}
    else:
        encoder = {name: getattr(ConvNextV2Config.from_preset(model_args.model_size), name) for name in ENCODER_FIELDS}
    backbone_config = ConvNextV2Config(**encoder, out_features=OUT_FEATURES, drop_path_rate=model_args.drop_path_rate)
    id2label = dict(enumerate(names))
    config = UperNetConfig(
        backbone_config=backbone_config,
        num_labels=len(names),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        hidden_size=model_args.decoder_hidden_size,
        use_auxiliary_head=model_args.auxiliary_head,
        auxiliary_loss_weight=model_args.auxiliary_loss_weight,
        auxiliary_channels=model_args.auxiliary_channels,
        loss_ignore_index=ignore_index,
    )
    model = UperNetForSemanticSegmentation(config)
    report = None
    if model_args.model_name_or_path is not None:
        report = load_encoder_weights(model.backbone, model_args.model_name_or_path)
    return model, report


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, SegmentationTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(model_args, data_args, training_args)
    names = classes_of(data_args)
    resume = resume_checkpoint(training_args)  # a bad checkpoint stops us before training
    training_args.remove_unused_columns = False  # the transforms read the image and annotation columns
    training_args.batch_eval_metrics = True  # MeanIoU adds up a confusion matrix batch by batch
    set_seed(training_args.seed)

    train, validation = load_splits(data_args, training_args.seed)
    train = without_a_last_batch_of_one(train, training_args)
    train.set_transform(segmentation_transform(data_args, len(names), train=True))
    validation.set_transform(segmentation_transform(data_args, len(names), train=False))
    model, _ = build_model(model_args, names, data_args.ignore_index)
    if resume is not None:
        check_checkpoint_fits(resume, model)  # another task or size: named before the output folder is created

    def predicted_ids(logits, labels):  # keep (N, H, W) class ids, not (N, K, H, W) logits, per batch
        return logits.argmax(dim=1)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collate,
        processing_class=inference_processor(data_args),
        compute_metrics=MeanIoU(len(names), ignore_index=data_args.ignore_index),
        preprocess_logits_for_metrics=predicted_ids,
        optimizer_cls_and_kwargs=layer_decay_optimizer(
            model, training_args, model_args.layer_decay, model_args.layer_decay_type
        ),
        callbacks=run_callbacks(training_args),
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    trainer.log_metrics("train", train_result.metrics)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.create_model_card(
            model_name=training_args.output_dir.rstrip("/").split("/")[-1],
            finetuned_from=model_args.model_name_or_path,
            tasks="image-segmentation",
        )
    return metrics


if __name__ == "__main__":
    main()
    finish_distributed_run()
