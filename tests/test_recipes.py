"""Official recipes through the examples' TrainingArguments: every part set, explicit flags winning, the lr curve
of a real run (warm-up, cosine, floor at min_lr) and the effective values in the model card."""

import math
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from expected_errors import (
    EMA_DECAY_ARGUMENT_OUT_OF_RANGE,
    LABEL_SMOOTHING_OUT_OF_RANGE,
    LAYER_DECAY_OUT_OF_RANGE,
    LAYER_DECAY_TYPE_UNKNOWN,
)
from helpers import REPO
from transformers import HfArgumentParser

from convnextv2_hf.recipes import (
    FINETUNE_RECIPES,
    FinetuneTrainingArguments,
    PretrainTrainingArguments,
    create_model_card,
    finetune_recipe,
)
from convnextv2_hf.training import EMACallback
from convnextv2_hf.transforms import MixUpCutMixCollator

sys.path.insert(0, str(REPO / "examples"))

import finetune_image_classification  # noqa: E402


def parse(cls, *argv):
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(args=["--output_dir", "unused", "--use_cpu", *argv])
    return args


def test_finetune_recipe_sets_every_part_of_the_official_recipe():
    args = parse(FinetuneTrainingArguments, "--recipe", "tiny", "--per_device_train_batch_size", "32",
                 "--gradient_accumulation_steps", "2")  # fmt: skip
    assert args.learning_rate == pytest.approx(8e-4 * 64 / 256, rel=1e-12)  # blr x total batch / 256
    assert args.num_train_epochs == 300
    assert args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.warmup_steps == pytest.approx(40 / 300)  # a fraction of the run: 40 of 300 epochs
    assert args.lr_scheduler_kwargs == {"min_lr_rate": pytest.approx(1e-6 / args.learning_rate)}
    expected = dict(layer_decay=0.9, layer_decay_type="single", weight_decay=0.05, drop_path_rate=0.2, mixup=0.8,
                    cutmix=1.0, label_smoothing=0.1, ema_decay=0.9999, random_erasing=0.25, adam_epsilon=1e-8,
                    min_lr=1e-6, warmup_epochs=40)  # fmt: skip
    assert {name: getattr(args, name) for name in expected} == expected
    assert args.recipe_sources["layer_decay"] == "recipe tiny"
    assert "base_learning_rate 0.0008 x total batch 64 / 256" in args.recipe_report()


def test_explicit_flags_override_the_recipe():
    args = parse(FinetuneTrainingArguments, "--recipe", "base", "--layer_decay", "0.75", "--learning_rate", "1e-3",
                 "--num_train_epochs", "10", "--mixup", "0", "--lr_scheduler_type", "cosine",
                 "--warmup_steps", "3")  # fmt: skip
    assert (args.layer_decay, args.learning_rate, args.num_train_epochs, args.mixup) == (0.75, 1e-3, 10, 0)
    assert args.lr_scheduler_type == "cosine" and args.lr_scheduler_kwargs is None and args.warmup_steps == 3
    assert args.layer_decay_type == "group" and args.cutmix == 1.0  # the rest still from the recipe
    assert args.recipe_sources["layer_decay"] == "command line"
    # a shorter run keeps the recipe's warm-up proportion; explicit warm-up epochs are counted in this run
    assert parse(FinetuneTrainingArguments, "--recipe", "base", "--num_train_epochs", "10").warmup_steps == 0.2
    assert parse(FinetuneTrainingArguments, "--recipe", "base", "--num_train_epochs", "10", "--warmup_epochs",
                 "1").warmup_steps == pytest.approx(0.1)  # fmt: skip


def test_a_flag_counts_as_given_only_when_given(monkeypatch):
    """Given-ness comes from the parsed value, not from the command-line text: a path that contains a flag's name
    does not set it, and a flag given with its stock default value still overrides the recipe."""
    monkeypatch.setattr(sys, "argv", ["finetune", "--learning_rate", "1", "--weight_decay", "1"])
    (args,) = HfArgumentParser(FinetuneTrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", "runs/--learning_rate--weight_decay", "--use_cpu", "--recipe", "atto"]
    )
    assert args.learning_rate == pytest.approx(2e-4 * 8 / 256) and args.weight_decay == 0.3
    stock_default = parse(FinetuneTrainingArguments, "--recipe", "atto", "--weight_decay", "0.0")
    assert stock_default.weight_decay == 0.0 and stock_default.recipe_sources["weight_decay"] == "command line"


def test_without_a_recipe_the_stock_defaults_apply():
    args = parse(FinetuneTrainingArguments, "--per_device_train_batch_size", "16")
    assert args.lr_scheduler_type == "linear" and args.num_train_epochs == 3.0 and args.warmup_steps == 0
    assert args.learning_rate == pytest.approx(2e-4 * 16 / 256) and args.ema_decay == 0.0
    pretrain = parse(PretrainTrainingArguments)
    assert pretrain.adam_beta2 == 0.95 and pretrain.learning_rate == pytest.approx(1.5e-4 * 8 / 256)


