"""FCMAE data: masks from (seed, epoch, index), the same after a resume; fixed evaluation masks and eval_loss;
validation splits, streaming and unreadable images in examples/pretrain_fcmae.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from expected_errors import SKIPPING_UNREADABLE_IMAGE, STREAMING_NEEDS_MAX_STEPS
from helpers import REPO, StopAtStep, free_port, tiny_config, truncate
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from convnextv2_hf import ConvNextV2ForMaskedImageModeling
from convnextv2_hf.training import FCMAECollator, FCMAEMaskEpochCallback, fcmae_loss, mask_noise
from convnextv2_hf.transforms import with_example_index

sys.path.insert(0, str(REPO / "examples"))

import pretrain_fcmae  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# masks as a function of (seed, epoch, index)
# ---------------------------------------------------------------------------------------------------------


def test_mask_noise_depends_only_on_seed_epoch_and_index():
    torch.manual_seed(0)
    a = mask_noise(9, seed=3, index=5, epoch=2)
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(mask_noise(9, seed=3, index=5, epoch=2), a)
    others = [mask_noise(9, 4, 5, 2), mask_noise(9, 3, 6, 2), mask_noise(9, 3, 5, 3), mask_noise(9, 3, 5, None)]
    assert all(not torch.equal(other, a) for other in others)
    assert a.shape == (9,) and 0.0 <= a.min() and a.max() < 1.0


def test_collator_masks_follow_index_and_epoch_and_evaluation_masks_stay_fixed():
    config = tiny_config()
    collator = FCMAECollator(config, image_size=96, seed=7)
    examples = [{"pixel_values": torch.zeros(3, 96, 96), "index": i} for i in range(4)]
    first = collator(examples)
    assert torch.equal(collator(list(reversed(examples)))["noise"], first["noise"].flip(0))  # per example
    collator.epoch = 1
    assert not torch.equal(collator(examples)["labels"], first["labels"])  # a new epoch, new masks
    fixed = [dict(example, fixed_mask=True) for example in examples]
    evaluation = collator(fixed)["noise"]
    collator.epoch = 5
    assert torch.equal(collator(fixed)["noise"], evaluation)
    assert torch.equal(evaluation[2], mask_noise(9, 7, 2, None))
    removed = (first["labels"] == 1).sum(1)
    assert removed.tolist() == [9 - int(9 * (1 - config.mask_ratio))] * 4


def test_a_seeded_collator_needs_each_examples_index():
    collator = FCMAECollator(tiny_config(), image_size=64, seed=0)
    with pytest.raises(ValueError, match="derives masks from each example's 'index'; wrap the dataset"):
        collator([{"pixel_values": torch.zeros(3, 64, 64)}])


class RecordingCollator(FCMAECollator):
    """The real collator, also keeping each example's mask under (epoch, index)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, examples):
        batch = super().__call__(examples)
        for example, labels in zip(examples, batch["labels"], strict=True):
            self.masks[(self.epoch, int(example["index"]))] = labels == 1
        return batch


