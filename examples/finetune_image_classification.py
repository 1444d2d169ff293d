"""Fine-tune ConvNeXt V2 on your own labelled images with the stock ``transformers.Trainer``.

    python examples/finetune_image_classification.py --model_name_or_path out/fcmae --recipe atto \
        --train_dir data/train --validation_dir data/validation --output_dir out/classifier \
        --num_train_epochs 100 --per_device_train_batch_size 64 --eval_strategy epoch
    torchrun --nproc_per_node 8 examples/finetune_image_classification.py ...   # or accelerate launch

``--recipe atto|tiny|base`` sets every part of the official fine-tuning recipe that you do not give: epochs,
warm-up epochs, the cosine schedule down to ``min_lr``, ``lr = base_learning_rate * total batch / 256``, layer
decay and its type, weight decay (not on biases, 1-D parameters, GRN gamma/beta), drop path, EMA, MixUp/CutMix,
label smoothing and random erasing. Any flag given explicitly wins. The effective values are logged at the start
and listed in the model card. Without ``--model_name_or_path`` the model starts from random weights
(``--model_size``). Data: image folders (``--train_dir``/``--validation_dir``, or one ``--data_dir`` with
train/validation sub-folders, or a flat class folder split by ``--validation_fraction``) or a ``datasets``
dataset (``--dataset_name``). ``--skip_corrupt_images`` skips unreadable images with a warning instead of stopping
at the first one.

Long runs: every numeric flag is checked when parsed, and an ``--output_dir`` that overlaps a data folder is
refused. A NaN or inf loss or gradient stops the run with an error naming the step, before that step is applied or
saved (``--stop_on_non_finite false`` lets it go on). ``--resume_from_checkpoint last`` takes the newest complete
checkpoint; a resume missing optimizer, scheduler, RNG or EMA state is refused unless ``--allow_fresh_optimizer``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, set_seed

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ImageProcessor
from convnextv2_hf.configuration_convnextv2 import PRESETS
from convnextv2_hf.metrics import top_k_compute_metrics
from convnextv2_hf.recipes import (
    FINETUNE_HEAD_INIT_STD,
    FinetuneTrainingArguments,
    check_finite_arguments,
    check_range,
    create_model_card,
)
from convnextv2_hf.training import (
    EMACallback,
    check_checkpoint_fits,
    finish_distributed_run,
    layer_decay_optimizer,
    resume_checkpoint,
    run_callbacks,
    setup_script_logging,
)
from convnextv2_hf.transforms import (
    MixUpCutMixCollator,
    check_output_outside_data,
    finetuning_transform,
    with_image_transform,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "FCMAE, encoder or classifier folder"})
    model_size: str = field(default="atto", metadata={"help": f"for random initialisation: one of {list(PRESETS)}"})
    ema_for_final_save: bool = field(default=False, metadata={"help": "save the EMA weights as the model"})
    head_init_std: float = field(default=FINETUNE_HEAD_INIT_STD, metadata={"help": "new head init std"})


@dataclass
class DataArguments:
    train_dir: str | None = None
    validation_dir: str | None = None
    data_dir: str | None = field(default=None, metadata={"help": "folder with train/ and validation/ (or flat)"})
    dataset_name: str | None = None
    validation_fraction: float = field(default=0.1, metadata={"help": "held out when there is no validation split"})
    image_column: str = "image"
    label_column: str = "label"
    image_size: int = 224
    rand_augment_magnitude: int = 9
    horizontal_flip: bool = True
    skip_corrupt_images: bool = field(
        default=False, metadata={"help": "skip unreadable images with a warning instead of stopping"}
    )


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args=None) -> None:
    """``ValueError`` naming the flag, before any data or weights are read and before anything is written (the
    training arguments check themselves when parsed)."""
    check_finite_arguments(model_args, data_args)
    if model_args.model_name_or_path is None and model_args.model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_args.model_size!r}; choose one of {list(PRESETS)}")
    check_range("head_init_std", model_args.head_init_std, 0, low_open=True)
    check_range("validation_fraction", data_args.validation_fraction, 0, 1, low_open=True, high_open=True)
    check_range("image_size", data_args.image_size, 32)  # the encoder's total stride
    check_range("rand_augment_magnitude", data_args.rand_augment_magnitude, 0, 30)  # torchvision's 31 bins
    sources = [data_args.train_dir, data_args.data_dir, data_args.dataset_name]
    if sum(source is not None for source in sources) != 1:
        raise ValueError("give exactly one of --train_dir, --data_dir and --dataset_name")
    if training_args is not None:
        data = {name: getattr(data_args, name) for name in ("train_dir", "validation_dir", "data_dir", "dataset_name")}
        check_output_outside_data(training_args.output_dir, data)


def load_splits(data_args: DataArguments, seed: int):
    """(train, validation) ``datasets`` splits, checked: images present, every class in the validation split."""
    from datasets import DatasetDict, load_dataset

    from convnextv2_hf.transforms import image_folder_dataset

    # labels are kept even for a single class folder, so that it is named below (not a missing 'label' column)
    if data_args.dataset_name is not None:
        splits = load_dataset(data_args.dataset_name)
    elif data_args.data_dir is not None:
        splits = image_folder_dataset(data_args.data_dir, drop_labels=False)
    else:
        splits = DatasetDict(train=image_folder_dataset(data_args.train_dir, drop_labels=False)["train"])
        if data_args.validation_dir is not None:
            # labels kept even for a single class folder, so that a class set unlike train's is named below
            splits["validation"] = image_folder_dataset(data_args.validation_dir, drop_labels=False)["train"]
    train = splits["train"]
    validation = splits.get("validation") or splits.get("test")
    source = data_args.dataset_name or data_args.data_dir or data_args.train_dir
    label_feature = train.features.get(data_args.label_column)
    if label_feature is not None and len(getattr(label_feature, "names", None) or [0, 1]) < 2:
        raise ValueError(
            f"the training images of {source!r} form one class {label_feature.names}: fine-tuning needs at least two "
            "(one sub-folder per class)"
        )
    if validation is None:
        check_stratified_split(train, data_args.label_column, data_args.validation_fraction)
        parts = train.train_test_split(
            test_size=data_args.validation_fraction, seed=seed, stratify_by_column=data_args.label_column
        )
        train, validation = parts["train"], parts["test"]
    for name, split in (("train", train), ("validation", validation)):
        for column in (data_args.image_column, data_args.label_column):
            if column not in split.column_names:
                raise ValueError(f"the {name} split has no {column!r} column (columns: {split.column_names})")
    names = train.features[data_args.label_column].names
    validation_names = getattr(validation.features[data_args.label_column], "names", names)
    if validation_names != names:  # class ids are positions in these lists: they would mean other classes
        raise ValueError(
            f"the validation classes {validation_names} are not the training classes {names}: give both splits "
            "the same class folders"
        )
    for name, split in (("train", train), ("validation", validation)):
        present = set(split[data_args.label_column])
        missing = [names[i] for i in range(len(names)) if i not in present]
        if missing:
            raise ValueError(f"class(es) {missing} have no image in the {name} split")
    return train, validation, names


def check_stratified_split(train, label_column: str, fraction: float) -> None:
    """``ValueError`` naming the classes when ``--validation_fraction`` cannot hold out every class while keeping
    every class in training: each needs 2 images, and each side of the split at least one image per class."""
    import math
    from collections import Counter

    if label_column not in train.column_names:
        return  # named by the column check of load_splits
    counts = Counter(train[label_column])
    names = getattr(train.features[label_column], "names", None) or sorted(counts)
    few = {names[label] if isinstance(label, int) else label: n for label, n in sorted(counts.items()) if n < 2}
    if few:
        raise ValueError(
            f"class(es) {few} (images per class) have fewer than 2 training images: a stratified validation split "
            "needs at least one on each side; add images, or give --validation_dir"
        )
    held_out = math.ceil(fraction * len(train))
    if held_out < len(counts) or len(train) - held_out < len(counts):
        raise ValueError(
            f"--validation_fraction {fraction} of {len(train)} training images holds out {held_out} and keeps "
            f"{len(train) - held_out}; a stratified split needs at least one image of each of the {len(counts)} "
            "classes on each side: change --validation_fraction, or give --validation_dir"
        )


def build_model(model_args: ModelArguments, labels: list[str], drop_path_rate: float):
    id2label = dict(enumerate(labels))
    fields = dict(
        num_labels=len(labels),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        drop_path_rate=drop_path_rate,
    )
    if model_args.model_name_or_path is None:
        model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset(model_args.model_size, **fields))
        new_head = True
    else:
        model, info = ConvNextV2ForImageClassification.from_pretrained(
            model_args.model_name_or_path, ignore_mismatched_sizes=True, output_loading_info=True, **fields
        )
        new_head = "classifier.weight" in set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}
    if new_head:  # the official fine-tuning head init
        with torch.no_grad():
            torch.nn.init.trunc_normal_(model.classifier.weight, std=model_args.head_init_std)
            model.classifier.bias.zero_()
    return model


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args, resume: str | None = None):
    """The model, data, collator, optimizer and callbacks of the (recipe-resolved) arguments, in a Trainer.
    ``resume``: the checkpoint the run will resume from, checked against the model before the Trainer exists."""
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    train, validation, labels = load_splits(data_args, training_args.seed)  # fails before any training
    skip = data_args.skip_corrupt_images
    train = with_image_transform(
        train,
        finetuning_transform(
            data_args.image_size,
            rand_augment_magnitude=data_args.rand_augment_magnitude,
            random_erasing=training_args.random_erasing,
            horizontal_flip=data_args.horizontal_flip,
        ),
        data_args.image_column,
        data_args.label_column,
        mixable=True,
        skip_corrupt_images=skip,
    )
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": data_args.image_size})

    def evaluation_transform(image):
        return processor(image, return_tensors="pt")["pixel_values"][0]

    validation = with_image_transform(
        validation, evaluation_transform, data_args.image_column, data_args.label_column, skip_corrupt_images=skip
    )

    model = build_model(model_args, labels, training_args.drop_path_rate)
    if resume is not None:
        check_checkpoint_fits(resume, model)  # another task or size: named before the output folder is created
    collator = MixUpCutMixCollator(
        num_labels=len(labels),
        mixup_alpha=training_args.mixup,
        cutmix_alpha=training_args.cutmix,
        label_smoothing=training_args.label_smoothing,
    )
    callbacks = run_callbacks(training_args)  # stop at a non-finite step; on CPU, freed memory kept
    if training_args.ema_decay > 0:
        callbacks.append(EMACallback(training_args.ema_decay, allow_fresh_start=training_args.allow_fresh_optimizer))
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=top_k_compute_metrics(k=5),
        optimizer_cls_and_kwargs=layer_decay_optimizer(
            model, training_args, training_args.layer_decay, training_args.layer_decay_type
        ),
        callbacks=callbacks,
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(argv)
    setup_script_logging(training_args, logger)
    logger.info("effective training hyper-parameters\n" + training_args.recipe_report())
    resume = resume_checkpoint(training_args)  # True/last -> the newest complete checkpoint; a bad one stops us here
    trainer = build_trainer(model_args, data_args, training_args, resume)
    model, validation = trainer.model, trainer.eval_dataset
    ema = next((callback for callback in trainer.callback_handler.callbacks if isinstance(callback, EMACallback)), None)

    trainer.train(resume_from_checkpoint=ema.resume_from(resume) if ema is not None else resume)
    metrics = trainer.evaluate(eval_dataset=validation, metric_key_prefix="eval")
    if ema is not None:
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        ema.copy_to(model)
        metrics.update(trainer.evaluate(eval_dataset=validation, metric_key_prefix="eval_ema"))
        if not model_args.ema_for_final_save:
            model.load_state_dict(trained)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_model()
    trainer.save_state()
    create_model_card(
        trainer,
        model_name=training_args.output_dir.rstrip("/").split("/")[-1],
        finetuned_from=model_args.model_name_or_path,
        tasks="image-classification",
        dataset=data_args.dataset_name,
    )
    return metrics


if __name__ == "__main__":
    main()
    finish_distributed_run()
