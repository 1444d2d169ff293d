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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

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


def check_training_values(args: TrainingArguments) -> None:
    """``ValueError`` naming the flag for stock ``TrainingArguments`` values no run can use, checked when the
    arguments are parsed: the Trainer would take a negative learning rate silently (gradient ascent) and meet a
    batch size of 0 only in its DataLoader, after creating the output folder."""
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {args.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# the TrainingArguments fields a recipe may set; declared again below with a default of None ("not given")
_STOCK_FIELDS = ("num_train_epochs", "lr_scheduler_type", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
_STOCK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.name in _STOCK_FIELDS}
_FROM_RECIPE = "from the recipe, else {}"


@dataclass
class RecipeTrainingArguments(TrainingArguments):
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
        if self.base_learning_rate is not None and not self.base_learning_rate > 0:
            raise ValueError(f"base_learning_rate must be > 0, got {self.base_learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")

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
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.layer_decay_type not in ("single", "group"):
            raise ValueError(f"layer_decay_type must be 'single' or 'group', got {self.layer_decay_type!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not (self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {self.mixup} and {self.cutmix}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing must be in [0, 1], got {self.random_erasing}")


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
    "RecipeTrainingArguments",
    "check_training_values",
    "create_model_card",
    "finetune_recipe",
    "scaled_learning_rate",
]
