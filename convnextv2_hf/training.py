"""Plug-ins for the stock ``transformers.Trainer``: layer-wise lr decay, the FCMAE loss and its collator, EMA.

Nothing here needs a Trainer subclass::

    trainer = Trainer(
        model=classifier,
        args=args,
        optimizer_cls_and_kwargs=layer_decay_optimizer(classifier, args, layer_decay=0.9),
        callbacks=[EMACallback(decay=0.9999)],
        ...
    )
    pretrainer = Trainer(model=fcmae, args=args, data_collator=FCMAECollator(fcmae.config, image_size=224),
                         compute_loss_func=fcmae_loss, ...)
"""

from __future__ import annotations

import json
import logging as python_logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging

from .configuration_convnextv2 import ConvNextV2Config
from .cpu_memory import check_keep_freed_memory, glibc_version, keep_freed_memory
from .modeling_convnextv2 import check_finite_weights, check_safetensors_files, draw_mask, num_kept_patches
from .recipes import check_training_values

logger = logging.get_logger(__name__)

LAYER_DECAY_TYPES = ("single", "group")
_STEM = re.compile(r"(^|\.)embeddings\.")
_DOWNSAMPLE = re.compile(r"(^|\.)encoder\.stages\.(\d+)\.downsampling_layer\.")
_BLOCK = re.compile(r"(^|\.)encoder\.stages\.(\d+)\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ----------------------------------------------------------------------------------------------------------


def layer_id(name: str, depths: list[int], layer_decay_type: str = "single") -> int:
    """The official layer id of a parameter, from our (transformers') parameter name: the rules of
    ``get_num_layer_for_convnext_single`` ("single") and ``get_num_layer_for_convnext`` ("group") in the official
    repository's ``optim_factory.py`` (https://github.com/facebookresearch/ConvNeXt-V2)."""
    if layer_decay_type == "single":
        if _STEM.search(name):
            return 1
        if match := _DOWNSAMPLE.search(name):
            return sum(depths[: int(match.group(2))]) + 1
        if match := _BLOCK.search(name):
            stage, block = int(match.group(2)), int(match.group(3))
            return sum(depths[:stage]) + block + 1
        return sum(depths) + 1
    # "group": 12 groups for depths (3, 3, 27, 3), stage 2 in groups of three blocks
    if _STEM.search(name):
        return 0
    if match := _DOWNSAMPLE.search(name):
        return {1: 2, 2: 3, 3: 12}[int(match.group(2))]
    if match := _BLOCK.search(name):
        stage, block = int(match.group(2)), int(match.group(3))
        return {0: 1, 1: 2, 3: 12}.get(stage, 3 + block // 3)
    return 13


def _num_layer_ids(depths: list[int], layer_decay_type: str) -> int:
    return sum(depths) + 1 if layer_decay_type == "single" else 13


@dataclass(frozen=True)
class EncoderLocation:
    """Where a model keeps its ConvNeXt V2 encoder: module paths as in ``named_modules`` ("" for the model itself)."""

    encoder: str  # e.g. "backbone.encoder" in UperNet, "base_model.model.convnextv2.encoder" under PEFT
    embeddings: str | None  # the stem beside it, e.g. "backbone.embeddings"
    depths: list[int]


def find_convnextv2_encoder(model: nn.Module) -> EncoderLocation:
    """Find the one ConvNeXt V2 encoder inside ``model`` (a classifier, ``ConvNextV2Backbone`` in UperNet or
    Mask2Former, the FCMAE model, a PEFT wrapper of any of these) and the stem beside it.

    Modules are matched by class name: our classes, the built-in transformers ones and a remote-code copy are
    distinct classes with the same parameter layout. ``depths`` is counted from the blocks present (it equals the
    owning config's ``depths``). ``ValueError`` when there is no encoder, or more than one.
    """
    encoders = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "ConvNextV2Encoder"]
    if not encoders:
        raise ValueError(
            f"{type(model).__name__} holds no ConvNeXt V2 encoder (no ConvNextV2Encoder module): layer-wise lr decay "
            "needs one to give the official layer ids"
        )
    if len(encoders) > 1:
        raise ValueError(
            f"{type(model).__name__} holds {len(encoders)} ConvNeXt V2 encoders ({[name for name, _ in encoders]}); "
            "layer-wise lr decay is defined for one: build the param groups of each part yourself"
        )
    encoder_name, encoder = encoders[0]
    holder = encoder_name.rpartition(".")[0]
    stems = [name for name, m in model.named_modules() if type(m).__name__ == "ConvNextV2Embeddings"]
    # the stem that feeds this encoder sits beside it (the FCMAE decoder has no stem of its own)
    beside = [name for name in stems if name.rpartition(".")[0] == holder]
    embeddings = beside[0] if len(beside) == 1 else (stems[0] if len(stems) == 1 else None)
    depths = [len(stage.layers) for stage in encoder.stages]
    return EncoderLocation(encoder=encoder_name, embeddings=embeddings, depths=depths)


def _encoder_relative_name(name: str, location: EncoderLocation) -> str | None:
    """``name`` as the layer-id rules spell it (``embeddings.*`` / ``encoder.stages.*``), None outside the encoder."""
    for prefix, spelled in ((location.encoder, "encoder"), (location.embeddings, "embeddings")):
        if prefix is None:
            continue
        if prefix == "" or name.startswith(prefix + "."):
            return spelled + "." + (name[len(prefix) + 1 :] if prefix else name)
    return None


def skips_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """1-D parameters, biases and the GRN gamma/beta (shape (1, 1, 1, C), missed by a plain 1-D rule)."""
    return parameter.ndim <= 1 or name.endswith(".bias") or ".grn." in name or name.endswith("mask_token")


def layer_decay_param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, layer_decay_type: str = "single"
) -> list[dict]:
    """Torch param groups with ``params``, ``weight_decay``, ``lr_scale`` (and ``param_names``, ``layer_id``).

    lr_scale of layer id k is ``layer_decay ** (max_id - k)``: 1.0 for the final norm and the head. Frozen
    parameters are left out without shifting any scale. Groups are ordered by decreasing scale, so group 0
    is the head's (the Trainer logs group 0's learning rate).

    ``model`` is anything that holds one ConvNeXt V2 encoder (``find_convnextv2_encoder``): its stem and blocks get
    their official ids wherever they sit, every other parameter (UperNet's decode and auxiliary heads, the
    backbone's output norms, a classifier, the FCMAE decoder and mask token, PEFT adapters outside the encoder)
    scale 1.0. Adapters inside a block (LoRA on ``pwconv1``) share that block's id.
    """
    if layer_decay_type not in LAYER_DECAY_TYPES:
        raise ValueError(f"layer_decay_type must be one of {LAYER_DECAY_TYPES}, got {layer_decay_type!r}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got layer_decay={layer_decay}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay}")
    location = find_convnextv2_encoder(model)
    depths = location.depths
    if layer_decay_type == "group" and (len(depths) != 4 or depths[2] > 27):
        raise ValueError(
            f"layer_decay_type='group' is defined for 4 stages with at most 27 blocks in stage 3, got depths={depths}"
        )
    max_id = _num_layer_ids(depths, layer_decay_type)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = skips_weight_decay(name, parameter)
        spelled = _encoder_relative_name(name, location)
        index = max_id if spelled is None else layer_id(spelled, depths, layer_decay_type)
        group = groups.setdefault(
            (index, no_decay),
            {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (max_id - index),
                "layer_id": index,
            },
        )
        group["params"].append(parameter)
        group["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (-g["lr_scale"], g["weight_decay"] == 0.0))


def layer_decay_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    layer_decay: float,
    layer_decay_type: str = "single",
    weight_decay: float | None = None,
) -> tuple[type[torch.optim.Optimizer], dict]:
    """``optimizer_cls_and_kwargs`` for the stock Trainer: AdamW over ``layer_decay_param_groups`` with each
    group's lr set to ``args.learning_rate * lr_scale``. The Trainer's scheduler multiplies every group's lr by
    the same factor, so the ratios hold through warm-up and decay; on resume the same groups are rebuilt
    before the optimizer state is loaded. Build a new tuple for each ``Trainer``. The ``args`` values it reads are
    checked first (``recipes.check_training_values``: a NaN learning rate or beta is a ``ValueError`` naming it)."""
    check_training_values(args)
    weight_decay = args.weight_decay if weight_decay is None else weight_decay
    groups: dict[tuple[float, float], dict] = {}
    # layers that share a scale and weight decay share a group: fewer groups make a faster optimizer step (26 groups
    # of an atto model cost 10 ms a step where 2 cost 2 ms, with layer_decay=1.0)
    for group in layer_decay_param_groups(model, weight_decay, layer_decay, layer_decay_type):
        merged = groups.setdefault(
            (group["lr_scale"], group["weight_decay"]),
            {**group, "params": [], "param_names": [], "lr": args.learning_rate * group["lr_scale"]},
        )
        merged["params"] += group["params"]
        merged["param_names"] += group["param_names"]
    kwargs = {
        "params": list(groups.values()),
        "lr": args.learning_rate,  # the optimizer's default lr: the scheduler's min_lr is taken relative to it
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    return torch.optim.AdamW, kwargs


# ----------------------------------------------------------------------------------------------------------
# FCMAE with the Trainer
# ----------------------------------------------------------------------------------------------------------


def mask_noise(num_patches: int, seed: int, index: int, epoch: int | None = None) -> torch.Tensor:
    """The FCMAE mask noise (L,) of one example, a function of (seed, epoch, index) only: the same wherever and
    whenever it is drawn (any process count, worker, resumed run). ``epoch=None`` gives the evaluation masks,
    which stay fixed across epochs. ``draw_mask`` turns it into the mask (smallest noise kept)."""
    import hashlib

    # a 63-bit hash of the three keys seeds a private generator; the global RNG is left alone
    key = f"fcmae-mask/{seed}/{'eval' if epoch is None else int(epoch)}/{int(index)}".encode()
    generator_seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return torch.rand(num_patches, generator=torch.Generator().manual_seed(generator_seed))


class FCMAECollator:
    """Batch ``pixel_values`` for FCMAE and draw each image's mask.

    Adds ``noise`` (the model turns it into the mask) and ``labels``: the same mask as (N, L) with 1 at removed
    and -100 at kept patches. The Trainer counts the non -100 labels over the accumulated and gathered batch
    into ``num_items_in_batch``, the removed patches of the optimizer step. The loss is divided by that count either
    way: by ``fcmae_loss`` (``compute_loss_func``, which takes the labels), or else by the model, which receives the
    labels, checks them against its mask and sums its loss over that count.

    Where each mask comes from, per example:
    - its own ``noise`` (L,), when it carries one;
    - with ``seed`` set: ``mask_noise(L, seed, index, epoch)`` from the example's ``index`` (see
      ``transforms.with_example_index``) and ``self.epoch`` (kept current by ``FCMAEMaskEpochCallback``), so a
      mask depends only on (seed, epoch, index) and a resumed run draws the masks of the uninterrupted one.
      Examples marked ``fixed_mask=True`` (evaluation sets) take ``epoch=None``: the same mask at every
      evaluation;
    - else uniform noise from the global RNG.
    Examples whose ``pixel_values`` is ``None`` (images skipped as unreadable) are left out of the batch.

    ``ValueError`` at construction for an ``image_size`` that is not a multiple of ``config.mask_patch_size``, or
    whose patch count ``config.mask_ratio`` leaves with no patch kept or none removed.
    """

    def __init__(self, config: ConvNextV2Config, image_size: int | tuple[int, int], seed: int | None = None):
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        patch = config.mask_patch_size
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of mask_patch_size={patch}")
        self.num_patches = (height // patch) * (width // patch)
        # here, not at the first batch: a mask that keeps or removes nothing would only fail once training started
        num_kept_patches(self.num_patches, config.mask_ratio)
        self.mask_ratio = config.mask_ratio
        self.seed = seed
        self.epoch = 0

    def example_noise(self, example: dict) -> torch.Tensor:
        """The mask noise (L,) of one example (see the class docstring)."""
        if "noise" in example:
            return torch.as_tensor(example["noise"])
        if self.seed is None:
            return torch.rand(self.num_patches)
        if "index" not in example:
            raise ValueError(
                "FCMAECollator(seed=...) derives masks from each example's 'index'; wrap the dataset with "
                "convnextv2_hf.transforms.with_example_index (or give examples their own 'noise')"
            )
        epoch = None if example.get("fixed_mask", False) else self.epoch
        return mask_noise(self.num_patches, self.seed, example["index"], epoch)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        readable = [example for example in examples if example.get("pixel_values") is not None]
        if not readable:
            raise ValueError(f"every image of this batch of {len(examples)} was skipped as unreadable")
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in readable])
        noise = torch.stack([self.example_noise(example) for example in readable])
        removed = draw_mask(noise, self.mask_ratio)
        labels = torch.where(removed, 1, -100)
        return {"pixel_values": pixel_values, "noise": noise, "labels": labels}


