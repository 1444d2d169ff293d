"""Exact updates: one optimizer step with gradient accumulation, or on two processes, equals one process on the
whole batch, for the classifier (class ids, soft labels, uneven micro-batches) and FCMAE, with and without the
plug-ins (``FCMAECollator``, ``fcmae_loss``, ``MixUpCutMixCollator``). Real Trainer runs, real torchrun processes."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, randomize_, tiny_config
from safetensors.torch import load_file

from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.training import FCMAECollator, fcmae_loss

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import accumulation_updates as steps  # noqa: E402

TOLERANCE = 1e-5  # relative, on the whole parameter update


def relative_difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """||got - expected|| / ||expected|| over all parameters together."""
    assert got.keys() == expected.keys()
    error = sum((got[name].double() - expected[name].double()).pow(2).sum().item() for name in expected)
    size = sum(expected[name].double().pow(2).sum().item() for name in expected)
    return math.sqrt(error / size)


def update_norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(value.double().pow(2).sum().item() for value in update.values()))


@pytest.fixture(scope="module")
def whole_batch(tmp_path_factory):
    """The update of one process on all ``count`` examples in one batch, per (case, count), computed once."""
    cache = {}

    def update(case: str, count: int) -> dict[str, torch.Tensor]:
        if (case, count) not in cache:
            output_dir = str(tmp_path_factory.mktemp("whole"))
            cache[case, count], sizes = steps.trainer_update(steps.CASES[case], count, count, 1, output_dir)
            assert sizes == [count]
        return cache[case, count]

    return update


def gradient_step(case: str, count: int) -> dict[str, torch.Tensor]:
    """-gradient of the model's own mean loss on the whole collated batch, outside the Trainer (the SGD lr-1 update)."""
    spec = steps.CASES[case]
    model = spec.model()
    batch = spec.collator()(spec.examples(count))
    if isinstance(model, ConvNextV2ForMaskedImageModeling):
        batch.pop("labels", None)
    model(**batch).loss.backward()
    return {name: -parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad} | {
        name: torch.zeros_like(parameter) for name, parameter in model.named_parameters() if not parameter.requires_grad
    }


# (case, per-device batch, micro-batch sizes) on 6 examples: batches of 4 leave an uneven last micro-batch of 2
SINGLE_PROCESS = [
    ("classifier_class_ids", 4, [4, 2]),
    ("classifier_class_ids", 3, [3, 3]),
    ("classifier_soft_labels_collator", 4, [4, 2]),
    ("classifier_mixup_cutmix_labels", 4, [4, 2]),
    ("classifier_trainer_label_smoothing", 4, [4, 2]),
    ("fcmae_collator", 4, [4, 2]),
    ("fcmae_collator_fcmae_loss", 4, [4, 2]),
    # without labels the Trainer has no count and divides by the accumulation steps: exact for equal micro-batches
    ("fcmae_without_labels", 3, [3, 3]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "per_device_batch", "micro_batches"), SINGLE_PROCESS)
def test_accumulated_step_equals_the_whole_batch_step(tmp_path, whole_batch, case, per_device_batch, micro_batches):
    accumulated, sizes = steps.trainer_update(steps.CASES[case], 6, per_device_batch, 2, str(tmp_path))
    assert sizes == micro_batches
    expected = whole_batch(case, 6)
    assert update_norm(expected) > 1e-2  # the step did move the weights
    assert relative_difference(accumulated, expected) <= TOLERANCE


@pytest.mark.parametrize("case", [case for case in steps.CASES if case != "classifier_trainer_label_smoothing"])
def test_whole_batch_step_is_minus_the_gradient_of_the_mean_loss(whole_batch, case):
    # the Trainer's one-batch step (loss normalised by num_items_in_batch where counted) is the plain mean's gradient
    assert relative_difference(whole_batch(case, 6), gradient_step(case, 6)) <= TOLERANCE


