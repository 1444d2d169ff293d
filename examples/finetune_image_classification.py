"""Fine-tune ConvNeXt V2 on your own labelled images with the stock ``transformers.Trainer``.

    python examples/finetune_image_classification.py --model_name_or_path out/fcmae --recipe atto \
        --train_dir data/train --validation_dir data/validation --output_dir out/classifier \
        --num_train_epochs 100 --per_device_train_batch_size 64 --eval_strategy epoch
    torchrun --nproc_per_node 8 examples/finetune_image_classification.py ...   # or accelerate launch

``--recipe atto|tiny|base`` fills every hyper-parameter you do not give with the official value (layer decay
and its type, weight decay, drop path, MixUp/CutMix, label smoothing, EMA, base lr). Without
``--model_name_or_path`` the model starts from random weights (``--model_size``). Data: image folders
(``--train_dir``/``--validation_dir``, or one ``--data_dir`` with train/validation sub-folders, or a flat
class folder split by ``--validation_fraction``) or a ``datasets`` dataset (``--dataset_name``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ImageProcessor
from convnextv2_hf.configuration_convnextv2 import PRESETS
from convnextv2_hf.metrics import load_top_k_accuracy
from convnextv2_hf.recipes import FINETUNE_COMMON, FINETUNE_RECIPES, scaled_learning_rate
from convnextv2_hf.training import EMACallback, layer_decay_optimizer
from convnextv2_hf.transforms import MixUpCutMixCollator, finetuning_transform, with_image_transform

# used where neither the command line nor a recipe gives a value
DEFAULTS = dict(blr=2e-4, layer_decay=0.9, layer_decay_type="single", weight_decay=0.05, drop_path=0.1,
                mixup=0.0, cutmix=0.0, label_smoothing=0.1, ema_decay=0.0, random_erasing=0.25)  # fmt: skip


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "FCMAE, encoder or classifier folder"})
    model_size: str = field(default="atto", metadata={"help": f"for random initialisation: one of {list(PRESETS)}"})
    recipe: str | None = field(default=None, metadata={"help": f"official defaults: {list(FINETUNE_RECIPES)}"})
    layer_decay: float | None = None
    layer_decay_type: str | None = field(default=None, metadata={"help": "single or group"})
    drop_path_rate: float | None = None
    ema_decay: float | None = field(default=None, metadata={"help": "0 disables EMA; official 0.9999"})
    ema_for_final_save: bool = field(default=False, metadata={"help": "save the EMA weights as the model"})
    head_init_std: float = field(default=FINETUNE_COMMON["head_init_std"], metadata={"help": "new head init std"})


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
    base_learning_rate: float | None = field(default=None, metadata={"help": "lr = blr * total batch / 256"})
    mixup: float | None = None
    cutmix: float | None = None
    label_smoothing: float | None = None
    rand_augment_magnitude: int = 9
    random_erasing: float | None = None
    horizontal_flip: bool = True


def resolve(value, name: str, recipe: dict):
    """The command-line value, else the recipe's, else the default."""
    if value is not None:
        return value
    return recipe.get(name, DEFAULTS[name])