class FCMAEMaskEpochCallback(TrainerCallback):
    """Keeps ``collator.epoch`` at the Trainer's epoch, so ``FCMAECollator(seed=...)`` masks follow
    (seed, epoch, index). At the first epoch of a ``train()`` call it reads the (possibly resumed) state's epoch;
    each later epoch counts one up (a streamed epoch may end early, leaving ``state.epoch`` mid-way).

    The collator runs where the DataLoader builds batches. Workers started for each epoch copy the new value;
    persistent workers would keep the first, so they are refused.
    """

    def __init__(self, collator: FCMAECollator):
        self.collator = collator
        self._first_epoch = True

    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            raise ValueError(
                "FCMAEMaskEpochCallback cannot reach persistent DataLoader workers; drop "
                "--dataloader_persistent_workers (workers then restart each epoch with the current epoch)"
            )
        self._first_epoch = True

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is `epoch + fraction done`; exact at epoch boundaries (n / n == 1.0 in floating point)
        self.collator.epoch = int(state.epoch or 0) if self._first_epoch else self.collator.epoch + 1
        self._first_epoch = False


def fcmae_loss(outputs, labels=None, num_items_in_batch=None) -> torch.Tensor:
    """``Trainer(compute_loss_func=fcmae_loss)``: the sum of per-patch errors over removed patches divided by
    the removed patches of the whole optimizer step (all accumulation steps and processes).

    The Trainer multiplies by the world size and DDP averages gradients over processes, so a step equals one
    process on the whole global batch. Without ``num_items_in_batch`` (no ``FCMAECollator`` labels) it is the
    model's own loss, the mean over this batch's removed patches. ``outputs.loss`` is that mean here: the model
    divides by ``num_items_in_batch`` only when it gets the labels too, and the Trainer took them for this function.
    ``labels`` that count other patches than ``outputs.mask`` removes are a ``ValueError``.
    """
    removed = outputs.mask.sum()
    if num_items_in_batch is None:
        return outputs.loss
    if labels is not None and int(labels.ne(-100).sum()) != int(removed):
        raise ValueError(
            f"labels count {int(labels.ne(-100).sum())} removed patches but the model removed {int(removed)}; "
            "pass the collator's noise to the model so both use the same mask"
        )
    return outputs.loss * removed / num_items_in_batch