@pytest.mark.slow
def test_a_resumed_pretraining_run_uses_the_masks_of_the_uninterrupted_run(tmp_path):
    """8 images, batch 2, 3 epochs (12 steps); one run straight through, one stopped at step 6 (mid epoch 1) and
    resumed from its checkpoint by a fresh Trainer: the same mask for every (epoch, image), the same weights."""
    generator = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 64, 64, generator=generator)} for _ in range(8)]

    def run(output_dir, stop_at=None, resume=None):
        torch.manual_seed(0)
        config = tiny_config()
        model = ConvNextV2ForMaskedImageModeling(config)
        collator = RecordingCollator(config, image_size=64, seed=11)
        args = TrainingArguments(
            output_dir=str(output_dir), per_device_train_batch_size=2, num_train_epochs=3, learning_rate=1e-2,
            save_strategy="steps", save_steps=3, use_cpu=True, report_to="none", remove_unused_columns=False,
            seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        callbacks = [FCMAEMaskEpochCallback(collator)] + ([StopAtStep(stop_at)] if stop_at else [])
        trainer = Trainer(
            model=model, args=args, train_dataset=with_example_index(images), data_collator=collator,
            compute_loss_func=fcmae_loss, callbacks=callbacks,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return model, collator.masks

    full_model, full_masks = run(tmp_path / "full")
    assert len(full_masks) == 24 and {epoch for epoch, _ in full_masks} == {0, 1, 2}
    # masks change with the epoch (so the epoch really reached the collator)
    assert any(not torch.equal(full_masks[(0, i)], full_masks[(1, i)]) for i in range(8))
    _, first_part = run(tmp_path / "interrupted", stop_at=6)
    resumed_model, second_part = run(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-6"))
    assert {epoch for epoch, _ in second_part} == {1, 2}
    assert set(first_part) | set(second_part) == set(full_masks)
    for key, mask in {**first_part, **second_part}.items():
        assert torch.equal(mask, full_masks[key]), key
    differences = {
        n: (resumed_model.state_dict()[n] - t).abs().max().item() for n, t in full_model.state_dict().items()
    }
    assert max(differences.values()) <= 1e-6, max(differences.items(), key=lambda item: item[1])


@pytest.mark.slow
def test_masks_do_not_depend_on_dataloader_workers_and_need_the_epoch_callback(tmp_path):
    """Workers copy the collator at each epoch's start, so they draw the epoch's masks: the same weights as in
    the main process. Without the callback every epoch would reuse epoch 0's masks."""
    generator = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 64, 64, generator=generator)} for _ in range(8)]

    def run(tmp_dir, workers, with_callback=True):
        torch.manual_seed(0)
        config = tiny_config()
        model = ConvNextV2ForMaskedImageModeling(config)
        collator = FCMAECollator(config, image_size=64, seed=3)
        args = TrainingArguments(
            output_dir=str(tmp_dir), per_device_train_batch_size=2, num_train_epochs=3, learning_rate=1e-2,
            save_strategy="no", use_cpu=True, report_to="none", remove_unused_columns=False, seed=0,
            disable_tqdm=True, dataloader_num_workers=workers,
        )  # fmt: skip
        callbacks = [FCMAEMaskEpochCallback(collator)] if with_callback else []
        Trainer(
            model=model, args=args, train_dataset=with_example_index(images), data_collator=collator,
            compute_loss_func=fcmae_loss, callbacks=callbacks,
        ).train()  # fmt: skip
        return model.state_dict()

    main_process, workers, no_callback = run(tmp_path / "a", 0), run(tmp_path / "b", 2), run(tmp_path / "c", 0, False)
    assert all(torch.equal(main_process[k], workers[k]) for k in main_process)
    assert max((main_process[k] - no_callback[k]).abs().max().item() for k in main_process) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# the pretraining script: validation, fixed evaluation masks, streaming, unreadable images
# ---------------------------------------------------------------------------------------------------------


def photo_folder(root: Path, count: int = 8, size=(80, 72)) -> Path:
    """Real photographs (scikit-image's, cropped at different places) as an unlabelled image folder."""
    from skimage import data as skimage_data

    root.mkdir(parents=True, exist_ok=True)
    sources = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut()]
    for i in range(count):
        array = sources[i % len(sources)]
        top, left = 10 * i, 15 * i
        PIL.Image.fromarray(array[top : top + size[1], left : left + size[0]]).save(root / f"{i:02d}.png")
    return root


def pretrain_argv(tmp_path, *extra):
    return ["--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none", "--image_size", "64",
            "--decoder_hidden_size", "16", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
            "--save_strategy", "no", "--disable_tqdm", "true", "--reconstruction_every", "0", "--seed", "0",
            *extra]  # fmt: skip


