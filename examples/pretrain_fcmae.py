"""FCMAE pretraining of ConvNeXt V2 on unlabelled images with the stock ``transformers.Trainer``.

    python examples/pretrain_fcmae.py --train_dir images/ --model_size atto --output_dir out/fcmae \
        --num_train_epochs 800 --per_device_train_batch_size 64 --base_learning_rate 1.5e-4
    torchrun --nproc_per_node 8 examples/pretrain_fcmae.py ...        # or: accelerate launch --multi_gpu ...

Data: an image folder (``--train_dir``, labels ignored) or any ``datasets`` dataset with an image column
(``--dataset_name``). The learning rate follows the official rule ``base_learning_rate * total_batch / 256``
unless ``--learning_rate`` is given. Reconstruction grids are written to ``<output_dir>/reconstructions``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor
from convnextv2_hf.configuration_convnextv2 import PRESETS
from convnextv2_hf.recipes import PRETRAIN_RECIPE, scaled_learning_rate
from convnextv2_hf.training import FCMAECollator, FCMAEReconstructionCallback, fcmae_loss
from convnextv2_hf.transforms import fcmae_pretraining_transform, image_folder_dataset, with_image_transform


@dataclass
class ModelArguments:
    model_size: str = field(default="atto", metadata={"help": f"one of {list(PRESETS)}"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from this checkpoint instead"})
    mask_ratio: float = field(default=PRETRAIN_RECIPE["mask_ratio"])
    decoder_hidden_size: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    fcmae_impl: str = field(default="sparse", metadata={"help": "sparse (fast) or dense (reference)"})


@dataclass
class DataArguments:
    train_dir: str | None = field(default=None, metadata={"help": "image folder"})
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets name or path (train split)"})
    image_column: str = "image"
    image_size: int = 224
    base_learning_rate: float = field(default=PRETRAIN_RECIPE["blr"], metadata={"help": "lr = blr * batch / 256"})
    reconstruction_every: int = field(default=500, metadata={"help": "steps between PNG grids; 0 = only at end"})


def check_arguments(model_args: ModelArguments, data_args: DataArguments) -> None:
    if model_args.model_name_or_path is None and model_args.model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_args.model_size!r}; choose one of {list(PRESETS)}")
    if (data_args.train_dir is None) == (data_args.dataset_name is None):
        raise ValueError("give exactly one of --train_dir and --dataset_name")


def load_train_images(data_args: DataArguments):
    transform = fcmae_pretraining_transform(data_args.image_size)
    if data_args.train_dir is not None:
        splits = image_folder_dataset(data_args.train_dir)
    else:
        from datasets import load_dataset

        splits = load_dataset(data_args.dataset_name)
    train = splits["train"]
    return with_image_transform(train, transform, data_args.image_column, label_column=None)


def build_model(model_args: ModelArguments) -> ConvNextV2ForMaskedImageModeling:
    fields = dict(
        mask_ratio=model_args.mask_ratio,
        decoder_hidden_size=model_args.decoder_hidden_size,
        decoder_depth=model_args.decoder_depth,
        norm_pix_loss=model_args.norm_pix_loss,
        fcmae_impl=model_args.fcmae_impl,
    )
    if model_args.model_name_or_path:
        return ConvNextV2ForMaskedImageModeling.from_pretrained(model_args.model_name_or_path, **fields)
    return ConvNextV2ForMaskedImageModeling(ConvNextV2Config.from_preset(model_args.model_size, **fields))


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(model_args, data_args)
    # the official optimizer defaults unless given on the command line
    given = " ".join(argv if argv is not None else sys.argv)
    if "--adam_beta2" not in given:
        training_args.adam_beta2 = PRETRAIN_RECIPE["adam_betas"][1]
    if "--learning_rate" not in given:
        total_batch = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * max(1, training_args.world_size)
        )
        training_args.learning_rate = scaled_learning_rate(data_args.base_learning_rate, total_batch)
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    train_dataset = load_train_images(data_args)
    model = build_model(model_args)
    preview = torch.stack([train_dataset[i]["pixel_values"] for i in range(min(4, len(train_dataset)))])
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=FCMAECollator(model.config, data_args.image_size),
        compute_loss_func=fcmae_loss,
        callbacks=[FCMAEReconstructionCallback(preview, every_steps=data_args.reconstruction_every)],
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        ConvNextV2ImageProcessor(size={"shortest_edge": data_args.image_size}).save_pretrained(training_args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    return result.metrics


if __name__ == "__main__":
    main()