# ----------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------

EMA_WEIGHTS_NAME = "ema_model.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
# the model files a Trainer checkpoint may hold (safetensors, sharded, PyTorch, PEFT adapters)
MODEL_WEIGHTS_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


class NonFiniteTrainingError(ValueError):
    """A training step produced a NaN or inf loss or gradient norm; ``StopOnNonFiniteCallback`` raises it before the
    optimizer applies that step, so no weights of it are ever saved."""


def _all_processes_agree(finite: torch.Tensor) -> torch.Tensor:
    """``finite`` and-ed over every process of a ``torch.distributed`` run (itself otherwise). A loss that is inf on one
    process while the averaged gradients stay finite would stop that process alone and leave the others waiting at
    the next collective; with the flags agreed, every process stops at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return finite
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else finite.device
    agreed = finite.to(device=device, dtype=torch.int32)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return agreed.bool()


class StopOnNonFiniteCallback(TrainerCallback):
    """Stop training at the first optimizer step whose loss or gradient norm is NaN or inf, with
    ``NonFiniteTrainingError`` naming the step, as the official training loop stops at the first non-finite loss.

    How every step is seen, whatever ``logging_steps`` is: the Trainer passes no loss to its callbacks, and logs one
    only every ``logging_steps`` steps (replaced by the finite mean under ``logging_nan_inf_filter``). So a forward
    hook (``register_forward_hook``, torch's public API) keeps each training micro-batch's ``loss`` output, and
    ``on_pre_optimizer_step`` (after the backward passes and any clipping, before ``optimizer.step()``) checks those
    losses and the gradients (the same total 2-norm the Trainer clips and logs as ``grad_norm``). The error is raised
    there: the optimizer never applies the step, and ``trainer.train()`` ends before anything of that step (checkpoint,
    final model, EMA weights) is written. Cost: one host sync per optimizer step.

    Models whose forward returns no ``loss`` (e.g. with ``compute_loss_func``) are covered by the gradient check: a
    NaN loss gives NaN gradients. Under DDP the gradients are averaged over processes first, so every process sees a
    non-finite gradient and stops at the same step. The gradient check is off under fp16 loss scaling
    (``--fp16``), where inf gradients are expected: the scaler skips those steps and lowers its scale.
    """

    def __init__(self):
        self._losses: list[torch.Tensor] = []
        self._hook = None
        self._check_gradients = True

    def _record_loss(self, module: nn.Module, inputs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and previews (e.g. reconstruction grids) are not training steps
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._losses = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._remove_hook()
        self._hook = model.register_forward_hook(self._record_loss)
        self._check_gradients = not args.fp16

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        losses, self._losses = self._losses, []
        flags = [torch.isfinite(loss).all() for loss in losses]
        norm = None
        if self._check_gradients:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this process's shard
            if grads:
                device = grads[0].device
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.detach().float()).to(device) for g in grads])
                )
        checks = [flag.to(flags[0].device) for flag in flags] if flags else []
        if norm is not None:
            checks.append(torch.isfinite(norm).to(checks[0].device if checks else norm.device))
        finite = torch.stack(checks).all() if checks else torch.tensor(True)
        finite = _all_processes_agree(finite)
        if bool(finite):  # the one host sync of the step
            return
        step = state.global_step + 1
        bad = [index for index, flag in enumerate(flags) if not bool(flag)]
        if all(bool(check) for check in checks):
            what = "another process saw a non-finite loss or gradient norm (this one's are finite)"
        elif bad:
            value = losses[bad[0]].float().flatten()
            value = value[~torch.isfinite(value)][0].item()
            where = f" (micro-batch {bad[0] + 1} of {len(losses)})" if len(losses) > 1 else ""
            what = f"the loss is {value}{where}"
        else:
            seen = "the loss is finite" if losses else "the model returned no loss to check"
            what = f"the gradient norm is {norm.item()} ({seen})"
        self._remove_hook()
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        raise NonFiniteTrainingError(
            f"training stopped at step {step}: {what}. The optimizer did not take this step and nothing of it was "
            f"saved; the last checkpoint is {last or 'none'}. Lower the learning rate, clip gradients "
            "(--max_grad_norm) or look for NaN/inf in the data; --stop_on_non_finite false (or leaving out "
            "StopOnNonFiniteCallback) lets training go on"
        )

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()


def _read_trainer_state(folder: Path) -> dict | None:
    try:
        saved = json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _is_readable_torch_file(path: Path) -> bool:
    """A ``torch.save`` file is a zip archive whose directory sits at its end: a cut-short file has none. Reads the
    directory only, not the data."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class CheckpointCheck(NamedTuple):
    """What ``checkpoint_problems`` finds in a checkpoint folder."""

    problem: str | None  # the first reason it cannot be resumed; None when it can
    interrupted: bool  # the problem is what an interrupted save leaves (skipped by ``last``), not damage
    fresh: list[str]  # files missing but accepted by ``allow_fresh_optimizer``: that state starts afresh


def checkpoint_problems(
    folder: str | os.PathLike, world_size: int = 1, ema: bool = False, allow_fresh_optimizer: bool = False
) -> CheckpointCheck:
    """Whether ``folder`` is a complete Trainer checkpoint.

    Complete means: a readable ``trainer_state.json``, no ``*.partial`` file, model weights with complete
    safetensors files, readable ``optimizer.pt`` and ``scheduler.pt``, the RNG states the Trainer writes for this
    ``world_size`` (``rng_state.pth``, or ``rng_state_<rank>.pth`` for each process) and, with ``ema``,
    ``ema_model.safetensors``. A missing optimizer, scheduler, RNG or EMA file is a problem unless
    ``allow_fresh_optimizer``; an unreadable one always is (the Trainer would fail on it).

    ``interrupted``: the Trainer writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    states, and ``EMACallback.on_save`` writes the EMA weights after that (through a ``.partial`` file). So a folder
    without a readable trainer state, with a ``.partial`` file, or (with ``ema``) without EMA weights is a save cut
    short (SIGINT, SIGTERM, a crash); a folder with a trainer state and a missing or cut-short file of the earlier
    ones was damaged afterwards, and is an error rather than silently passed over."""
    folder = Path(folder)
    if not (folder / TRAINER_STATE_NAME).is_file():
        extra = " (the Trainer writes it last: a save interrupted before its end)" if folder.is_dir() else ""
        return CheckpointCheck(f"{folder}: not a Trainer checkpoint (no trainer_state.json there){extra}", True, [])
    state = _read_trainer_state(folder)
    if state is None or not isinstance(state.get("global_step"), int):
        problem = f"{folder / TRAINER_STATE_NAME} is unreadable or not a trainer state (a save cut short?)"
        return CheckpointCheck(problem, True, [])
    partial = sorted(folder.glob("*.partial"))
    if partial:
        return CheckpointCheck(f"{partial[0]} is left from an interrupted save", True, [])
    if not any((folder / name).is_file() for name in MODEL_WEIGHTS_NAMES) and not any(
        path.is_dir() and path.name.startswith(("pytorch_model_fsdp", "global_step")) for path in folder.iterdir()
    ):
        problem = f"{folder} holds no model weights ({MODEL_WEIGHTS_NAMES[0]} or another of {MODEL_WEIGHTS_NAMES})"
        return CheckpointCheck(problem, False, [])
    try:
        check_safetensors_files(folder)
    except ValueError as error:
        return CheckpointCheck(str(error), False, [])
    fresh: list[str] = []
    deepspeed = any(path.is_dir() and path.name.startswith("global_step") for path in folder.iterdir())
    names = [] if deepspeed else ["optimizer.pt", "scheduler.pt"]  # DeepSpeed keeps them in its global_step* folder
    names += ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    for name in names:
        path = folder / name
        if not path.is_file():
            fresh.append(str(path))
            if allow_fresh_optimizer:
                continue
            problem = f"{path} is missing"
            if name.startswith("rng_state"):
                present = sorted(p.name for p in folder.glob("rng_state*.pth"))
                problem += f" (this run has {world_size} process(es); the checkpoint holds {present or 'no RNG state'})"
            return CheckpointCheck(problem + _FRESH_HINT, False, fresh)
        if not _is_readable_torch_file(path):
            return CheckpointCheck(f"{path} is unreadable (is it truncated?)", False, fresh)
    if ema and not (folder / EMA_WEIGHTS_NAME).is_file():
        fresh.append(str(folder / EMA_WEIGHTS_NAME))
        if not allow_fresh_optimizer:
            problem = f"{folder / EMA_WEIGHTS_NAME} is missing (EMA is on; it is written after the trainer state)"
            return CheckpointCheck(problem + _FRESH_HINT, True, fresh)
    return CheckpointCheck(None, False, fresh)


_FRESH_HINT = "; --allow_fresh_optimizer resumes without it, starting that part afresh"


def _checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def _checkpoints_newest_first(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir() if (step := _checkpoint_step(path)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def resume_checkpoint(
    args: TrainingArguments,
    ema: bool | None = None,
    allow_fresh_optimizer: bool | None = None,
    model: nn.Module | None = None,
) -> str | None:
    """What a script passes to ``trainer.train(resume_from_checkpoint=...)`` for ``--resume_from_checkpoint``:
    None, a checkpoint folder, or for ``True``/``last`` the newest complete ``checkpoint-*`` in ``output_dir``
    (the Trainer would take the string "True" for a folder, and its own choice for ``True`` is the newest folder,
    complete or not). Resume is all or nothing (``checkpoint_problems`` says what a complete checkpoint holds),
    checked before any training starts, with a ``ValueError`` naming the file:

    - ``last``: folders left by an interrupted save are skipped, each named in a warning; a damaged one (a trainer
      state beside a missing or cut-short file) is an error, as is finding no complete one;
    - an explicit folder that is incomplete is an error, naming the newest complete checkpoint beside it if any;
    - with ``model``, a checkpoint of another task or size (``check_checkpoint_fits``).

    ``ema`` (default: ``args.ema_decay > 0`` where the arguments have it) requires ``ema_model.safetensors``;
    ``allow_fresh_optimizer`` (default: ``args.allow_fresh_optimizer``, else False) accepts a missing optimizer,
    scheduler, RNG or EMA file with a warning.
    """
    value = args.resume_from_checkpoint
    if value is None or value is False or str(value).lower() in ("", "false", "none"):
        return None
    if ema is None:
        ema = (getattr(args, "ema_decay", 0.0) or 0.0) > 0
    if allow_fresh_optimizer is None:
        allow_fresh_optimizer = bool(getattr(args, "allow_fresh_optimizer", False))
    world_size = max(1, args.world_size)

    def check(path: Path) -> CheckpointCheck:
        return checkpoint_problems(path, world_size, ema, allow_fresh_optimizer)

    def newest_complete(folder: Path, besides: Path | None = None) -> Path | None:
        others = (path for path in _checkpoints_newest_first(folder) if path != besides)
        return next((path for path in others if check(path).problem is None), None)

    if value is True or str(value).lower() in ("true", "last"):
        candidates = _checkpoints_newest_first(Path(args.output_dir))
        if not candidates:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {args.output_dir}")
        skipped = []
        for folder in candidates:
            found = check(folder)
            if found.problem is None:
                break
            if not found.interrupted:
                complete = newest_complete(Path(args.output_dir), besides=folder)
                hint = f"; the newest complete checkpoint is {complete}: resume from it explicitly" if complete else ""
                raise ValueError(f"--resume_from_checkpoint {value}: the newest checkpoint {found.problem}{hint}")
            skipped.append(f"{folder.name}: {found.problem}")
        else:
            raise ValueError(
                f"--resume_from_checkpoint {value}: no complete checkpoint in {args.output_dir}: " + "; ".join(skipped)
            )
        for line in skipped:
            logger.warning(f"--resume_from_checkpoint {value}: skipping the incomplete {line}")
    else:
        folder = Path(str(value))
        found = check(folder)
        if found.problem is not None:
            message = f"--resume_from_checkpoint: {found.problem}"
            complete = newest_complete(folder.parent, besides=folder) if _checkpoint_step(folder) is not None else None
            if complete is not None:
                message += f". The newest complete checkpoint beside it is {complete}: resume from that one"
            raise ValueError(message)
    for path in found.fresh:
        logger.warning(f"resuming from {folder} without {path}: that state starts afresh (--allow_fresh_optimizer)")
    if model is not None:
        check_checkpoint_fits(folder, model)
    return str(folder)


def _describe_config(config: dict) -> str:
    """The size-defining fields of a config dict (or of its backbone's), for messages."""
    inner = config.get("backbone_config") if isinstance(config.get("backbone_config"), dict) else config
    fields = [f"{name} {inner[name]}" for name in ("depths", "hidden_sizes") if name in inner]
    if "num_labels" in config or "id2label" in config:
        fields.append(f"{len(config.get('id2label') or {}) or config.get('num_labels')} labels")
    return ", ".join(fields) or "no size fields"


def check_checkpoint_fits(folder: str | os.PathLike, model: nn.Module) -> None:
    """``ValueError`` naming both when the checkpoint ``folder`` holds another kind of model than ``model`` (its
    ``config.json`` ``architectures``: e.g. an FCMAE checkpoint resumed by the fine-tuning script) or one of another
    size (weight names or shapes, from the safetensors headers only). PEFT models and checkpoints without a
    ``config.json`` or safetensors weights are left to the Trainer."""
    from safetensors import safe_open

    folder = Path(folder)
    if hasattr(model, "peft_config") or not (folder / "config.json").is_file():
        return
    try:
        saved = json.loads((folder / "config.json").read_text())
    except ValueError as error:
        raise ValueError(f"{folder / 'config.json'} is unreadable: {error}") from error
    ours, ours_config = type(model).__name__, model.config.to_dict()
    theirs = (saved.get("architectures") or [None])[0]
    if theirs is not None and theirs != ours:
        raise ValueError(
            f"--resume_from_checkpoint {folder} holds a {theirs} ({_describe_config(saved)}), but this run trains a "
            f"{ours} ({_describe_config(ours_config)}): resume a checkpoint with the script of its own task, or start "
            "from its weights with --model_name_or_path instead"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as file:
            for key in file.keys():
                shapes[key] = tuple(file.get_slice(key).get_shape())
    if not shapes:
        return
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    differ = [
        f"{key} {shapes[key]} vs {expected[key]}" for key in expected if key in shapes and shapes[key] != expected[key]
    ]
    missing = [key for key in expected if key not in shapes]
    extra = [key for key in shapes if key not in expected]
    if differ or missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"other shapes: {differ[:3]}" if differ else "",
                f"not in the checkpoint: {missing[:3]}" if missing else "",
                f"not in this model: {extra[:3]}" if extra else "",
            )
            if part
        )
        raise ValueError(
            f"--resume_from_checkpoint {folder} holds a {theirs or 'model'} of another size "
            f"({_describe_config(saved)}) than this run's {ours} ({_describe_config(ours_config)}): {detail}"
        )


def resumed_checkpoint(args: TrainingArguments, state, candidates=()) -> Path | None:
    """The checkpoint folder the running ``Trainer.train`` has just resumed from, seen from a callback at
    ``on_train_begin``, by public means only: the Trainer hands that folder to no callback.

    Looks in order at ``candidates`` (e.g. the folder given to ``EMACallback.resume_from``),
    ``args.resume_from_checkpoint`` (what the example scripts set) and ``<output_dir>/checkpoint-<step>`` (where
    ``train(resume_from_checkpoint=True)`` and a folder of this run resume from). A folder counts only if its
    ``trainer_state.json`` is the state the Trainer loaded (same step and log history), so a stale
    ``args.resume_from_checkpoint`` or another run's folder is never taken. None when no candidate matches.
    """
    paths = [os.fspath(candidate) for candidate in candidates if candidate is not None]
    if isinstance(args.resume_from_checkpoint, (str, os.PathLike)):
        paths.append(os.fspath(args.resume_from_checkpoint))
    paths.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
    for path in paths:
        saved = _read_trainer_state(Path(path))
        if saved and saved.get("global_step") == state.global_step and saved.get("log_history") == state.log_history:
            return Path(path)
    return None


class EMACallback(TrainerCallback):
    """Exponential moving average of the weights (``torch.optim.swa_utils.AveragedModel``), updated after every
    optimizer step (official decay 0.9999). The EMA weights are saved in each checkpoint as
    ``ema_model.safetensors`` and restored on resume. ``use_for_final_save=True`` copies them into the model
    when training ends, so ``trainer.save_model()`` writes the EMA weights. To evaluate the average at any other
    point, ``copy_to`` a model (or use ``callback.ema.module``, the averaged copy); ``state_dict``, ``save`` and
    ``load`` give the EMA weights as tensors or a safetensors file. EMA weights holding NaN or inf are never saved.

    Resuming: the callback finds the checkpoint the Trainer resumed from through ``resumed_checkpoint``: a folder of
    this run's ``output_dir`` (``train(resume_from_checkpoint=True)`` or such a path) and
    ``args.resume_from_checkpoint`` are found as they are; for a folder elsewhere, tell the callback in the same line::

        trainer.train(resume_from_checkpoint=ema.resume_from(folder))

    A resume whose checkpoint cannot be found, or holds no EMA weights, is a ``ValueError`` (the average would
    otherwise restart silently) unless ``allow_fresh_start=True``, which restarts it from the current weights with
    a warning.
    """

    def __init__(self, decay: float = 0.9999, use_for_final_save: bool = False, allow_fresh_start: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.use_for_final_save = use_for_final_save
        self.allow_fresh_start = allow_fresh_start
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        self._resume_folder: Path | None = None

    def resume_from(self, checkpoint):
        """Note the folder the next ``train`` call resumes from and return ``checkpoint`` unchanged, for
        ``trainer.train(resume_from_checkpoint=ema.resume_from(checkpoint))`` (None/False/True pass through)."""
        is_folder = isinstance(checkpoint, (str, os.PathLike)) and str(checkpoint).lower() not in ("true", "false")
        self._resume_folder = Path(checkpoint) if is_folder else None
        return checkpoint

    def _build(self, model: nn.Module) -> None:
        multi_avg_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(self.decay)
        self.ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)

    def _fresh_start(self, why: str) -> None:
        if not self.allow_fresh_start:
            raise ValueError(
                f"{why}. Tell the callback the folder with `trainer.train(resume_from_checkpoint="
                "ema.resume_from(folder))`, or pass EMACallback(allow_fresh_start=True) (--allow_fresh_optimizer in "
                "the example scripts) to restart the average from the current weights"
            )
        logger.warning(f"{why}; the EMA restarts from the current weights")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._build(model)
        announced, self._resume_folder = self._resume_folder, None
        if state.global_step == 0:
            if args.resume_from_checkpoint:
                logger.warning(
                    f"TrainingArguments.resume_from_checkpoint={args.resume_from_checkpoint!r}, but the Trainer "
                    "started at step 0: it resumes only from `trainer.train(resume_from_checkpoint=...)` (the argument "
                    "is for scripts to pass on; see `resume_checkpoint`). Model, optimizer and EMA all start afresh."
                )
            return
        folder = resumed_checkpoint(args, state, candidates=[announced])
        if folder is None:
            self._fresh_start(
                f"resuming at step {state.global_step}, EMACallback found no checkpoint folder whose trainer state is "
                f"the one the Trainer loaded (looked at {announced or 'no folder given to resume_from'}, "
                f"args.resume_from_checkpoint={args.resume_from_checkpoint!r} and "
                f"{Path(args.output_dir) / f'checkpoint-{state.global_step}'})"
            )
            return
        if not (folder / EMA_WEIGHTS_NAME).exists():
            self._fresh_start(
                f"resuming at step {state.global_step}: {folder} holds no EMA weights ({EMA_WEIGHTS_NAME})"
            )
            return
        self.load(folder / EMA_WEIGHTS_NAME, expected_step=state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update_parameters(model)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and args.should_save:
            self.save(checkpoint / EMA_WEIGHTS_NAME, global_step=state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.use_for_final_save and self.ema is not None:
            self.copy_to(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu().contiguous() for k, v in self.ema.module.state_dict().items()}
        state["n_averaged"] = self.ema.n_averaged.detach().cpu().reshape(1)
        return state

    def save(self, path: Path, global_step: int | None = None) -> None:
        """Write the EMA weights and ``n_averaged`` to a safetensors file (via a temporary file, so an interrupted
        save never leaves a partial file under ``path``); ``global_step`` goes into the file's metadata. EMA weights
        holding NaN or inf are refused (``NonFiniteWeightsError`` naming the first such tensor), nothing written."""
        from safetensors.torch import save_file

        path = Path(path)
        state = self.state_dict()
        check_finite_weights(state, f"the EMA weights to save to {path} (nothing was written)")
        partial = path.with_name(path.name + ".partial")
        metadata = None if global_step is None else {"global_step": str(global_step)}
        save_file(state, str(partial), metadata=metadata)
        os.replace(partial, path)

    def load(self, path: Path, expected_step: int | None = None) -> None:
        """Load EMA weights written by ``save``. ``ValueError`` naming the file when it is unreadable (truncated),
        belongs to another model, or was saved at another step than ``expected_step``."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                state = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # SafetensorError for a cut-short header or data, OSError
            raise ValueError(f"cannot read the EMA weights {path}: {error} (is the file truncated?)") from error
        saved_step = metadata.get("global_step")
        if expected_step is not None and saved_step is not None and int(saved_step) != expected_step:
            raise ValueError(f"the EMA weights {path} were saved at step {saved_step}, not at step {expected_step}")
        if "n_averaged" not in state:
            raise ValueError(f"{path} holds no 'n_averaged' entry: it is not an EMA file written by EMACallback")
        n_averaged = state.pop("n_averaged").reshape(())
        try:
            self.ema.module.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"the EMA weights {path} do not fit this model: {error}") from error
        self.ema.n_averaged.copy_(n_averaged)

    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the EMA weights."""
        model.load_state_dict(self.ema.module.state_dict())


class FCMAEReconstructionCallback(TrainerCallback):
    """During FCMAE pretraining, write PNG grids (original | masked | reconstruction, one row per image) of a
    fixed batch to ``<output_dir>/reconstructions/step-<N>.png`` every ``every_steps`` steps and at the end."""

    def __init__(self, pixel_values: torch.Tensor, every_steps: int = 500, mean=None, std=None, seed: int = 0):
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.pixel_values = pixel_values
        self.every_steps = every_steps
        self.mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(1, -1, 1, 1)
        self.std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(1, -1, 1, 1)
        self.seed = seed
        self.written: list[Path] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0 and args.should_save:
            self.write(model, Path(args.output_dir) / "reconstructions" / f"step-{state.global_step}.png")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            self.write(model, Path(args.output_dir) / "reconstructions" / f"step-{state.global_step}.png")

    @torch.no_grad()
    def write(self, model: nn.Module, path: Path) -> Path:
        from torchvision.utils import save_image

        was_training = model.training
        model.eval()
        pixels = self.pixel_values.to(next(model.parameters()).device)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        patch = model.config.mask_patch_size
        num_patches = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        noise = torch.rand(pixels.shape[0], num_patches, generator=generator).to(pixels.device)
        outputs = model(pixels, noise=noise)
        image_size = tuple(pixels.shape[-2:])
        prediction = outputs.logits.float()
        _, mean, std = model.pixel_targets(pixels)
        if mean is not None:  # undo norm_pix_loss's per-patch normalisation with the true patch statistics
            prediction = prediction * std + mean
        removed = outputs.mask.unsqueeze(-1)
        target = model.patchify(pixels).float()
        masked = model.unpatchify(target * (1 - removed), image_size)
        filled = model.unpatchify(target * (1 - removed) + prediction * removed, image_size)
        rows = torch.stack([pixels.float(), masked, filled], dim=1).flatten(0, 1).cpu()
        rows = (rows * self.std + self.mean).clamp(0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(rows, path, nrow=3)
        self.written.append(path)
        model.train(was_training)
        return path


# ----------------------------------------------------------------------------------------------------------
# Keeping freed memory on CPU
# ----------------------------------------------------------------------------------------------------------


class KeepFreedMemoryCallback(TrainerCallback):
    """At the start of training, make glibc keep freed memory for reuse (``cpu_memory.keep_freed_memory``), so
    that a CPU training step stops page-faulting its activations and gradients back in every step (BENCHMARKS.md,
    "glibc keeping freed memory in training"). ``"auto"``: only when the Trainer trains on the CPU; ``"on"``: on any
    device (the host side of a GPU run allocates little); ``"off"``: nothing. It acts on the whole process, from then
    on; where the C library is not glibc it changes nothing (with a warning under ``"on"``)."""

    def __init__(self, setting: str = "auto"):
        check_keep_freed_memory(setting)
        self.setting = setting
        self.kept = False

    def on_train_begin(self, args: TrainingArguments, state, control, **kwargs):
        if self.setting == "off" or (self.setting == "auto" and args.device.type != "cpu"):
            return
        self.kept = keep_freed_memory()
        if self.kept:
            logger.info(
                "glibc keeps freed memory for reuse in this process from now on (--keep_freed_memory off: not kept)"
            )
        elif self.setting == "on":
            found = glibc_version()
            logger.warning(
                "--keep_freed_memory on: nothing changed, "
                + ("glibc refused the thresholds" if found else "the C library is not glibc")
            )


def run_callbacks(training_args: TrainingArguments) -> list[TrainerCallback]:
    """The callbacks that ``CheckedTrainingArguments`` (``recipes``) asks for: ``StopOnNonFiniteCallback`` unless
    ``--stop_on_non_finite false``, ``KeepFreedMemoryCallback`` unless ``--keep_freed_memory off``. Stock
    ``TrainingArguments`` (no such fields) get both with their defaults."""
    callbacks: list[TrainerCallback] = []
    if getattr(training_args, "stop_on_non_finite", True):
        callbacks.append(StopOnNonFiniteCallback())
    setting = getattr(training_args, "keep_freed_memory", "auto")
    if setting != "off":
        callbacks.append(KeepFreedMemoryCallback(setting))
    return callbacks


# ----------------------------------------------------------------------------------------------------------
# Running a script
# ----------------------------------------------------------------------------------------------------------


def setup_script_logging(training_args: TrainingArguments, script_logger: python_logging.Logger) -> None:
    """The examples' logging, as transformers' example scripts set it: timestamped lines on stdout, ``script_logger``
    at INFO on the process that logs (WARNING elsewhere), transformers at ``--log_level``."""
    python_logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[python_logging.StreamHandler(sys.stdout)],
    )
    script_logger.setLevel(python_logging.INFO if training_args.should_log else python_logging.WARNING)
    if training_args.log_level != "passive":
        logging.set_verbosity(training_args.get_process_log_level())  # transformers' logging


def finish_distributed_run() -> None:
    """End a script's run under torchrun: every process waits for the others, then leaves the process group. A process
    that exits while another still talks to it over gloo (rank 0 saving the model or the card) can abort the run at
    interpreter exit ("terminate called without an active exception"). Nothing to do in a single process."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


__all__ = [
    "finish_distributed_run",
    "setup_script_logging",
    "EMACallback",
    "EMA_WEIGHTS_NAME",
    "FCMAECollator",
    "FCMAEMaskEpochCallback",
    "FCMAEReconstructionCallback",
    "NonFiniteTrainingError",
    "StopOnNonFiniteCallback",
    "KeepFreedMemoryCallback",
    "run_callbacks",
    "check_checkpoint_fits",
    "check_safetensors_files",
    "CheckpointCheck",
    "checkpoint_problems",
    "fcmae_loss",
    "find_convnextv2_encoder",
    "layer_decay_optimizer",
    "layer_decay_param_groups",
    "layer_id",
    "mask_noise",
    "resume_checkpoint",
    "resumed_checkpoint",
    "skips_weight_decay",
]