def test_validation_split_fraction_gives_an_eval_loss_that_two_evaluations_and_two_runs_agree_on(tmp_path):
    data = photo_folder(tmp_path / "images", count=8)
    argv = pretrain_argv(
        tmp_path, "--train_dir", str(data), "--validation_split_fraction", "0.25", "--max_steps", "2",
        "--weight_decay", "0.05",
    )  # fmt: skip
    trainer = pretrain_fcmae.build_trainer(*pretrain_fcmae.parse_arguments(argv))
    assert len(trainer.train_dataset) == 6 and len(trainer.eval_dataset) == 2
    first, second = trainer.evaluate()["eval_loss"], trainer.evaluate()["eval_loss"]
    assert first == second and 0.0 < first < 10.0
    again = pretrain_fcmae.build_trainer(*pretrain_fcmae.parse_arguments(argv))  # a second run, same seed
    assert again.evaluate()["eval_loss"] == first
    trainer.train()
    trained = trainer.evaluate()["eval_loss"]
    assert trained != first and trainer.evaluate()["eval_loss"] == trained
    # the official weight-decay exclusions, in two groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed, excluded = ({names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05, 0.0]
    assert (
        "mask_token" in excluded and any(".grn." in n for n in excluded) and any(n.endswith(".bias") for n in excluded)
    )
    assert all(n.endswith(".weight") and ".grn." not in n for n in decayed) and len(decayed) > 10


def test_trainer_evaluate_returns_the_fcmae_eval_loss_without_label_names(tmp_path):
    """The stock Trainer on the FCMAE model, no label_names: evaluate() reports eval_loss, the same each time."""
    config = tiny_config()
    torch.manual_seed(0)
    model = ConvNextV2ForMaskedImageModeling(config)
    generator = torch.Generator().manual_seed(1)
    images = [{"pixel_values": torch.randn(3, 64, 64, generator=generator)} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                             per_device_eval_batch_size=2)  # fmt: skip
    trainer = Trainer(
        model=model, args=args, eval_dataset=with_example_index(images, fixed_mask=True),
        data_collator=FCMAECollator(config, image_size=64, seed=0), compute_loss_func=fcmae_loss,
    )  # fmt: skip
    first = trainer.evaluate()
    assert "eval_loss" in first and first["eval_loss"] == trainer.evaluate()["eval_loss"]
    batch = FCMAECollator(config, image_size=64, seed=0)(
        [dict(e, index=i, fixed_mask=True) for i, e in enumerate(images)]
    )
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"], noise=batch["noise"]).loss.item()
    assert first["eval_loss"] == pytest.approx(expected, rel=1e-5)  # equal batches: mean of batch means


