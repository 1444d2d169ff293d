"""The official training recipes, and ``TrainingArguments`` that apply them.

The tables hold the values of the official repository's TRAINING.md (fine-tuning) and of the paper and its
pretraining script (FCMAE), under the names of the arguments they set. ``--recipe NAME`` on an example script
fills every one of those arguments that the command line leaves out; an explicit flag always wins::

    python examples/finetune_image_classification.py --recipe tiny --layer_decay 0.8 ...   # tiny, but decay 0.8

How the parts of a recipe map onto the stock ``Trainer``:

- ``learning_rate = base_learning_rate * total batch / 256`` (the official linear scaling rule), the total batch
  being this run's: per-device batch x gradient accumulation x processes;
- the schedule is transformers' ``cosine_with_min_lr``: linear warm-up, then a cosine down to ``min_lr``. The
  warm-up is ``warmup_epochs / num_train_epochs`` of the run (exactly ``warmup_epochs`` epochs for the recipe's
  length; a shorter ``--num_train_epochs`` or a ``--max_steps`` run keeps the recipe's proportion);
- layer decay, weight decay (never on biases, 1-D parameters, GRN gamma/beta), drop path, EMA, MixUp/CutMix,
  label smoothing and random erasing are read by the scripts from the same arguments.

Sizes without a recipe in TRAINING.md (femto, pico, nano, large, huge) are in the paper's appendix, not here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from .cpu_memory import KEEP_FREED_MEMORY_SETTINGS, check_keep_freed_memory

REFERENCE_BATCH = 256  # lr = base_learning_rate * total_batch / REFERENCE_BATCH

FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    "atto": dict(base_learning_rate=2e-4, num_train_epochs=600, warmup_epochs=0, layer_decay=0.9,
                 layer_decay_type="single", weight_decay=0.3, drop_path_rate=0.1, mixup=0.0, cutmix=0.0,
                 label_smoothing=0.2),
    "tiny": dict(base_learning_rate=8e-4, num_train_epochs=300, warmup_epochs=40, layer_decay=0.9,
                 layer_decay_type="single", weight_decay=0.05, drop_path_rate=0.2, mixup=0.8, cutmix=1.0,
                 label_smoothing=0.1),
    "base": dict(base_learning_rate=6.25e-4, num_train_epochs=100, warmup_epochs=20, layer_decay=0.6,
                 layer_decay_type="group", weight_decay=0.05, drop_path_rate=0.1, mixup=0.8, cutmix=1.0,
                 label_smoothing=0.1),
}  # fmt: skip
# common to every fine-tuning recipe (the official runs used a total batch of 1024; head init std 2e-5)
FINETUNE_COMMON: dict[str, Any] = dict(lr_scheduler_type="cosine_with_min_lr", min_lr=1e-6, adam_epsilon=1e-8,
                                       ema_decay=0.9999, random_erasing=0.25)  # fmt: skip
FINETUNE_TOTAL_BATCH = 1024
FINETUNE_HEAD_INIT_STD = 2e-5

# FCMAE pretraining: the paper's 800-epoch schedule and the longer one of its largest runs (total batch 4096).
_PRETRAIN_COMMON: dict[str, Any] = dict(base_learning_rate=1.5e-4, warmup_epochs=40,
                                        lr_scheduler_type="cosine_with_min_lr", min_lr=0.0, weight_decay=0.05,
                                        adam_beta1=0.9, adam_beta2=0.95)  # fmt: skip
PRETRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "fcmae": dict(_PRETRAIN_COMMON, num_train_epochs=800),
    "fcmae-1600": dict(_PRETRAIN_COMMON, num_train_epochs=1600),
}
PRETRAIN_TOTAL_BATCH = 4096
# model settings of the pretraining recipe (the FCMAE config's defaults)
PRETRAIN_MODEL = dict(mask_ratio=0.6, norm_pix_loss=True)
PRETRAIN_RECIPE = {**PRETRAIN_RECIPES["fcmae"], **PRETRAIN_MODEL, "total_batch": PRETRAIN_TOTAL_BATCH}


def finetune_recipe(size: str) -> dict[str, Any]:
    """The official fine-tuning hyper-parameters of ``size`` merged with the common ones."""
    if size not in FINETUNE_RECIPES:
        raise ValueError(f"no official fine-tuning recipe for {size!r}; recipes exist for {sorted(FINETUNE_RECIPES)}")
    return {**FINETUNE_COMMON, **FINETUNE_RECIPES[size]}


def scaled_learning_rate(base_learning_rate: float, total_batch: int) -> float:
    """The official linear scaling rule: ``base_learning_rate * total_batch / 256``."""
    return base_learning_rate * total_batch / REFERENCE_BATCH


def check_range(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a finite number in the interval from ``low`` to ``high``
    (``None``: unbounded on that side; ``*_open``: the bound itself excluded). NaN and inf are refused whatever the
    bounds: ``float()`` parses "nan" and "inf", and every comparison with NaN is False, so an unchecked NaN passes
    any ``if x < 0`` test and only shows once training has produced NaN weights."""
    if low is not None and high is not None:
        rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        rule = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rule = f"{'<' if high_open else '<='} {high:g}"
    else:
        rule = "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(
            f"{name} must be a finite number{'' if rule == 'a finite number' else ' ' + rule}, got {value}"
        )
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {rule}, got {value}")