def test_pretraining_recipe():
    args = parse(PretrainTrainingArguments, "--recipe", "fcmae", "--per_device_train_batch_size", "64")
    assert args.learning_rate == pytest.approx(1.5e-4 * 64 / 256)
    assert (args.num_train_epochs, args.weight_decay, args.adam_beta1, args.adam_beta2) == (800, 0.05, 0.9, 0.95)
    assert args.warmup_steps == pytest.approx(40 / 800)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.0}
    assert parse(PretrainTrainingArguments, "--recipe", "fcmae-1600").num_train_epochs == 1600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipe", "small"], r"unknown recipe 'small'; recipes exist for \['atto', 'tiny', 'base'\]"),
        (["--layer_decay", "0"], LAYER_DECAY_OUT_OF_RANGE),
        (["--layer_decay_type", "pairs"], LAYER_DECAY_TYPE_UNKNOWN),
        (["--drop_path_rate", "1"], r"drop_path_rate must be in \[0, 1\)"),
        (["--ema_decay", "1"], EMA_DECAY_ARGUMENT_OUT_OF_RANGE),
        (["--label_smoothing", "-0.1"], LABEL_SMOOTHING_OUT_OF_RANGE),
        (["--recipe", "tiny", "--num_train_epochs", "30", "--warmup_epochs", "30"], "must be shorter than"),
        (["--recipe", "tiny", "--max_steps", "5", "--warmup_epochs", "1"], "needs an epoch-based run"),
        (["--recipe", "tiny", "--min_lr", "1", "--learning_rate", "0.1"], r"min_lr must be in \[0, learning_rate"),
        (["--min_lr", "1e-6"], "--min_lr needs --lr_scheduler_type cosine_with_min_lr, not linear"),
        (["--lr_scheduler_type", "cosine_with_min_lr"], "cosine_with_min_lr needs --min_lr"),
    ],
)
def test_bad_recipe_values_are_value_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(FinetuneTrainingArguments, *argv)


def test_recipe_tables_match_the_official_training_md():
    assert sorted(FINETUNE_RECIPES) == ["atto", "base", "tiny"]
    base = finetune_recipe("base")
    assert (base["base_learning_rate"], base["num_train_epochs"], base["warmup_epochs"]) == (6.25e-4, 100, 20)
    assert (base["layer_decay"], base["layer_decay_type"], base["min_lr"]) == (0.6, "group", 1e-6)
    with pytest.raises(ValueError, match="no official fine-tuning recipe for 'huge'"):
        finetune_recipe("huge")


def image_folder(root: Path, classes=("a", "b", "c"), per_class=4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
                PIL.Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_recipe_run_follows_warm_up_then_cosine_to_min_lr_and_the_card_lists_the_values(tmp_path):
    """A real 12-step run with --recipe tiny: the lr of every step against the recipe's curve (rel 1e-6)."""
    steps, batch = 12, 4
    argv = ["--data_dir", str(image_folder(tmp_path / "data")), "--output_dir", str(tmp_path / "out"), "--use_cpu",
            "--report_to", "none", "--image_size", "32", "--per_device_train_batch_size", str(batch),
            "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "no", "--recipe", "tiny",
            "--disable_tqdm", "true"]  # fmt: skip
    model_args, data_args, training_args = finetune_image_classification.parse_arguments(argv)
    trainer = finetune_image_classification.build_trainer(model_args, data_args, training_args)
    # every other part of the recipe reached the run
    assert trainer.model.config.drop_path_rate == 0.2
    assert [c.decay for c in trainer.callback_handler.callbacks if isinstance(c, EMACallback)] == [0.9999]
    collator = trainer.data_collator
    assert isinstance(collator, MixUpCutMixCollator) and collator.label_smoothing == 0.1
    assert sorted(type(t).__name__ for t in collator.mix.transforms) == ["CutMix", "MixUp"]
    assert {t.alpha for t in collator.mix.transforms} == {0.8, 1.0}
    trainer.train()
    groups = trainer.optimizer.param_groups
    scales = sorted({round(g["lr_scale"], 12) for g in groups}, reverse=True)
    assert scales[:3] == pytest.approx([1.0, 0.9, 0.81])  # layer decay 0.9
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}

    peak, floor = 8e-4 * batch / 256, 1e-6
    warmup = math.ceil(steps * 40 / 300)  # the recipe's 40 of 300 epochs, as a fraction of this run
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(logged) == steps and warmup == 2
    for step, lr in enumerate(logged):  # the lr each step used
        if step < warmup:  # linear rise from 0
            expected = peak * step / warmup
        else:  # cosine from the peak down to the floor over the remaining steps
            progress = (step - warmup) / (steps - warmup)
            expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr == pytest.approx(expected, rel=1e-6, abs=1e-15), step
    assert max(logged) == pytest.approx(peak, rel=1e-6)
    after_warmup = logged[warmup:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:], strict=False))  # non-increasing
    # after the last step the schedule sits exactly on the floor, for the head's group (scale 1.0)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(floor, rel=1e-6)
    head = next(g for g in groups if g["lr_scale"] == 1.0)
    assert head["lr"] == pytest.approx(floor, rel=1e-6)

    create_model_card(trainer, model_name="out")  # what the script calls after training
    card = (tmp_path / "out" / "README.md").read_text()
    for line in ("lr_scheduler_type: cosine_with_min_lr", "min_lr: 1e-06", "layer_decay: 0.9", "drop_path_rate: 0.2",
                 "mixup: 0.8", "cutmix: 1.0", "label_smoothing: 0.1", "ema_decay: 0.9999", "warmup_epochs: 40",
                 "recipe: tiny", "weight_decay: 0.05", "base_learning_rate: 0.0008"):  # fmt: skip
        assert f"- {line}\n" in card, line
    assert "lr_scheduler_type: linear" not in card
    assert torch.isfinite(torch.tensor(logged)).all()