def test_validation_dir_and_the_full_script_write_eval_metrics_and_a_card(tmp_path):
    train = photo_folder(tmp_path / "train", count=6)
    validation = photo_folder(tmp_path / "validation", count=3)
    metrics = pretrain_fcmae.main(pretrain_argv(tmp_path, "--train_dir", str(train), "--validation_dir",
                                                str(validation), "--max_steps", "2", "--recipe", "fcmae"))  # fmt: skip
    assert metrics["eval_samples_per_second"] > 0 and np.isfinite(metrics["eval_loss"])
    output = tmp_path / "out"
    assert json.loads((output / "eval_results.json").read_text())["eval_loss"] == metrics["eval_loss"]
    card = (output / "README.md").read_text()
    assert "- lr_scheduler_type: cosine_with_min_lr\n" in card and "- recipe: fcmae\n" in card
    assert "- warmup_epochs: 40\n" in card and "- min_lr: 0.0\n" in card
    assert (output / "model.safetensors").exists() and (output / "preprocessor_config.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--validation_split_fraction", "1.5"], r"validation_split_fraction must be in \(0, 1\), got 1.5"),
        (["--validation_split_fraction", "0.2", "--validation_dir", "x"], "one of --validation_dir and"),
        (["--streaming"], STREAMING_NEEDS_MAX_STEPS),
        (["--streaming", "--max_steps", "2", "--validation_split_fraction", "0.2"], "needs the dataset's length"),
    ],
)
def test_pretraining_rejects_bad_data_arguments(tmp_path, extra, message):
    data = photo_folder(tmp_path / "images", count=2)
    with pytest.raises(ValueError, match=message):
        pretrain_fcmae.main(pretrain_argv(tmp_path, "--train_dir", str(data), *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_streaming_pretraining_on_a_local_folder_is_reproducible(tmp_path):
    data = photo_folder(tmp_path / "images", count=5)
    states = []
    for name in ("a", "b"):
        argv = pretrain_argv(tmp_path / name, "--train_dir", str(data), "--streaming", "--max_steps", "4",
                             "--shuffle_buffer_size", "4", "--logging_steps", "1")  # fmt: skip
        trainer = pretrain_fcmae.build_trainer(*pretrain_fcmae.parse_arguments(argv))
        from datasets import IterableDataset

        assert isinstance(trainer.train_dataset, IterableDataset)
        indices = sorted(example["index"] for example in trainer.train_dataset)
        assert indices == [0, 1, 2, 3, 4]  # every image once per pass, numbered in stream order
        trainer.train()
        # 5 images, batch 2: a pass is 3 batches, so 4 steps cross into a second pass of the stream
        assert trainer.state.global_step == 4 and trainer.data_collator.epoch == 1
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow
def test_streaming_pretraining_under_torchrun_with_two_processes(tmp_path):
    data = photo_folder(tmp_path / "images", count=6)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               str(REPO / "examples" / "pretrain_fcmae.py"), *pretrain_argv(tmp_path, "--train_dir", str(data)),
               "--streaming", "--max_steps", "3", "--ddp_find_unused_parameters", "false",
               "--logging_steps", "1"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert load_file(output / "model.safetensors")  # the weights were written


# ---------------------------------------------------------------------------------------------------------
# unreadable images in a training folder
# ---------------------------------------------------------------------------------------------------------


def test_a_truncated_image_stops_pretraining_with_its_name_or_is_skipped_with_a_warning(tmp_path, caplog):
    data = photo_folder(tmp_path / "images", count=6)
    PIL.Image.open(data / "03.png").convert("RGB").save(data / "03.jpg", quality=90)
    (data / "03.png").unlink()
    truncate(data / "03.jpg")
    truncate(data / "05.png")
    argv = pretrain_argv(tmp_path, "--train_dir", str(data), "--max_steps", "3")
    with pytest.raises(ValueError, match=r"cannot read image .*/0[35]\.(jpg|png): image file is truncated"):
        pretrain_fcmae.main(argv)
    with caplog.at_level("WARNING"):
        metrics = pretrain_fcmae.main(argv + ["--skip_corrupt_images"])
    assert np.isfinite(metrics["train_loss"])
    skipped = {
        record.getMessage().split(":")[0] for record in caplog.records if "skipping unreadable" in record.getMessage()
    }
    assert skipped == {
        f"{SKIPPING_UNREADABLE_IMAGE} {data / '03.jpg'}",
        f"{SKIPPING_UNREADABLE_IMAGE} {data / '05.png'}",
    }


@pytest.mark.slow
def test_the_pretraining_script_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    """Random crops, flips and masks included: 3 epochs of 5 steps straight through, against a run stopped after
    step 7 (checkpoint at 5) and resumed from checkpoint-5. Constant lr, so stopping early changes no schedule."""
    data = photo_folder(tmp_path / "images", count=10)
    common = pretrain_argv(tmp_path, "--train_dir", str(data), "--num_train_epochs", "3", "--learning_rate", "1e-3",
                           "--lr_scheduler_type", "constant", "--save_strategy", "steps",
                           "--save_steps", "5")  # fmt: skip
    pretrain_fcmae.main([*common, "--output_dir", str(tmp_path / "full")])
    pretrain_fcmae.main([*common, "--output_dir", str(tmp_path / "part"), "--max_steps", "7"])
    checkpoint = tmp_path / "part" / "checkpoint-5"
    pretrain_fcmae.main([*common, "--output_dir", str(tmp_path / "part"), "--resume_from_checkpoint", str(checkpoint)])
    full, resumed = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "part" / "model.safetensors"),
    )
    first_part = load_file(checkpoint / "model.safetensors")
    assert max((full[k] - first_part[k]).abs().max().item() for k in full) > 1e-4  # steps 6-15 did train
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # "True" resumes from the newest checkpoint in --output_dir (here checkpoint-15, the resumed run's last); a
    # truncated weights file there is named before any training starts
    weights = tmp_path / "part" / "checkpoint-15" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"checkpoint-15/model\.safetensors is not a complete safetensors file"):
        pretrain_fcmae.main([*common, "--output_dir", str(tmp_path / "part"), "--resume_from_checkpoint", "True"])