def check_finite_arguments(*groups) -> None:
    """``ValueError`` naming the first float field of the argument dataclasses ``groups`` that holds NaN or inf:
    the catch-all under the range checks, for every float flag a script has."""
    for group in groups:
        for item in dataclasses.fields(group):
            value = getattr(group, item.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{item.name} must be a finite number, got {value}")


def check_training_values(args: TrainingArguments) -> None:
    """``ValueError`` naming the flag for the stock ``TrainingArguments`` values this package's plug-ins and the
    examples read, checked when the arguments are parsed: the Trainer would take a NaN or negative learning rate
    silently (NaN weights, gradient ascent) and meet a batch size of 0 only in its DataLoader, after creating the
    output folder. ``None`` (a recipe field not resolved yet) is left to the caller. Every float field must be finite
    besides."""
    check_finite_arguments(args)
    ranges = {
        "learning_rate": dict(low=0, low_open=True),
        "weight_decay": dict(low=0),
        "adam_beta1": dict(low=0, high=1, high_open=True),
        "adam_beta2": dict(low=0, high=1, high_open=True),
        "adam_epsilon": dict(low=0, low_open=True),
        "max_grad_norm": dict(low=0),  # 0 turns clipping off; a negative value would too, silently
        "num_train_epochs": dict(low=0),
        "warmup_steps": dict(low=0),  # steps, or a fraction of the run below 1
        "label_smoothing_factor": dict(low=0, high=1, high_open=True),
        "logging_steps": dict(low=0, low_open=True),  # steps, or a fraction of the run below 1
        "save_steps": dict(low=0, low_open=True),
        "eval_steps": dict(low=0, low_open=True),
        "per_device_train_batch_size": dict(low=1),
        "per_device_eval_batch_size": dict(low=1),
        "gradient_accumulation_steps": dict(low=1),
        "save_total_limit": dict(low=1),
        "dataloader_num_workers": dict(low=0),
    }
    for name, bounds in ranges.items():
        value = getattr(args, name, None)
        if value is not None:
            check_range(name, value, **bounds)
    if args.num_train_epochs is not None and args.num_train_epochs <= 0 and args.max_steps <= 0:
        raise ValueError(f"num_train_epochs must be > 0 (or give --max_steps), got {args.num_train_epochs}")
    if hasattr(args, "keep_freed_memory"):
        check_keep_freed_memory(args.keep_freed_memory)


@dataclass
class CheckedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for long runs: values checked when parsed (``check_training_values``), a diverged run
    stopped at its first non-finite loss or gradient (``StopOnNonFiniteCallback``, on unless
    ``--stop_on_non_finite false``), a non-finite loss logged as what it is, and resumes that are all or nothing
    (``resume_checkpoint``) unless ``--allow_fresh_optimizer``, and on CPU freed memory kept for reuse
    (``KeepFreedMemoryCallback``) unless ``--keep_freed_memory off``; ``training.run_callbacks`` gives those
    callbacks."""

    stop_on_non_finite: bool = field(
        default=True,
        metadata={"help": "stop with an error at the first non-finite loss or gradient (no checkpoint is written)"},
    )
    allow_fresh_optimizer: bool = field(
        default=False,
        metadata={
            "help": "resume from a checkpoint lacking optimizer.pt/scheduler.pt, this process count's RNG states or "
            "the EMA weights: those start afresh, with a warning (else the resume is refused)"
        },
    )
    keep_freed_memory: str = field(
        default="auto",
        metadata={
            "help": "make glibc keep freed memory for reuse, so CPU training steps stop page-faulting it back in "
            "(KeepFreedMemoryCallback): auto (when training on the CPU), on, off",
            "choices": list(KEEP_FREED_MEMORY_SETTINGS),
        },
    )
    # the stock default (True) logs a NaN/inf loss as the mean of the finite ones: a diverged run looks healthy
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "log the mean of the finite losses in place of a NaN/inf one"}
    )

    def __post_init__(self):
        check_training_values(self)
        super().__post_init__()


# the TrainingArguments fields a recipe may set; declared again below with a default of None ("not given")
_STOCK_FIELDS = ("num_train_epochs", "lr_scheduler_type", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
_STOCK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.name in _STOCK_FIELDS}
_FROM_RECIPE = "from the recipe, else {}"


@dataclass
class RecipeTrainingArguments(CheckedTrainingArguments):
    """``TrainingArguments`` whose recipe-governed fields default to ``None``, meaning "not given": each takes
    the value of ``--recipe`` when there is one, else the class's default. What was given on the command line is
    kept. ``recipe_sources`` records where each effective value came from (for the log and the model card).

    Subclasses name their recipe table in ``recipes`` and their fallback values in ``recipe_defaults``.
    """

    recipes: ClassVar[dict[str, dict[str, Any]]] = {}
    recipe_defaults: ClassVar[dict[str, Any]] = {}

    recipe: str | None = field(default=None, metadata={"help": "an official recipe: fills every flag not given"})
    base_learning_rate: float | None = field(
        default=None, metadata={"help": "learning_rate = base_learning_rate * total batch / 256"}
    )
    min_lr: float | None = field(default=None, metadata={"help": "the floor of the cosine_with_min_lr schedule"})
    warmup_epochs: float | None = field(
        default=None, metadata={"help": "linear warm-up length in epochs (epoch-based runs); else --warmup_steps"}
    )
    # stock fields, re-declared so that "not given" can be told from "given the default value"
    learning_rate: float | None = field(
        default=None, metadata={"help": "default: base_learning_rate * total batch / 256"}
    )
    num_train_epochs: float | None = field(default=None, metadata={"help": _FROM_RECIPE.format(3.0)})
    warmup_steps: float | None = field(
        default=None, metadata={"help": "steps (>= 1) or a fraction of the run (< 1); default from warmup_epochs"}
    )
    lr_scheduler_type: str | None = field(default=None, metadata={"help": _FROM_RECIPE.format("linear")})
    weight_decay: float | None = field(default=None, metadata={"help": _FROM_RECIPE.format(0.0)})
    adam_beta1: float | None = field(default=None, metadata={"help": _FROM_RECIPE.format(0.9)})
    adam_beta2: float | None = field(default=None, metadata={"help": _FROM_RECIPE.format(0.999)})
    adam_epsilon: float | None = field(default=None, metadata={"help": _FROM_RECIPE.format(1e-8)})

    def __post_init__(self):
        if self.recipe is not None and self.recipe not in self.recipes:
            raise ValueError(f"unknown recipe {self.recipe!r}; recipes exist for {list(self.recipes)}")
        recipe = self.recipes.get(self.recipe, {})
        defaults = {**_STOCK_DEFAULTS, **self.recipe_defaults}
        self.recipe_sources: dict[str, str] = {}
        own_fields = {f.name for f in dataclasses.fields(self)}
        for name in dict.fromkeys([*defaults, *recipe, "min_lr", "warmup_epochs", "base_learning_rate"]):
            if name not in own_fields:
                continue  # a recipe value another argument group takes (e.g. the model's mask_ratio)
            if getattr(self, name) is not None:
                self.recipe_sources[name] = "command line"
            elif name in recipe:
                setattr(self, name, recipe[name])
                self.recipe_sources[name] = f"recipe {self.recipe}"
            elif defaults.get(name) is not None:
                setattr(self, name, defaults[name])
                self.recipe_sources[name] = "default"
        self.check_recipe_values()  # first: the warm-up divides by num_train_epochs
        self._resolve_warmup(recipe)
        super().__post_init__()
        self._resolve_learning_rate()
        self._resolve_schedule()

    def _resolve_warmup(self, recipe: dict[str, Any]) -> None:
        given = self.recipe_sources.get("warmup_epochs")
        if self.warmup_steps is not None:  # explicit steps win over warm-up epochs
            self.recipe_sources["warmup_steps"] = "command line"
            return
        if self.warmup_epochs is None:
            self.warmup_steps = 0
            self.recipe_sources["warmup_steps"] = "default"
            return
        if given == "command line":
            if self.max_steps > 0:
                raise ValueError("--warmup_epochs needs an epoch-based run; with --max_steps give --warmup_steps")
            fraction, why = self.warmup_epochs / self.num_train_epochs, "warmup_epochs / num_train_epochs"
        else:  # the recipe's proportion, whatever length this run has
            fraction = recipe["warmup_epochs"] / recipe["num_train_epochs"]
            why = f"recipe {self.recipe}: {recipe['warmup_epochs']} of {recipe['num_train_epochs']} epochs"
        if not 0.0 <= fraction < 1.0:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be shorter than num_train_epochs={self.num_train_epochs}"
            )
        self.warmup_steps = fraction  # a float below 1: the Trainer reads it as a fraction of the total steps
        self.recipe_sources["warmup_steps"] = f"{fraction:.4g} of the run ({why})"

    def _resolve_learning_rate(self) -> None:
        if self.learning_rate is not None:
            self.recipe_sources["learning_rate"] = "command line"
            return
        if self.base_learning_rate is None:
            raise ValueError("give --learning_rate or --base_learning_rate")
        self.learning_rate = scaled_learning_rate(self.base_learning_rate, self.total_train_batch_size)
        self.recipe_sources["learning_rate"] = (
            f"base_learning_rate {self.base_learning_rate:g} x total batch {self.total_train_batch_size} / "
            f"{REFERENCE_BATCH}"
        )

    def _resolve_schedule(self) -> None:
        with_min_lr = self.lr_scheduler_type == "cosine_with_min_lr"
        if self.min_lr is not None and not with_min_lr and self.recipe_sources.get("min_lr") == "command line":
            kind = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
            raise ValueError(f"--min_lr needs --lr_scheduler_type cosine_with_min_lr, not {kind}")
        if not with_min_lr or self.lr_scheduler_kwargs:
            return  # kwargs given on the command line win
        if self.min_lr is None:
            raise ValueError("lr_scheduler_type cosine_with_min_lr needs --min_lr")
        if not 0.0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr must be in [0, learning_rate={self.learning_rate:g}], got {self.min_lr}")
        # a rate, not "min_lr": transformers divides min_lr by the optimizer's default lr, which an optimizer
        # built from param groups (layer decay) need not have set to learning_rate
        self.lr_scheduler_kwargs = {"min_lr_rate": self.min_lr / self.learning_rate}

    @property
    def total_train_batch_size(self) -> int:
        """Examples per optimizer step over every process: per-device batch x accumulation x processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * max(1, self.world_size)

    def check_recipe_values(self) -> None:
        """Range checks of the recipe-governed values (and of the stock values ``check_training_values`` reads);
        subclasses extend it."""
        check_training_values(self)
        if self.base_learning_rate is not None:
            check_range("base_learning_rate", self.base_learning_rate, 0, low_open=True)
        if self.min_lr is not None:
            check_range("min_lr", self.min_lr, 0)
        if self.warmup_epochs is not None:
            check_range("warmup_epochs", self.warmup_epochs, 0)

    def recipe_hyperparameters(self) -> dict[str, Any]:
        """The effective value of every recipe-governed argument (for the model card)."""
        values = {"recipe": self.recipe, "total_train_batch_size": self.total_train_batch_size}
        for name in self.recipe_sources:
            values[name] = getattr(self, name)
        if self.lr_scheduler_kwargs:
            values["lr_scheduler_kwargs"] = self.lr_scheduler_kwargs
        return values

    def recipe_report(self) -> str:
        """One line per effective value and where it came from (for the log)."""
        lines = [f"recipe: {self.recipe or 'none'}; total batch {self.total_train_batch_size}"]
        for name, source in self.recipe_sources.items():
            value = getattr(self, name)
            lines.append(f"  {name} = {value.value if hasattr(value, 'value') else value}  ({source})")
        if self.lr_scheduler_kwargs:
            lines.append(f"  lr_scheduler_kwargs = {self.lr_scheduler_kwargs}")
        return "\n".join(lines)


@dataclass
class FinetuneTrainingArguments(RecipeTrainingArguments):
    """Arguments of ``examples/finetune_image_classification.py``: ``--recipe atto|tiny|base``."""

    recipes: ClassVar[dict[str, dict[str, Any]]] = {size: finetune_recipe(size) for size in FINETUNE_RECIPES}
    # used where neither the command line nor a recipe gives a value
    recipe_defaults: ClassVar[dict[str, Any]] = dict(
        base_learning_rate=2e-4, layer_decay=0.9, layer_decay_type="single", weight_decay=0.05, drop_path_rate=0.1,
        mixup=0.0, cutmix=0.0, label_smoothing=0.1, ema_decay=0.0, random_erasing=0.25,
    )  # fmt: skip

    layer_decay: float | None = field(default=None, metadata={"help": "lr scale per layer towards the stem"})
    layer_decay_type: str | None = field(default=None, metadata={"help": "single or group"})
    drop_path_rate: float | None = None
    ema_decay: float | None = field(default=None, metadata={"help": "0 disables EMA; official 0.9999"})
    mixup: float | None = field(default=None, metadata={"help": "MixUp alpha; 0 disables"})
    cutmix: float | None = field(default=None, metadata={"help": "CutMix alpha; 0 disables"})
    label_smoothing: float | None = None
    random_erasing: float | None = field(default=None, metadata={"help": "probability of random erasing"})

    def check_recipe_values(self) -> None:
        super().check_recipe_values()
        check_range("layer_decay", self.layer_decay, 0, 1, low_open=True)
        if self.layer_decay_type not in ("single", "group"):
            raise ValueError(f"layer_decay_type must be 'single' or 'group', got {self.layer_decay_type!r}")
        check_range("drop_path_rate", self.drop_path_rate, 0, 1, high_open=True)
        if not (self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        if self.mixup < 0 or self.cutmix < 0:  # NaN and inf were refused by check_training_values
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {self.mixup} and {self.cutmix}")
        check_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_range("random_erasing", self.random_erasing, 0, 1)


@dataclass
class PretrainTrainingArguments(RecipeTrainingArguments):
    """Arguments of ``examples/pretrain_fcmae.py``: ``--recipe fcmae`` (800 epochs) or ``fcmae-1600``. Without a
    recipe the official base lr and Adam betas still apply; the rest is the stock Trainer's."""

    recipes: ClassVar[dict[str, dict[str, Any]]] = PRETRAIN_RECIPES
    recipe_defaults: ClassVar[dict[str, Any]] = dict(base_learning_rate=1.5e-4, adam_beta2=0.95)


def create_model_card(trainer, **card_fields) -> None:
    """``Trainer.create_model_card`` with the effective recipe values added to the card's hyperparameters.

    ``card_fields`` are ``TrainingSummary.from_trainer``'s (``model_name``, ``finetuned_from``, ``tasks``, ...).
    Writes ``<output_dir>/README.md`` on the main process only.
    """
    from pathlib import Path

    from transformers.modelcard import TrainingSummary

    if not trainer.is_world_process_zero():
        return
    summary = TrainingSummary.from_trainer(trainer, **card_fields)
    args = trainer.args
    if isinstance(args, RecipeTrainingArguments):
        # the stock card already shows these (num_epochs, lr_scheduler_warmup_steps, the optimizer line)
        shown = {"learning_rate", "num_train_epochs", "warmup_steps", "adam_beta1", "adam_beta2", "adam_epsilon"}
        extra = {
            name: value
            for name, value in args.recipe_hyperparameters().items()
            if name not in shown and name not in summary.hyperparameters
        }
        summary.hyperparameters.update(extra)
    Path(args.output_dir, "README.md").write_text(summary.to_model_card(), encoding="utf-8")


__all__ = [
    "FINETUNE_COMMON",
    "FINETUNE_HEAD_INIT_STD",
    "FINETUNE_RECIPES",
    "FINETUNE_TOTAL_BATCH",
    "FinetuneTrainingArguments",
    "PRETRAIN_MODEL",
    "PRETRAIN_RECIPE",
    "PRETRAIN_RECIPES",
    "PRETRAIN_TOTAL_BATCH",
    "PretrainTrainingArguments",
    "CheckedTrainingArguments",
    "RecipeTrainingArguments",
    "check_finite_arguments",
    "check_range",
    "check_training_values",
    "create_model_card",
    "finetune_recipe",
    "scaled_learning_rate",
]