def check_arguments(model_args: ModelArguments, data_args: DataArguments, layer_decay: float) -> None:
    if model_args.model_name_or_path is None and model_args.model_size not in PRESETS:
        raise ValueError(f"unknown model size {model_args.model_size!r}; choose one of {list(PRESETS)}")
    if model_args.recipe is not None and model_args.recipe not in FINETUNE_RECIPES:
        raise ValueError(f"unknown recipe {model_args.recipe!r}; recipes exist for {list(FINETUNE_RECIPES)}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    sources = [data_args.train_dir, data_args.data_dir, data_args.dataset_name]
    if sum(source is not None for source in sources) != 1:
        raise ValueError("give exactly one of --train_dir, --data_dir and --dataset_name")


def load_splits(data_args: DataArguments, seed: int):
    """(train, validation) ``datasets`` splits, checked: images present, every class in the validation split."""
    from datasets import DatasetDict, load_dataset

    from convnextv2_hf.transforms import image_folder_dataset

    if data_args.dataset_name is not None:
        splits = load_dataset(data_args.dataset_name)
    elif data_args.data_dir is not None:
        splits = image_folder_dataset(data_args.data_dir)
    else:
        splits = DatasetDict(train=image_folder_dataset(data_args.train_dir)["train"])
        if data_args.validation_dir is not None:
            splits["validation"] = image_folder_dataset(data_args.validation_dir)["train"]
    train = splits["train"]
    validation = splits.get("validation") or splits.get("test")
    if validation is None:
        parts = train.train_test_split(
            test_size=data_args.validation_fraction, seed=seed, stratify_by_column=data_args.label_column
        )
        train, validation = parts["train"], parts["test"]
    for name, split in (("train", train), ("validation", validation)):
        for column in (data_args.image_column, data_args.label_column):
            if column not in split.column_names:
                raise ValueError(f"the {name} split has no {column!r} column (columns: {split.column_names})")
    names = train.features[data_args.label_column].names
    for name, split in (("train", train), ("validation", validation)):
        present = set(split[data_args.label_column])
        missing = [names[i] for i in range(len(names)) if i not in present]
        if missing:
            raise ValueError(f"class(es) {missing} have no image in the {name} split")
    return train, validation, names


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


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    recipe = FINETUNE_RECIPES.get(model_args.recipe, {}) if model_args.recipe else {}
    layer_decay = resolve(model_args.layer_decay, "layer_decay", recipe)
    check_arguments(model_args, data_args, layer_decay)
    given = " ".join(argv if argv is not None else sys.argv)
    if "--learning_rate" not in given:
        total_batch = (
            training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * max(1, training_args.world_size)
        )
        training_args.learning_rate = scaled_learning_rate(
            resolve(data_args.base_learning_rate, "blr", recipe), total_batch
        )
    if "--weight_decay" not in given:
        training_args.weight_decay = resolve(None, "weight_decay", recipe)
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    train, validation, labels = load_splits(data_args, training_args.seed)  # fails before any training
    train = with_image_transform(
        train,
        finetuning_transform(
            data_args.image_size,
            rand_augment_magnitude=data_args.rand_augment_magnitude,
            random_erasing=resolve(data_args.random_erasing, "random_erasing", recipe),
            horizontal_flip=data_args.horizontal_flip,
        ),
        data_args.image_column,
        data_args.label_column,
        mixable=True,
    )
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": data_args.image_size})

    def evaluation_transform(image):
        return processor(image, return_tensors="pt")["pixel_values"][0]

    validation = with_image_transform(validation, evaluation_transform, data_args.image_column, data_args.label_column)

    model = build_model(model_args, labels, resolve(model_args.drop_path_rate, "drop_path", recipe))
    collator = MixUpCutMixCollator(
        num_labels=len(labels),
        mixup_alpha=resolve(data_args.mixup, "mixup", recipe),
        cutmix_alpha=resolve(data_args.cutmix, "cutmix", recipe),
        label_smoothing=resolve(data_args.label_smoothing, "label_smoothing", recipe),
    )
    metric = load_top_k_accuracy()

    def compute_metrics(prediction) -> dict:
        logits, references = prediction
        return metric.compute(predictions=np.asarray(logits), references=np.asarray(references), k=5)

    ema_decay = resolve(model_args.ema_decay, "ema_decay", recipe)
    ema = EMACallback(ema_decay) if ema_decay > 0 else None
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=compute_metrics,
        optimizer_cls_and_kwargs=layer_decay_optimizer(
            model, training_args, layer_decay, resolve(model_args.layer_decay_type, "layer_decay_type", recipe)
        ),
        callbacks=[ema] if ema else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
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
    if trainer.is_world_process_zero():
        trainer.create_model_card(
            model_name=training_args.output_dir.rstrip("/").split("/")[-1],
            finetuned_from=model_args.model_name_or_path,
            tasks="image-classification",
        )
    return metrics


if __name__ == "__main__":
    main()
