"""FCMAE pretraining of ConvNeXt V2 on unlabelled images with the stock ``transformers.Trainer``.

    python examples/pretrain_fcmae.py --train_dir images/ --model_size atto --output_dir out/fcmae \
        --recipe fcmae --per_device_train_batch_size 64 --validation_split_fraction 0.01 --eval_strategy epoch
    torchrun --nproc_per_node 8 examples/pretrain_fcmae.py ...        # or: accelerate launch --multi_gpu ...

Data: an image folder (``--train_dir``, labels ignored) or any ``datasets`` dataset with an image column
(``--dataset_name``); ``--streaming`` reads either as a stream (data larger than memory or disk cache; needs
``--max_steps``). Validation: ``--validation_dir``, the data's own validation split, or
``--validation_split_fraction`` of the training set; its masks are fixed per image, so ``eval_loss`` compares
across steps and runs. Training masks depend only on (seed, epoch, image index): a resumed run sees the masks
of the uninterrupted one.

``--recipe fcmae`` (or ``fcmae-1600``) sets the official schedule: 800 epochs, 40 warm-up epochs, cosine to
``min_lr`` 0, ``lr = 1.5e-4 * total batch / 256``, AdamW betas (0.9, 0.95), weight decay 0.05 (not on biases,
1-D parameters, GRN gamma/beta or the mask token). Any flag given explicitly wins over the recipe. Reconstruction
grids are written to ``<output_dir>/reconstructions``.

Long runs: every numeric flag is checked when parsed, and an ``--output_dir`` that overlaps a data folder is
refused. A NaN or inf loss or gradient stops the run with an error naming the step, before that step is applied or
saved (``--stop_on_non_finite false`` lets it go on). ``--resume_from_checkpoint last`` takes the newest complete
checkpoint; a resume missing optimizer, scheduler or RNG state is refused unless ``--allow_fresh_optimizer``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, set_seed

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor
from convnextv2_hf.configuration_convnextv2 import PRESETS
from convnextv2_hf.recipes import (
    PRETRAIN_MODEL,
    PretrainTrainingArguments,
    check_finite_arguments,
    check_range,
    create_model_card,
)
from convnextv2_hf.training import (
    FCMAECollator,
    FCMAEMaskEpochCallback,
    FCMAEReconstructionCallback,
    check_checkpoint_fits,
    fcmae_loss,
    finish_distributed_run,
    resume_checkpoint,
    run_callbacks,
    setup_script_logging,
    skips_weight_decay,
)
from convnextv2_hf.transforms import (
    check_output_outside_data,
    fcmae_evaluation_transform,
    fcmae_pretraining_transform,
    image_folder_dataset,
    streaming_image_dataset,
    with_example_index,
    with_image_transform,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_size: str = field(default="atto", metadata={"help": f"one of {list(PRESETS)}"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from this checkpoint instead"})
    # the FCMAE fields default to None, "not given": a checkpoint keeps its own (a decoder of another width would
    # not load), a new model takes the recipe's (PRETRAIN_MODEL) and the config's defaults
    mask_ratio: float | None = field(
        default=None, metadata={"help": f"default: the checkpoint's, else {PRETRAIN_MODEL['mask_ratio']}"}
    )
    decoder_hidden_size: int | None = field(default=None, metadata={"help": "default: the checkpoint's, else 512"})
    decoder_depth: int | None = field(default=None, metadata={"help": "default: the checkpoint's, else 1"})
    norm_pix_loss: bool | None = field(
        default=None, metadata={"help": f"default: the checkpoint's, else {PRETRAIN_MODEL['norm_pix_loss']}"}
    )
    fcmae_impl: str | None = field(
        default=None, metadata={"help": "sparse (fast) or dense (reference); default: the checkpoint's, else sparse"}
    )


@dataclass
class DataArguments:
    train_dir: str | None = field(default=None, metadata={"help": "image folder"})
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets name or path (train split)"})
    dataset_config_name: str | None = None
    validation_dir: str | None = field(default=None, metadata={"help": "image folder of validation images"})
    validation_split_fraction: float | None = field(
        default=None, metadata={"help": "hold out this fraction of the training images for validation"}
    )
    image_column: str = "image"
    image_size: int = 224
    streaming: bool = field(default=False, metadata={"help": "stream the training data (needs --max_steps)"})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "examples in the streaming shuffle buffer"})
    skip_corrupt_images: bool = field(
        default=False, metadata={"help": "skip unreadable images with a warning instead of stopping"}
    )
    reconstruction_every: int = field(default=500, metadata={"help": "steps between PNG grids; 0 = only at end"})


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """``ValueError`` naming the flag, before any data or weights are read and before anything is written (the
    training arguments check themselves when parsed)."""
    check_finite_arguments(model_args, data_args)
    for name in ("decoder_hidden_size", "decoder_depth"):
        if getattr(model_args, name) is not None:
            check_range(name, getattr(model_args, name), 1)
    check_range("image_size", data_args.image_size, 1)
    check_range("shuffle_buffer_size", data_args.shuffle_buffer_size, 1)
    check_range("reconstruction_every", data_args.reconstruction_every, 0)
    if model_args.model_name_or_path is None and model_args.model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_args.model_size!r}; choose one of {list(PRESETS)}")
    if (data_args.train_dir is None) == (data_args.dataset_name is None):
        raise ValueError("give exactly one of --train_dir and --dataset_name")
    if model_args.model_name_or_path is None:
        # image size against patch size and mask ratio now, before any data is read (a loaded model's config is
        # checked the same way by FCMAECollator, still before the Trainer creates the output folder)
        config = ConvNextV2Config.from_preset(model_args.model_size, **model_fields(model_args))
        FCMAECollator(config, data_args.image_size)
    fraction = data_args.validation_split_fraction
    if fraction is not None:
        check_range("validation_split_fraction", fraction, 0, 1, low_open=True, high_open=True)
    if fraction is not None and data_args.validation_dir is not None:
        raise ValueError("give one of --validation_dir and --validation_split_fraction, not both")
    if data_args.streaming:
        if training_args.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps: a stream has no length to count epochs in")
        if fraction is not None:
            raise ValueError("--validation_split_fraction needs the dataset's length; with --streaming give "
                             "--validation_dir or use the dataset's own validation split")  # fmt: skip
    data = {name: getattr(data_args, name) for name in ("train_dir", "validation_dir", "dataset_name")}
    check_output_outside_data(training_args.output_dir, data)


def load_splits(data_args: DataArguments, seed: int):
    """(train, validation or None) ``datasets`` splits, images not yet decoded or transformed."""
    from datasets import load_dataset

    if data_args.train_dir is not None:  # labels ignored: class folders need not hold images
        splits = image_folder_dataset(data_args.train_dir, streaming=data_args.streaming, drop_labels=True)
    else:
        splits = load_dataset(data_args.dataset_name, data_args.dataset_config_name, streaming=data_args.streaming)
    if "train" not in splits:
        raise ValueError(f"the data has no train split (splits: {list(splits)})")
    train, validation = splits["train"], splits.get("validation")
    if data_args.validation_dir is not None:
        validation = image_folder_dataset(data_args.validation_dir, drop_labels=True)["train"]
    elif data_args.validation_split_fraction is not None:
        if validation is not None:
            raise ValueError("the data has its own validation split; drop --validation_split_fraction")
        parts = train.train_test_split(test_size=data_args.validation_split_fraction, seed=seed)
        train, validation = parts["train"], parts["test"]
    return train, validation


def data_seed(training_args) -> int:
    """The seed of shuffling and masks: ``--data_seed`` when given, else ``--seed``."""
    return training_args.seed if training_args.data_seed is None else training_args.data_seed


def build_datasets(data_args: DataArguments, training_args):
    """The training set (examples carry ``index``) and the validation set (``fixed_mask=True`` too), or None."""
    from datasets import IterableDataset

    train, validation = load_splits(data_args, training_args.seed)
    column, skip = data_args.image_column, data_args.skip_corrupt_images
    train_transform = fcmae_pretraining_transform(data_args.image_size)
    if data_args.streaming:
        train = streaming_image_dataset(
            train, train_transform, column, skip, data_seed(training_args), data_args.shuffle_buffer_size
        )
    else:
        train = with_example_index(with_image_transform(train, train_transform, column, None, skip_corrupt_images=skip))
    if validation is not None:
        evaluation_transform = fcmae_evaluation_transform(data_args.image_size)
        if isinstance(validation, IterableDataset):
            validation = streaming_image_dataset(validation, evaluation_transform, column, skip, fixed_mask=True)
        else:
            validation = with_image_transform(validation, evaluation_transform, column, None, skip_corrupt_images=skip)
            validation = with_example_index(validation, fixed_mask=True)
    return train, validation


def model_fields(model_args: ModelArguments) -> dict:
    """The FCMAE config fields given on the command line; for a new model, the recipe's where none is given."""
    names = ("mask_ratio", "decoder_hidden_size", "decoder_depth", "norm_pix_loss", "fcmae_impl")
    given = {name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None}
    return given if model_args.model_name_or_path else {**PRETRAIN_MODEL, **given}


