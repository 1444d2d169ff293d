"""One optimizer step of the stock Trainer on fixed data, for the exact-update tests (tests/test_accumulation.py).

Each case is a model, a dataset and a collator (with or without the plug-ins). ``trainer_update`` runs one step of
plain SGD (lr 1, no momentum, no clipping, no weight decay), so the parameter update is minus the gradient the
Trainer built: any error in how the loss is normalised over micro-batches or processes shows in it.

Under torchrun (``python -m torch.distributed.run --nproc_per_node 2 accumulation_updates.py OUT``) every case runs
on 2 gloo processes and rank 0 saves the updates to OUT (safetensors, keys ``case/parameter``).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.training import FCMAECollator, fcmae_loss, finish_distributed_run
from convnextv2_hf.transforms import MixUpCutMixCollator

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:  # run as a script (under torchrun), only this folder is on the path
    sys.path.insert(0, TESTS)
from helpers import randomize_, tiny_config  # noqa: E402

NUM_LABELS = 5
CLASSIFIER_SIZE = 32
FCMAE_SIZE = 64  # 2 x 2 patches of 32: 1 kept, 3 removed per image


def one_block_config() -> ConvNextV2Config:
    """The tests' tiny config with one block per stage."""
    return tiny_config(depths=[1, 1, 1, 1], num_labels=NUM_LABELS)


def classifier() -> ConvNextV2ForImageClassification:
    torch.manual_seed(0)
    return randomize_(ConvNextV2ForImageClassification(one_block_config()), seed=1)  # the same weights in every run


def fcmae() -> ConvNextV2ForMaskedImageModeling:
    torch.manual_seed(0)
    return randomize_(ConvNextV2ForMaskedImageModeling(one_block_config()), seed=1)


class Examples(Dataset):
    """A list of example dicts."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def class_examples(count: int, mixable: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(count, 3, CLASSIFIER_SIZE, CLASSIFIER_SIZE, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (count,), generator=generator)
    examples = [{"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(count)]
    if mixable:
        for example in examples:
            example["mixable"] = True
    return examples


def mixed_examples(count: int) -> list[dict]:
    """Real MixUp/CutMix soft labels: the collator mixes the whole set once; the examples keep its output, so
    every split of them into micro-batches or processes trains on the same pixels and targets."""
    torch.manual_seed(3)
    batch = MixUpCutMixCollator(NUM_LABELS, label_smoothing=0.1)(class_examples(count, mixable=True))
    assert batch["labels"].shape == (count, NUM_LABELS)
    return [{"pixel_values": batch["pixel_values"][i], "labels": batch["labels"][i]} for i in range(count)]


def fcmae_examples(count: int) -> list[dict]:
    """Images with their own mask noise, so every run draws the same masks."""
    generator = torch.Generator().manual_seed(4)
    pixels = torch.randn(count, 3, FCMAE_SIZE, FCMAE_SIZE, generator=generator)
    noise = torch.rand(count, (FCMAE_SIZE // 32) ** 2, generator=generator)
    return [{"pixel_values": pixels[i], "noise": noise[i]} for i in range(count)]


@dataclass
class Case:
    """A model, its examples and collator, and the Trainer's loss plug-ins for one test case."""

    model: Callable[[], torch.nn.Module]
    examples: Callable[[int], list[dict]]
    collator: Callable[[], Callable] = lambda: default_data_collator
    compute_loss_func: Callable | None = None
    label_smoothing_factor: float = 0.0


CASES: dict[str, Case] = {
    "classifier_class_ids": Case(classifier, class_examples),
    # soft labels (N, 5) from the real collator in the loop: smoothing only, so batches of any split agree
    "classifier_soft_labels_collator": Case(
        classifier,
        lambda count: class_examples(count, mixable=True),
        lambda: MixUpCutMixCollator(NUM_LABELS, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1),
    ),
    "classifier_mixup_cutmix_labels": Case(classifier, mixed_examples),
    "classifier_trainer_label_smoothing": Case(classifier, class_examples, label_smoothing_factor=0.1),
    "fcmae_collator": Case(fcmae, fcmae_examples, lambda: FCMAECollator(one_block_config(), FCMAE_SIZE)),
    "fcmae_collator_fcmae_loss": Case(
        fcmae, fcmae_examples, lambda: FCMAECollator(one_block_config(), FCMAE_SIZE), compute_loss_func=fcmae_loss
    ),
    "fcmae_without_labels": Case(fcmae, fcmae_examples),
}


class BatchSizes:
    """Wraps a collator and records the size of every batch it builds (this process's micro-batches)."""

    def __init__(self, collator: Callable):
        self.collator = collator
        self.sizes: list[int] = []

    def __call__(self, examples: list[dict]) -> dict:
        self.sizes.append(len(examples))
        return self.collator(examples)


def trainer_update(
    case: Case, count: int, per_device_batch: int, accumulation: int, output_dir: str
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Run one optimizer step over ``count`` examples; return each parameter's update (after - before) and the
    sizes of this process's micro-batches."""
    model = case.model()
    collator = BatchSizes(case.collator())
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",  # no momentum: the update is -lr x gradient
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping
        label_smoothing_factor=case.label_smoothing_factor,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",
        ddp_find_unused_parameters=False,
        # accelerate would otherwise repeat first examples to even out the processes' last batches
        accelerator_config={"even_batches": False},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Examples(case.examples(count)),
        data_collator=collator,
        compute_loss_func=case.compute_loss_func,
    )
    trainer.train()
    assert trainer.state.global_step == 1
    update = {name: (parameter.detach() - before[name]).contiguous() for name, parameter in model.named_parameters()}
    return update, collator.sizes


# under torchrun: (count, per-device batch, accumulation) per case; every split puts all examples in one step
DISTRIBUTED_RUNS = {
    # 10 examples, batches of 3 shared round robin: rank 0 gets 3 + 3, rank 1 gets 3 + 1 (uneven in both ways)
    "accumulation": (10, 3, 2),
    # 8 examples, 4 per process, no accumulation
    "processes": (8, 4, 1),
    # 8 examples, 2 + 2 per process
    "equal_accumulation": (8, 2, 2),
}


def distributed_cases() -> list[tuple[str, str]]:
    """(case, run) pairs run under torchrun. Without labels the Trainer has no count, so FCMAE without the
    collator is exact only for equal batches: it runs with no uneven split."""
    pairs = [(case, "accumulation") for case in CASES if case != "fcmae_without_labels"]
    pairs += [("classifier_class_ids", "processes"), ("fcmae_collator", "processes")]
    pairs += [("fcmae_without_labels", "processes"), ("fcmae_without_labels", "equal_accumulation")]
    return pairs


def main(output: str) -> None:
    updates = {}
    with tempfile.TemporaryDirectory() as scratch:
        for case, run in distributed_cases():
            count, per_device_batch, accumulation = DISTRIBUTED_RUNS[run]
            update, sizes = trainer_update(CASES[case], count, per_device_batch, accumulation, scratch)
            updates.update({f"{case}/{run}/{name}": value for name, value in update.items()})
            every_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every_rank, sizes)
            updates[f"{case}/{run}/batch_sizes"] = torch.tensor(every_rank)  # (processes, micro-batches)
    if torch.distributed.get_rank() == 0:
        save_file(updates, output)
    finish_distributed_run()


if __name__ == "__main__":
    main(sys.argv[1])