@pytest.fixture(scope="module")
def two_process_updates(tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    command += [str(SCRIPTS / "accumulation_updates.py"), str(folder / "updates.safetensors")]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(folder / "updates.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(("case", "run"), steps.distributed_cases())
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_updates, whole_batch, case, run):
    count = steps.DISTRIBUTED_RUNS[run][0]
    prefix = f"{case}/{run}/"
    got = {key[len(prefix) :]: value for key, value in two_process_updates.items() if key.startswith(prefix)}
    micro_batches = {"accumulation": [[3, 3], [3, 1]], "processes": [[4], [4]], "equal_accumulation": [[2, 2], [2, 2]]}
    assert got.pop("batch_sizes").tolist() == micro_batches[run]  # ranks 0 and 1: all `count` examples, once each
    expected = whole_batch(case, count)
    assert update_norm(expected) > 1e-2
    assert relative_difference(got, expected) <= TOLERANCE


# --- the normalisation itself, without the Trainer ------------------------------------------------------------


@pytest.mark.parametrize("labels", ["class_ids", "soft"])
def test_classifier_loss_shares_add_up_to_the_whole_batch_mean(labels):
    model = randomize_(ConvNextV2ForImageClassification(tiny_config()))
    pixels = torch.randn(5, 3, 32, 32)
    targets = torch.tensor([0, 1, 4, 2, 2])
    if labels == "soft":  # the Trainer counts all 5 entries of a soft row
        targets = torch.softmax(torch.randn(5, 5), dim=-1)
    count = targets.ne(-100).sum()
    with torch.no_grad():
        mean = model(pixels, labels=targets).loss
        shares = [
            model(pixels[part], labels=targets[part], num_items_in_batch=count).loss for part in ([0, 1, 2], [3, 4])
        ]
    assert abs(sum(shares).item() - mean.item()) <= 1e-6 * mean.item()


def test_fcmae_loss_shares_add_up_to_the_whole_batch_mean():
    model = randomize_(ConvNextV2ForMaskedImageModeling(tiny_config()))
    collator = FCMAECollator(model.config, image_size=64)
    batch = collator([{"pixel_values": torch.randn(3, 64, 64)} for _ in range(5)])
    count = batch["labels"].ne(-100).sum()
    with torch.no_grad():
        mean = model(batch["pixel_values"], noise=batch["noise"]).loss
        shares = [
            model(
                batch["pixel_values"][part],
                noise=batch["noise"][part],
                labels=batch["labels"][part],
                num_items_in_batch=count,
            ).loss
            for part in ([0, 1, 2], [3, 4])
        ]
        # without labels num_items_in_batch is not known to count removed patches: the mean, as fcmae_loss expects
        unlabelled = model(batch["pixel_values"], noise=batch["noise"], num_items_in_batch=2 * count)
    assert abs(sum(shares).item() - mean.item()) <= 1e-6 * mean.item()
    assert abs(unlabelled.loss.item() - mean.item()) <= 1e-6 * mean.item()
    assert abs(fcmae_loss(unlabelled, batch["labels"], 2 * count).item() - mean.item() / 2) <= 1e-6 * mean.item()


def test_fcmae_labels_that_do_not_match_the_mask_are_a_value_error():
    model = ConvNextV2ForMaskedImageModeling(tiny_config())
    batch = FCMAECollator(model.config, image_size=64)([{"pixel_values": torch.randn(3, 64, 64)} for _ in range(2)])
    other = FCMAECollator(model.config, image_size=64)(
        [{"pixel_values": torch.randn(3, 64, 64), "noise": 1 - noise} for noise in batch["noise"]]
    )
    with pytest.raises(ValueError, match="do not mark the removed patches"):
        model(batch["pixel_values"], noise=batch["noise"], labels=other["labels"], num_items_in_batch=6)
    with pytest.raises(ValueError, match=r"labels must be the \(batch, patches\) = \(2, 4\) mask, got \(2, 3\)"):
        model(batch["pixel_values"], noise=batch["noise"], labels=batch["labels"][:, :3])
    outputs = model(batch["pixel_values"], noise=batch["noise"])
    with pytest.raises(ValueError, match="labels count 2 removed patches but the model removed 6"):
        fcmae_loss(outputs, torch.where(outputs.mask.bool(), -100, 1), 6)


def test_a_count_smaller_than_the_batch_is_a_value_error():
    model = ConvNextV2ForImageClassification(tiny_config())
    soft = torch.full((4, 5), 0.2)
    with pytest.raises(ValueError, match=r"num_items_in_batch \(4\) .* at least this batch's 20"):
        model(torch.randn(4, 3, 32, 32), labels=soft, num_items_in_batch=4)  # rows counted, not entries