def build_model(model_args: ModelArguments) -> ConvNextV2ForMaskedImageModeling:
    fields = model_fields(model_args)
    if model_args.model_name_or_path:
        return ConvNextV2ForMaskedImageModeling.from_pretrained(model_args.model_name_or_path, **fields)
    return ConvNextV2ForMaskedImageModeling(ConvNextV2Config.from_preset(model_args.model_size, **fields))


def preview_pixels(train, validation, count: int = 4) -> torch.Tensor:
    """A few images for the reconstruction grids: validation images (deterministic) when there are some."""
    source = validation if validation is not None else train
    if hasattr(source, "__len__"):
        examples = (source[index] for index in range(min(len(source), 4 * count)))
    else:  # a stream: its first examples
        examples = itertools.islice(iter(source), 4 * count)
    pixels = [example["pixel_values"] for example in examples if example["pixel_values"] is not None]
    return torch.stack(pixels[:count])


def adamw_with_weight_decay_exclusions(model: torch.nn.Module, training_args) -> tuple[type, dict]:
    """``optimizer_cls_and_kwargs``: AdamW with the official weight-decay exclusions (biases, 1-D parameters, GRN
    gamma/beta, the mask token) and no layer decay, in two param groups (one per weight decay: every extra group
    costs the optimizer step time)."""
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    groups = [
        {"params": [p for n, p in named if not skips_weight_decay(n, p)], "weight_decay": training_args.weight_decay},
        {"params": [p for n, p in named if skips_weight_decay(n, p)], "weight_decay": 0.0},
    ]
    kwargs = dict(
        params=groups,
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        fused=training_args.optim == "adamw_torch_fused",  # the Trainer's default optimizer is the fused one
    )
    return torch.optim.AdamW, kwargs


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args, resume: str | None = None):
    """The FCMAE model, data, collator, optimizer and callbacks in a Trainer. ``resume``: the checkpoint the run will
    resume from, checked against the model before the Trainer (which creates the output folder) exists."""
    training_args.remove_unused_columns = False  # the collator reads `index`, which no forward takes
    if training_args.label_names is None:
        # the collator's `labels` (the mask) make the Trainer compute eval_loss through fcmae_loss
        training_args.label_names = ["labels"]
    if data_args.streaming and training_args.accelerator_config.dispatch_batches is None:
        # every process reads its own part of the stream instead of process 0 reading and sending all
        training_args.accelerator_config.dispatch_batches = False
    set_seed(training_args.seed)

    train, validation = build_datasets(data_args, training_args)
    model = build_model(model_args)
    if resume is not None:
        check_checkpoint_fits(resume, model)  # e.g. a classifier's checkpoint: named before anything is written
    collator = FCMAECollator(model.config, data_args.image_size, seed=data_seed(training_args))
    reconstructions = FCMAEReconstructionCallback(
        preview_pixels(train, validation), every_steps=data_args.reconstruction_every
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        compute_loss_func=fcmae_loss,
        optimizer_cls_and_kwargs=adamw_with_weight_decay_exclusions(model, training_args),
        callbacks=[FCMAEMaskEpochCallback(collator), reconstructions, *run_callbacks(training_args)],
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(argv)
    setup_script_logging(training_args, logger)
    logger.info("effective training hyper-parameters\n" + training_args.recipe_report())
    resume = resume_checkpoint(training_args)  # True/last -> the newest complete checkpoint; a bad one stops us here
    trainer = build_trainer(model_args, data_args, training_args, resume)

    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    metrics = dict(result.metrics)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        ConvNextV2ImageProcessor(size={"shortest_edge": data_args.image_size}).save_pretrained(training_args.output_dir)
    create_model_card(
        trainer,
        model_name=training_args.output_dir.rstrip("/").split("/")[-1],
        finetuned_from=model_args.model_name_or_path,
        tags=["fcmae", "convnextv2"],
        dataset=data_args.dataset_name,
    )
    return metrics


if __name__ == "__main__":
    main()
    finish_distributed_run()
