"""Official training recipes (OFFICIAL.md, from the repository's TRAINING.md), by model size.

``lr = blr * total_batch / 256``. Sizes without a recipe in TRAINING.md (femto, pico, nano, large, huge) are
in the paper's appendix, not here; ``finetune_recipe`` names the ones it knows when asked for another.
"""

from __future__ import annotations

FINETUNE_RECIPES: dict[str, dict] = {
    "atto": dict(blr=2e-4, epochs=600, warmup_epochs=0, layer_decay=0.9, layer_decay_type="single",
                 weight_decay=0.3, drop_path=0.1, mixup=0.0, cutmix=0.0, label_smoothing=0.2),
    "tiny": dict(blr=8e-4, epochs=300, warmup_epochs=40, layer_decay=0.9, layer_decay_type="single",
                 weight_decay=0.05, drop_path=0.2, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
    "base": dict(blr=6.25e-4, epochs=100, warmup_epochs=20, layer_decay=0.6, layer_decay_type="group",
                 weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
}  # fmt: skip
# common to every fine-tuning recipe
FINETUNE_COMMON = dict(total_batch=1024, adam_epsilon=1e-8, min_lr=1e-6, ema_decay=0.9999, random_erasing=0.25,
                       head_init_std=2e-5)  # fmt: skip
PRETRAIN_RECIPE = dict(blr=1.5e-4, adam_betas=(0.9, 0.95), weight_decay=0.05, warmup_epochs=40, epochs=800,
                       total_batch=4096, mask_ratio=0.6, norm_pix_loss=True)  # fmt: skip


def finetune_recipe(size: str) -> dict:
    """The official fine-tuning hyper-parameters of ``size`` merged with the common ones."""
    if size not in FINETUNE_RECIPES:
        raise ValueError(f"no official fine-tuning recipe for {size!r}; recipes exist for {sorted(FINETUNE_RECIPES)}")
    return {**FINETUNE_COMMON, **FINETUNE_RECIPES[size]}


def scaled_learning_rate(blr: float, total_batch: int) -> float:
    """The official linear scaling rule: ``blr * total_batch / 256``."""
    return blr * total_batch / 256


__all__ = ["FINETUNE_COMMON", "FINETUNE_RECIPES", "PRETRAIN_RECIPE", "finetune_recipe", "scaled_learning_rate"]
